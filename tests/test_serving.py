"""serve.py as a real server on a loopback port, spoken to over HTTP."""
import json
import os
import signal
import socket
import threading
import time

import httpx
import pytest

import tiny
from conftest import Server, run_script, train
from databases import free_port
from weibo_senti import REPO_ROOT
from weibo_senti.predict import Classifier

TEXTS = [text for _, text in tiny.synthetic_rows(24, seed=5)]
STRICT = ["--max-texts-per-request", "20", "--max-text-chars", "100", "--max-body-bytes", "4000"]


@pytest.fixture(scope="module")
def checkpoints(trained, tiny_models, weibo_csv, tmp_path_factory):
    """Two LoRA checkpoints of one base (different seeds) and an adapter-tuning one."""
    second = tmp_path_factory.mktemp("bert_lora_seed7")
    train("bert_lora", tiny_models["bert"], weibo_csv, second, "--epochs", "2", "--seed", "7")
    return {"a": trained("bert_lora")[0] / "best", "b": second / "best", "adapters": trained("adapter_tuning")[0] / "best"}


@pytest.fixture(scope="module")
def server(checkpoints):
    names = [f"{name}={path}" for name, path in checkpoints.items()]
    server = Server(*(arg for name in names for arg in ("--checkpoint", name)), "--mixed-precision", "no", "--backend", "torch", "--max-wait-ms", "50", *STRICT)
    yield server
    assert server.stop() == 0


def test_results_equal_predict_py(server, checkpoints):
    answer = server.post({"texts": TEXTS[:20]}).json()
    assert answer["model"] == "a"  # the first --checkpoint is the default
    script = run_script(REPO_ROOT / "bert_lora" / "predict.py", "--checkpoint", checkpoints["a"], "--mixed-precision", "no", "--backend", "torch", stdin="\n".join(TEXTS[:20]))
    expected = [json.loads(line) for line in script.stdout.splitlines()]
    assert len(expected) == len(answer["results"]) == 20
    for got, want in zip(answer["results"], expected):
        assert got["label"] == want["label"] and got["sentiment"] == want["sentiment"]
        assert got["prob_positive"] == pytest.approx(want["prob_positive"], abs=1e-5)
    summary = answer["summary"]
    assert summary["total"] == 20 and summary["positive"] == sum(r["label"] for r in expected) == 20 - summary["negative"]
    assert summary["average_confidence"] == pytest.approx(sum(r["confidence"] for r in expected) / 20, abs=1e-5)
    one = server.post({"text": TEXTS[0]}).json()
    assert one["results"][0]["label"] == expected[0]["label"] and one["summary"]["total"] == 1


def test_two_adapters_on_one_base_answer_as_their_own_checkpoints(server, checkpoints):
    models = {entry["name"]: entry for entry in httpx.get(server.url + "/api/models").json()["models"]}
    assert models["a"]["shares_base_with"] == ["b"] and models["b"]["shares_base_with"] == ["a"]
    assert models["adapters"]["shares_base_with"] == [] and models["a"]["default"] and not models["b"]["default"]
    assert models["a"]["validation"]["accuracy"] is not None and "accuracy_without_emoticons" in models["a"]["validation"]
    # concurrent requests for both names, so that batches mix the two adapters
    answers = {}

    def ask(name, i):
        answers[name, i] = server.post({"texts": TEXTS[i:i + 2], "model": name}).json()["results"]

    threads = [threading.Thread(target=ask, args=(name, i)) for i in range(0, 20, 2) for name in ("a", "b")]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for name in ("a", "b"):
        alone = Classifier.load(checkpoints[name]).predict(TEXTS[:20])
        served = [result for i in range(0, 20, 2) for result in answers[name, i]]
        for got, want in zip(served, alone):
            assert got["prob_positive"] == pytest.approx(want["prob_positive"], abs=1e-5)
    a = [r["prob_positive"] for r in Classifier.load(checkpoints["a"]).predict(TEXTS[:20])]
    b = [r["prob_positive"] for r in Classifier.load(checkpoints["b"]).predict(TEXTS[:20])]
    assert max(abs(x - y) for x, y in zip(a, b)) > 1e-3  # the two really differ, so the check above means something


