"""BettaFish's analyzer contract (InsightEngine/tools/sentiment_analyzer.py), checked from its documented interface, and
the serve.py client it uses, against a real server on loopback."""
import subprocess
import sys
import time

import httpx
import pandas as pd
import pytest

import tiny
from conftest import Server
from databases import free_port
from weibo_senti import REPO_ROOT
from weibo_senti.bettafish import DEFAULT_BANDS, SWITCHED_OFF, BatchSentimentResult, SentimentResult, WeiboSentimentAnalyzer
from weibo_senti.calibration import LEVELS, level_of
from weibo_senti.client import RequestRejected, SentimentClient, ServiceUnavailable
from weibo_senti.predict import Classifier

TEXTS = [text for _, text in tiny.synthetic_rows(60, seed=11)]
STRICT = ["--max-texts-per-request", "20", "--max-text-chars", "100", "--max-body-bytes", "4000"]
ANALYSIS_KEYS = {"total_analyzed", "success_rate", "average_confidence", "sentiment_distribution", "high_confidence_results", "summary"}


@pytest.fixture(scope="module")
def checkpoint(trained):
    return trained("bert_lora")[0] / "best"


@pytest.fixture(scope="module")
def server(checkpoint):
    server = Server("--checkpoint", f"mine={checkpoint}", "--mixed-precision", "no", "--backend", "torch", *STRICT)
    yield server
    assert server.stop() == 0


def check_result_types(result):
    assert isinstance(result, SentimentResult)
    assert isinstance(result.text, str) and isinstance(result.sentiment_label, str) and isinstance(result.confidence, float)
    assert isinstance(result.probability_distribution, dict) and isinstance(result.success, bool)
    assert result.error_message is None or isinstance(result.error_message, str)
    assert isinstance(result.analysis_performed, bool)


def check_analysis(answer, rows_with_text, min_confidence):
    analysis = answer["sentiment_analysis"]
    assert ANALYSIS_KEYS <= set(analysis) and "available" not in analysis
    assert isinstance(analysis["total_analyzed"], int) and isinstance(analysis["average_confidence"], float)
    done, total = map(int, analysis["success_rate"].split("/"))
    assert done == analysis["total_analyzed"] and total == rows_with_text
    assert set(analysis["sentiment_distribution"]) <= set(LEVELS)
    assert sum(analysis["sentiment_distribution"].values()) == analysis["total_analyzed"]
    for entry in analysis["high_confidence_results"]:
        assert set(entry) == {"original_data", "sentiment", "confidence", "text_preview"}
        assert entry["confidence"] >= min_confidence and isinstance(entry["original_data"], dict)
        assert len(entry["text_preview"]) <= 103
    assert isinstance(analysis["summary"], str) and analysis["summary"]
    return analysis