def test_a_lora_checkpoint_alone_on_its_base_is_served_merged(checkpoints):
    from weibo_senti.serving import load_models

    served = load_models([("one", checkpoints["a"]), ("adapters", checkpoints["adapters"])], {"mixed_precision": "no", "backend": "torch"})
    assert served["one"].adapter is None and not hasattr(served["one"].classifier.model, "peft_config")
    want = [r["prob_positive"] for r in Classifier.load(checkpoints["a"], merge_lora=False).predict(TEXTS)]
    got = [r["prob_positive"] for r in served["one"].classifier.predict(TEXTS)]
    assert got == pytest.approx(want, abs=1e-5)


def test_concurrent_requests_are_batched_and_repeats_come_from_the_cache(server):
    batches, texts = server.metric("weibo_senti_batch_size_count"), server.metric("weibo_senti_batch_size_sum")
    threads = [threading.Thread(target=server.post, args=({"text": f"并发{i}好开心", "model": "adapters"},)) for i in range(16)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    new_batches = server.metric("weibo_senti_batch_size_count") - batches
    assert server.metric("weibo_senti_batch_size_sum") - texts == 16
    assert new_batches < 16  # several requests' texts went through one model call
    hits = server.metric("weibo_senti_cache_hits_total")
    assert server.post({"texts": ["并发3好开心", "并发4好开心"], "model": "adapters"}).status_code == 200
    assert server.metric("weibo_senti_cache_hits_total") == hits + 2
    assert server.metric("weibo_senti_batch_size_count") == batches + new_batches  # no model call for them
    assert server.metric('weibo_senti_texts_total{model="adapters"}') >= 18


@pytest.mark.parametrize(
    "body, status, words",
    [
        ({"texts": ["好"] * 21}, 413, ["21 texts", "20", "MAX_TEXTS_PER_REQUEST"]),
        ({"texts": ["好", "\x00"]}, 422, ["texts[1]", "NUL"]),
        ({"texts": ["开心" * 45] * 15}, 413, ["4,000 bytes", "MAX_BODY_BYTES"]),
        ({"texts": ["好", "  "]}, 422, ["texts[1]", "empty"]),
        ({"texts": ["好", 5]}, 422, ["texts[1]", "not text"]),
        ({"text": None, "texts": None}, 422, ['"text"', '"texts"']),
        ({"texts": "好"}, 422, ['"texts" must be a list']),
        ({"texts": []}, 422, ["empty"]),
        ({"text": "好", "model": "nope"}, 404, ["'nope'", "a, b, adapters"]),
        ({"text": "@某人 ", "clean": True}, 422, ["text", "empty after cleaning"]),
        ({"text": "好", "clean": "maybe"}, 422, ["clean"]),
    ],
)
def test_limits_and_bad_input_get_json_errors_that_name_them(server, body, status, words):
    response = server.post(body)
    assert response.status_code == status, response.text
    answer = response.json()
    assert set(answer) == {"error", "detail"} and "Traceback" not in response.text
    for word in words:
        assert word in answer["detail"]
    assert server.post({"text": "好开心[哈哈]"}).status_code == 200  # and the server goes on serving


def test_with_per_text_errors_a_bad_text_costs_only_itself(server):
    texts = ["好开心[哈哈]", "  ", "\x00", 5, "累死了"]
    answer = server.post({"texts": texts, "per_text_errors": True})
    assert answer.status_code == 200, answer.text
    results, summary = answer.json()["results"], answer.json()["summary"]
    assert [("error" in result) for result in results] == [False, True, True, True, False]
    assert "texts[1]: empty" in results[1]["error"] and "texts[2]" in results[2]["error"] and "texts[3]" in results[3]["error"]
    alone = server.post({"texts": ["好开心[哈哈]", "累死了"]}).json()["results"]
    assert [results[0], results[4]] == alone and "error" not in alone[0]
    assert summary == {"total": 5, "positive": summary["positive"], "negative": 2 - summary["positive"], "failed": 3,
                       "average_confidence": pytest.approx((alone[0]["confidence"] + alone[1]["confidence"]) / 2)}
    # a text over MAX_TEXT_CHARS (100 here) is scored on its start, and said to be
    long = server.post({"texts": ["好开心" * 40, "好开心" * 33 + "好"]}).json()["results"]
    start = server.post({"texts": [("好开心" * 40)[:100]]}).json()["results"][0]
    assert long[0] == {**start, "truncated": True} and "truncated" not in long[1]
    assert server.post({"texts": texts}).status_code == 422  # without the option: the request fails, naming texts[1]
    request = httpx.get(server.url + "/openapi.json").json()["components"]["schemas"]["SentimentRequest"]
    assert "per_text_errors" in request["properties"] and request["properties"]["per_text_errors"]["description"]


def test_malformed_bodies(server):
    for content in (b"{not json", "\ud800".encode("utf-8", "surrogatepass"), b"[1, 2]"):
        response = httpx.post(server.url + "/api/sentiment", content=content, headers={"content-type": "application/json"})
        assert response.status_code == 422 and response.json()["error"] == "invalid_request", response.text
    response = httpx.post(server.url + "/api/sentiment", content=b"x" * 5000, headers={"content-type": "application/json"})
    assert response.status_code == 413
    assert server.metric('weibo_senti_errors_total{kind="body_too_large"}') >= 1
    assert httpx.get(server.url + "/healthz").json() == {"status": "ok"}


def test_docs_health_and_metrics(server):
    assert "/api/sentiment" in httpx.get(server.url + "/openapi.json").json()["paths"]
    assert httpx.get(server.url + "/docs").status_code == 200
    assert httpx.get(server.url + "/readyz").json() == {"ready": True, "models": ["a", "b", "adapters"]}
    httpx.get(server.url + "/no/such/path")
    metrics = httpx.get(server.url + "/metrics")
    assert metrics.headers["content-type"].startswith("text/plain")
    for name in ("weibo_senti_requests_total", "weibo_senti_queue_wait_seconds_bucket", "weibo_senti_model_seconds_bucket"):
        assert name in metrics.text
    assert 'path="other"' in metrics.text and "/no/such/path" not in metrics.text


def test_full_queue_gets_503_and_a_slow_request_504(checkpoints):
    server = Server("--checkpoint", checkpoints["a"], "--max-queue", "2", "--request-timeout-s", "0.001", "--max-wait-ms", "200")
    try:
        full = server.post({"texts": ["好", "坏", "累"]})
        assert full.status_code == 503 and full.headers["retry-after"] == "1"
        assert "MAX_QUEUE" in full.json()["detail"]
        slow = server.post({"text": "好"})
        assert slow.status_code == 504 and "REQUEST_TIMEOUT_S" in slow.json()["detail"]
        assert server.metric('weibo_senti_errors_total{kind="timeout"}') == 1
        assert httpx.get(server.url + "/healthz").status_code == 200
    finally:
        assert server.stop() == 0


def test_the_deadline_bounds_the_wait_in_the_queue_not_the_work(checkpoints):
    """A request longer than REQUEST_TIMEOUT_S takes to score is answered in full once its texts reach the model; a
    request that times out waiting leaves what was scored meanwhile in the cache for its retry."""
    server = Server("--checkpoint", checkpoints["a"], "--request-timeout-s", "0.3", "--max-batch-size", "8",
                    "--forward-batch-size", "1", "--mixed-precision", "no", "--backend", "torch", "--max-texts-per-request", "512")
    try:
        texts = [f"{text}{i}" for i, text in enumerate(TEXTS * 17)][:400]
        started = time.monotonic()
        answer = server.post({"texts": texts})
        assert answer.status_code == 200 and len(answer.json()["results"]) == 400, answer.text
        assert time.monotonic() - started > 0.3  # it did take longer than the deadline
        models = httpx.get(server.url + "/api/models").json()["models"]
        from weibo_senti.checkpoint import model_name
        assert models[0]["model_id"] == model_name(checkpoints["a"])
    finally:
        assert server.stop() == 0


def test_sigterm_finishes_the_request_in_flight_and_exits_0(checkpoints):
    server = Server("--checkpoint", checkpoints["a"], "--max-wait-ms", "3000")  # a lone text waits 3 s for company
    answer = {}
    request = threading.Thread(target=lambda: answer.update(response=server.post({"text": "好开心"})))
    request.start()
    time.sleep(1)
    server.process.send_signal(signal.SIGTERM)
    refused = False
    for _ in range(20):
        try:
            httpx.get(server.url + "/healthz", timeout=1)
        except httpx.TransportError:
            refused = True
            break
        time.sleep(0.05)
    request.join(timeout=60)
    assert answer["response"].status_code == 200 and answer["response"].json()["results"][0]["label"] in (0, 1)
    assert server.process.wait(timeout=60) == 0
    assert refused  # no new connections once SIGTERM arrived


def test_a_request_on_an_idle_keep_alive_connection_after_sigterm_is_answered(checkpoints):
    """A client that reuses its pooled connection just as SIGTERM arrives (before it could see the server close it)
    gets an answer that closes the connection, not a connection dropped under its request."""
    server = Server("--checkpoint", checkpoints["a"])
    body = json.dumps({"text": "好开心"}).encode()
    request = (
        f"POST /api/sentiment HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    ).encode() + body

    def answer(sock):
        received = b""
        while b"\r\n\r\n" not in received or not received.rstrip().endswith(b"}"):
            chunk = sock.recv(65536)
            if not chunk:
                break
            received += chunk
        return received.decode(errors="replace")

    with socket.create_connection(("127.0.0.1", server.port), timeout=30) as sock:
        sock.sendall(request)
        assert answer(sock).startswith("HTTP/1.1 200")  # the connection is now idle and kept alive
        server.process.send_signal(signal.SIGTERM)
        time.sleep(0.5)
        sock.sendall(request)
        reply = answer(sock)
    assert reply.startswith("HTTP/1.1 200") and "connection: close" in reply.lower(), reply
    with pytest.raises(httpx.ConnectError):  # and no new connection is taken
        httpx.get(server.url + "/healthz", timeout=1)
    assert server.process.wait(timeout=60) == 0


def test_a_checkpoint_that_is_not_there_stops_serve_py_at_once(tmp_path):
    result = run_script(REPO_ROOT / "serve.py", "--checkpoint", f"x={tmp_path / 'missing'}")
    assert result.returncode == 2 and "missing" in result.stderr and "Traceback" not in result.stderr
    result = run_script(REPO_ROOT / "serve.py", "--checkpoint", f"x={tmp_path}", "--checkpoint", f"x={tmp_path}")
    assert result.returncode == 2 and "'x' is given twice" in result.stderr


def test_a_text_that_breaks_the_model_fails_only_its_own_request(classifier):
    """Batcher._score, the part of a batch that runs on the model thread: the batch fails, then each text alone."""
    import asyncio

    from weibo_senti.serving import Batcher, Limits, Metrics, Pending, ResultCache, ServiceError

    class Fragile(type(classifier)):
        def predict(self, texts, batch_size=64, adapter_names=None):
            if any("炸" in text for text in texts):
                raise RuntimeError("boom")
            return super().predict(texts, batch_size, adapter_names)

    classifier.__class__ = Fragile
    batcher = Batcher(classifier, Limits(), Metrics(), model_thread=None, cache=ResultCache(0))
    loop = asyncio.new_event_loop()
    outcomes = batcher._score([Pending(text, None, loop.create_future(), ("m", text)) for text in ("好开心", "炸", "难过")])
    loop.close()
    assert isinstance(outcomes[1], ServiceError) and outcomes[1].status == 500 and "boom" not in outcomes[1].message
    assert [outcome["label"] for outcome in (outcomes[0], outcomes[2])] == [r["label"] for r in classifier.predict(["好开心", "难过"])]


@pytest.mark.parametrize("flags, words", [
    (("--forward-batch-size", "-1"), "--forward-batch-size -1 (FORWARD_BATCH_SIZE): out of range"),
    (("--cache-size", "-1"), "--cache-size -1 (CACHE_SIZE): out of range"),
    (("--max-queue", "0"), "--max-queue 0 (MAX_QUEUE): out of range"),
    (("--request-timeout-s", "0"), "--request-timeout-s 0.0 (REQUEST_TIMEOUT_S): out of range"),
    (("--port", "99999"), "--port 99999 (PORT): out of range, must be a port from 1 to 65535"),
])
def test_settings_that_would_serve_nothing_are_refused_at_start(flags, words):
    result = run_script(REPO_ROOT / "serve.py", *flags)
    assert result.returncode == 2 and words in result.stderr and "Traceback" not in result.stderr, result.stderr
    assert "shipped with the repository" not in result.stderr  # no word of a default checkpoint that is not served


def test_a_checkpoint_that_cannot_load_ends_serve_py_with_one_line(trained, tmp_path):
    import shutil

    broken = shutil.copytree(trained("adapter_tuning")[0] / "best", tmp_path / "broken")
    (broken / "adapter_model.safetensors").write_bytes(b"garbage")
    result = run_script(REPO_ROOT / "serve.py", "--checkpoint", f"x={broken}", "--port", str(free_port()), "--log-level", "warning")
    assert result.returncode == 2, result.stderr[-2000:]
    assert "error: cannot load the models:" in result.stderr and "Traceback" not in result.stderr


def test_every_error_has_the_documented_shape_and_no_absolute_path(server):
    for response in (
        httpx.get(server.url + "/api/sentiment"),
        httpx.put(server.url + "/api/sentiment", json={"text": "好"}),
        httpx.get(server.url + "/no/such/path"),
        httpx.post(server.url + "/api/sentiment", content=b"\xff\xfe{", headers={"content-type": "application/json"}),
        httpx.post(server.url + "/api/sentiment", content=b"[" * 1500 + b"]" * 1500, headers={"content-type": "application/json"}),
    ):
        assert response.status_code in (400, 404, 405, 413, 422), response.text
        assert set(response.json()) == {"error", "detail"}, response.text
    models = httpx.get(server.url + "/api/models").json()["models"]
    assert all(not entry["checkpoint"].startswith("/") for entry in models), models


def test_a_client_that_leaves_mid_body_is_no_server_error(server):
    before = server.metric('weibo_senti_errors_total{kind="internal"}')
    for _ in range(5):
        with socket.create_connection(("127.0.0.1", server.port)) as sock:
            sock.sendall(b"POST /api/sentiment HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 500\r\n\r\n{\"text\":")
    time.sleep(0.5)
    assert server.post({"text": "好开心"}).status_code == 200
    assert server.metric('weibo_senti_errors_total{kind="internal"}') == before


def test_the_api_page_renders_its_operations_with_the_internet_cut_off(server):
    """/docs in a real headless Chromium whose resolver knows no host but the loopback: the page's script and style
    come from serve.py itself (the swagger-ui-bundle package), not from a CDN."""
    import shutil
    import subprocess

    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if not chromium:
        if os.environ.get("CI"):
            pytest.fail("no chromium: .ci/run installs it (apt-get install chromium)")
        pytest.skip("no chromium here (apt-get install chromium)")
    page = subprocess.run(
        [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--virtual-time-budget=20000",
         "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1", "--dump-dom", server.url + "/docs"],
        capture_output=True, text=True, timeout=120,
    )
    assert "opblock" in page.stdout and "/api/sentiment" in page.stdout, page.stderr[-2000:]
    assert "cdn.jsdelivr.net" not in httpx.get(server.url + "/docs").text