@pytest.mark.parametrize("backend", ["url", "in_process"])
def test_the_analyzer_speaks_bettafish(server, checkpoint, backend):
    analyzer = WeiboSentimentAnalyzer(url=server.url) if backend == "url" else WeiboSentimentAnalyzer(checkpoint=checkpoint, mixed_precision="no")
    assert not analyzer.is_initialized and not analyzer.is_disabled and analyzer.disable_reason is None
    assert analyzer.initialize() and analyzer.is_initialized
    expected = Classifier.load(checkpoint, mixed_precision="no").predict(TEXTS[:3])

    one = analyzer.analyze_single_text(TEXTS[0])
    check_result_types(one)
    assert one.success and one.analysis_performed and not one.truncated
    assert one.sentiment_label == level_of(expected[0]["label"], expected[0]["confidence"], DEFAULT_BANDS)  # the tiny run fitted none
    assert one.confidence == pytest.approx(expected[0]["confidence"], abs=1e-5)
    assert one.probability_distribution["正面"] == pytest.approx(expected[0]["prob_positive"], abs=1e-5)

    batch = analyzer.analyze_batch([TEXTS[1], "   ", TEXTS[2], "\x00"], show_progress=False)
    assert isinstance(batch, BatchSentimentResult) and batch.analysis_performed
    assert (batch.total_processed, batch.success_count, batch.failed_count) == (4, 2, 2)
    for result in batch.results:
        check_result_types(result)
    assert [r.success for r in batch.results] == [True, False, True, False] and batch.results[1].error_message
    assert batch.average_confidence == pytest.approx((expected[1]["confidence"] + expected[2]["confidence"]) / 2, abs=1e-5)

    rows = [{"note_id": i, "content": text} for i, text in enumerate(TEXTS[:30])]
    rows += [{"note_id": 98, "content": "", "title": "标题里的文字好开心"}, {"note_id": 99, "content": None}, {"note_id": 100, "desc": "x"}]
    everything = check_analysis(analyzer.analyze_query_results(rows), rows_with_text=31, min_confidence=0.5)
    assert len(everything["high_confidence_results"]) == everything["total_analyzed"] == 31  # 0.5: a binary label always is
    confidences = sorted(entry["confidence"] for entry in everything["high_confidence_results"])
    threshold = confidences[len(confidences) // 2]
    kept = check_analysis(analyzer.analyze_query_results(rows, min_confidence=threshold), 31, threshold)
    assert 0 < len(kept["high_confidence_results"]) < 31
    assert any(entry["original_data"]["note_id"] == 98 for entry in everything["high_confidence_results"])
    info = analyzer.get_model_info()
    assert info["model_name"].startswith("bert_lora@") and info["supported_languages"] == ["中文"] and info["sentiment_levels"] == list(LEVELS)
    if backend == "url":  # a long post is scored on its start, and said to be, not refused (the server's limit here: 100)
        long = analyzer.analyze_single_text(TEXTS[0] + "好" * 150)
        assert long.success and long.truncated


def test_neutral_is_the_band_where_the_classifier_cannot_tell(checkpoint):
    analyzer = WeiboSentimentAnalyzer(checkpoint=checkpoint, mixed_precision="no", neutral_below=0.99, levels=3)
    assert analyzer.initialize()
    results = analyzer.analyze_batch(TEXTS, show_progress=False).results
    assert {r.sentiment_label for r in results} <= {"负面", "中性", "正面"} and "中性" in {r.sentiment_label for r in results}
    assert all((r.sentiment_label == "中性") == (r.confidence < 0.99) for r in results)
    analysis = analyzer.analyze_query_results([{"content": t} for t in TEXTS], min_confidence=0.5)["sentiment_analysis"]
    assert len(analysis["high_confidence_results"]) == len(TEXTS)  # 中性 kept, as BettaFish's analyzer does
    binary = WeiboSentimentAnalyzer(checkpoint=checkpoint, mixed_precision="no", levels=2)
    assert binary.initialize() and {r.sentiment_label for r in binary.analyze_batch(TEXTS, show_progress=False).results} <= {"负面", "正面"}
    with pytest.raises(ValueError, match="from 0.5 to 1"):
        WeiboSentimentAnalyzer(neutral_below=0.3)
    with pytest.raises(ValueError, match="levels=4"):
        WeiboSentimentAnalyzer(levels=4)


def test_without_a_server_bettafish_goes_on_without_sentiment():
    analyzer = WeiboSentimentAnalyzer(url=f"http://127.0.0.1:{free_port()}", retries=0)
    assert analyzer.initialize() is False and analyzer.is_disabled and "ConnectError" in analyzer.disable_reason
    rows = [{"content": "好开心"}, {"content": "好难过"}]
    analysis = analyzer.analyze_query_results(rows)["sentiment_analysis"]
    assert analysis["available"] is False and analysis["reason"] == analyzer.disable_reason
    assert analysis["original_texts"] == rows and analysis["passthrough_texts"] == ["好开心", "好难过"]
    assert [result["error_message"] for result in analysis["results"]] == [analyzer.disable_reason] * 2
    assert ANALYSIS_KEYS <= set(analysis) and analysis["success_rate"] == "0/2"
    single = analyzer.analyze_single_text("好开心")
    assert not single.success and not single.analysis_performed and single.error_message == analyzer.disable_reason


def test_the_client_splits_by_count_and_bytes_and_reports_each_bad_text(server, checkpoint):
    texts = TEXTS + ["开心" * 45] * 30 + ["", "好" * 101, "x" * 5000]  # 60 + 30 two-hundred-byte texts, then three bad ones
    with SentimentClient(server.url) as client:
        assert client.limits["max_texts_per_request"] == 20 and client.limits["max_body_bytes"] == 4000
        requests_before = server.metric("weibo_senti_requests_total")
        results = client.score(texts)
        requests = server.metric("weibo_senti_requests_total") - requests_before
    assert len(results) == len(texts) and requests >= 7  # 60 by count (3) and 30 x 200 bytes by size (2+), and the rest
    expected = Classifier.load(checkpoint, mixed_precision="no").predict(texts[:90])
    for got, want in zip(results, expected):
        assert got["label"] == want["label"] and got["prob_positive"] == pytest.approx(want["prob_positive"], abs=1e-5)
    assert "empty" in results[90]["error"] and results[91]["truncated"] and results[92]["truncated"]  # cut to the server's 100
    with SentimentClient(server.url, model="nope") as client, pytest.raises(RequestRejected, match="unknown_model"):
        client.score(["好"])


def test_the_client_waits_for_a_server_that_is_still_starting(checkpoint):
    port = free_port()
    process = subprocess.Popen([sys.executable, str(REPO_ROOT / "serve.py"), "--checkpoint", str(checkpoint), "--port", str(port),
                                "--log-level", "warning", "--mixed-precision", "no", "--backend", "torch"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        with SentimentClient(f"http://127.0.0.1:{port}", retries=8) as client:  # refused, then 503 not_ready, then answered
            assert [result["label"] for result in client.score(TEXTS[:5])] == [r["label"] for r in Classifier.load(checkpoint).predict(TEXTS[:5])]
        with SentimentClient(f"http://127.0.0.1:{free_port()}", retries=1, max_retry_wait_s=0.1) as client, \
                pytest.raises(ServiceUnavailable, match="no answer after 2 tries"):
            client.score(["好"])
    finally:
        process.terminate()
        process.wait(timeout=60)


def test_a_256_text_request_to_the_default_classifier_in_fp32_is_answered_in_full():
    """The default (shipped e5) classifier, the CPU forced to fp32: no 504 for a full request within the limits."""
    texts = pd.read_csv(REPO_ROOT / "dataset" / "weibo_senti_100k.csv", nrows=256)["review"].str.replace(r"\[[^\]]*\]", "", regex=True).tolist()
    server = Server("--mixed-precision", "no", "--backend", "torch")
    try:
        answer = httpx.post(server.url + "/api/sentiment", json={"texts": texts, "per_text_errors": True}, timeout=600)
        assert answer.status_code == 200, answer.text
        assert answer.json()["summary"]["total"] == 256 and answer.json()["summary"]["failed"] == sum(not t.strip() for t in texts)
    finally:
        assert server.stop() == 0


def test_one_outage_does_not_switch_sentiment_off_for_good(checkpoint):
    port = free_port()
    analyzer = WeiboSentimentAnalyzer(url=f"http://127.0.0.1:{port}", retries=0, retry_start_every_s=0.5)
    assert analyzer.initialize() is False and analyzer.is_disabled
    rows = [{"content": text} for text in TEXTS[:5]]
    assert analyzer.analyze_query_results(rows)["sentiment_analysis"]["available"] is False
    server = Server("--checkpoint", checkpoint, "--mixed-precision", "no", "--backend", "torch", port=port)
    try:
        time.sleep(0.6)
        analysis = analyzer.analyze_query_results(rows)["sentiment_analysis"]  # the next call starts it again
        assert "available" not in analysis and analysis["success_rate"] == "5/5" and analyzer.is_initialized
    finally:
        assert server.stop() == 0
    analyzer.disable("switched off by hand")
    assert analyzer.initialize() is False and analyzer.start_failed_at is None  # disabled on purpose: never retried


def test_bettafish_s_own_switch_and_an_analyzer_not_yet_started(checkpoint, monkeypatch):
    off = WeiboSentimentAnalyzer(checkpoint=checkpoint, enabled=False)
    assert off.is_disabled and off.disable_reason == SWITCHED_OFF and not off.initialize() and not off.enable()
    monkeypatch.setenv("SENTIMENT_ANALYSIS_ENABLED", "False")
    assert WeiboSentimentAnalyzer(checkpoint=checkpoint).disable_reason == SWITCHED_OFF
    monkeypatch.delenv("SENTIMENT_ANALYSIS_ENABLED")
    waiting = WeiboSentimentAnalyzer(checkpoint=checkpoint)
    result = waiting.analyze_single_text("好开心")
    assert result.sentiment_label == "未初始化" and not result.success and "initialize()" in result.error_message
    assert waiting.get_model_info()["device"] == "未设置"


@pytest.mark.parametrize("rows", [15 * 50, 500])  # search_topic_globally: 15 tables x 50 rows; a comment query: 500
def test_insightengine_s_largest_queries_are_scored_in_full(server, checkpoint, rows):
    texts = [f"{TEXTS[i % len(TEXTS)]}{i}" for i in range(rows)]
    analyzer = WeiboSentimentAnalyzer(url=server.url)
    assert analyzer.initialize()
    analysis = analyzer.analyze_query_results([{"content": text, "note_id": i} for i, text in enumerate(texts)])["sentiment_analysis"]
    assert analysis["success_rate"] == f"{rows}/{rows}" and len(analysis["high_confidence_results"]) == rows
    expected = Classifier.load(checkpoint, mixed_precision="no").predict(texts)
    got = {entry["original_data"]["note_id"]: entry["confidence"] for entry in analysis["high_confidence_results"]}
    assert all(got[i] == pytest.approx(want["confidence"], abs=1e-5) for i, want in enumerate(expected))


def test_one_post_gets_one_answer_from_the_analyzer_and_from_score_py(server, checkpoint, tmp_path):
    """A stand-in with InsightEngine's call pattern (the module-level analyzer the docs' swap makes, then
    analyze_query_results over a query's rows) and score.py over the same 50 posts in a table: the same model, the same
    confidences, and labels that agree (the analyzer's level is read off score.py's label and confidence by the bands)."""
    import sqlalchemy as sa

    from weibo_senti.checkpoint import model_name

    posts = pd.DataFrame({"note_id": range(1, 51), "content": [f"{TEXTS[i]}{i}" for i in range(50)]})
    url = f"sqlite:///{tmp_path / 'media_crawler.db'}"
    posts.to_sql("weibo_note", sa.create_engine(url), index=False)

    multilingual_sentiment_analyzer = WeiboSentimentAnalyzer(url=server.url)  # the line the docs' swap writes
    multilingual_sentiment_analyzer.initialize()
    rows = posts.to_dict("records")  # what InsightEngine's query tools hand to _perform_sentiment_analysis
    analysis = multilingual_sentiment_analyzer.analyze_query_results(rows, text_field="content", min_confidence=0.5)["sentiment_analysis"]
    by_post = {entry["original_data"]["note_id"]: entry for entry in analysis["high_confidence_results"]}

    done = subprocess.run([sys.executable, str(REPO_ROOT / "score.py"), "--input", url, "--table", "weibo_note", "--id-column",
                           "note_id", "--checkpoint", str(checkpoint), "--mixed-precision", "no", "--backend", "torch"],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    with sa.create_engine(url).connect() as connection:
        stored = connection.execute(sa.text("select id, label, sentiment, confidence, model from weibo_note_sentiment")).all()
    assert len(stored) == len(by_post) == 50
    assert {model for *_, model in stored} == {multilingual_sentiment_analyzer.get_model_info()["model_name"]} == {model_name(checkpoint)}
    for note_id, label, sentiment, confidence, _ in stored:
        entry = by_post[int(note_id)]
        assert entry["confidence"] == pytest.approx(confidence, abs=1e-5)
        assert entry["sentiment"] == level_of(label, confidence, DEFAULT_BANDS) and sentiment == ("正面" if label else "负面")
