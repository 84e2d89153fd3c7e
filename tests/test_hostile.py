"""Issue 44: nothing read from disk or the network is trusted. Damaged calibration, escaping filters, lying servers."""
import http.server
import json
import math
import shutil
import socket
import subprocess
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
from safetensors.torch import load_file, save_file

from conftest import FAST, Server, read_only, run_script, train
from weibo_senti import REPO_ROOT, onnx_backend
from weibo_senti.bettafish import WeiboSentimentAnalyzer
from weibo_senti.checkpoint import CheckpointError, atomic_file, read_info
from weibo_senti.client import BadAnswer, SentimentClient
from weibo_senti.predict import Classifier

PREDICT = REPO_ROOT / "adapter_tuning" / "predict.py"


def _with_calibration(trained, tmp_path, calibration):
    folder = tmp_path / "damaged"
    shutil.copytree(trained("adapter_tuning")[0] / "best", folder)
    info = json.loads((folder / "checkpoint.json").read_text())
    info["calibration"] = calibration
    (folder / "checkpoint.json").write_text(json.dumps(info))  # json writes NaN and Infinity as Python reads them back
    return folder


DAMAGED_CALIBRATIONS = [
    ({"temperature": -1.0, "bias": 0.0}, "calibration.temperature"),
    ({"temperature": 0.0, "bias": 0.0}, "calibration.temperature"),
    ({"temperature": math.nan, "bias": 0.0}, "calibration.temperature"),
    ({"temperature": math.inf, "bias": 0.0}, "calibration.temperature"),
    ({"temperature": "1.0", "bias": 0.0}, "calibration.temperature"),
    ({"temperature": [1.0], "bias": 0.0}, "calibration.temperature"),
    ({"temperature": 1.0, "bias": math.nan}, "calibration.bias"),
    ({"temperature": 1.0, "bias": 1e308}, "calibration.bias"),
    ({"temperature": 1.0, "bias": True}, "calibration.bias"),
    ("1.5", "'calibration'"),
    ([1.0, 0.0], "'calibration'"),
]


@pytest.mark.parametrize("calibration, field", DAMAGED_CALIBRATIONS, ids=[repr(c) for c, _ in DAMAGED_CALIBRATIONS])
def test_a_damaged_calibration_is_named_on_reading(trained, tmp_path, calibration, field):
    folder = _with_calibration(trained, tmp_path, calibration)
    with pytest.raises(CheckpointError, match="is damaged") as error:
        read_info(folder)
    assert field in str(error.value) and "checkpoint.json" in str(error.value)


@pytest.mark.parametrize("calibration", [None, {}, {"temperature": 1.3}, {"temperature": 0.7, "bias": -0.4}])
def test_a_missing_null_or_partial_calibration_is_read_as_none_for_what_is_missing(trained, tmp_path, calibration):
    read_info(_with_calibration(trained, tmp_path, calibration))


def test_predict_with_a_label_flipping_temperature_is_refused_in_one_line(trained, tmp_path):
    folder = _with_calibration(trained, tmp_path, {"temperature": -1.0, "bias": 0.0})
    result = run_script(PREDICT, "--checkpoint", folder, "--text", "又加班到半夜，心好累")
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    assert "calibration.temperature" in result.stderr and "-1.0" in result.stderr and not result.stdout.strip()


# a fake serve.py that lies or stalls: GET /api/models answers like the real one; POST /api/sentiment as a test scripts
class FakeServer:
    LIMITS = {"max_texts_per_request": 100, "max_body_bytes": 1_000_000}

    def __init__(self):
        self.sentiment = lambda texts: (200, {}, {"results": [_good() for _ in texts]})
        self.models_answer = lambda: (200, {}, {"models": [{"name": "m", "model_id": "m@1", "default": True}], "limits": self.LIMITS})
        self.calls = 0
        self.stall = threading.Event()
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):
                self._answer(*server.models_answer())

            def do_POST(self):
                server.calls += 1
                body = json.loads(self.rfile.read(int(self.headers["content-length"])))
                self._answer(*server.sentiment(body["texts"]))

            def _answer(self, status, headers, body):
                if body is STALL:
                    server.stall.wait(30)
                    return
                payload = body.encode() if isinstance(body, str) else json.dumps(body).encode()
                self.send_response(status)
                for name, value in {"content-type": "application/json", **headers}.items():
                    self.send_header(name, value)
                self.send_header("content-length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_port}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        self.stall.set()
        self.httpd.shutdown()
        self.httpd.server_close()


STALL = object()


def _good(label=1):
    return {"label": label, "sentiment": "正面", "confidence": 0.9, "prob_positive": 0.9}


@pytest.fixture
def fake_server():
    server = FakeServer()
    yield server
    server.close()


TEXTS = ["今天真开心", "又加班到半夜，心好累", "还行吧"]


@pytest.mark.parametrize("count", [2, 4])
def test_a_wrong_count_of_results_fails_those_texts_and_no_post_disappears(fake_server, count):
    fake_server.sentiment = lambda texts: (200, {}, {"results": [_good() for _ in range(count)]})
    with SentimentClient(fake_server.url, retries=0) as client:
        results = client.score(TEXTS)
    assert len(results) == 3 and all(f"answered {count} results for 3 texts" in r["error"] for r in results)
    analyzer = WeiboSentimentAnalyzer(url=fake_server.url, retries=0)
    assert analyzer.initialize()
    summary = analyzer.analyze_query_results([{"content": t} for t in TEXTS])["sentiment_analysis"]
    assert summary["success_rate"] == "0/3" and summary["total_analyzed"] == 0


@pytest.mark.parametrize("bad", [{"label": 1, "confidence": 0.9}, {"label": "x", "confidence": 0.9, "prob_positive": 0.9},
                                 {"label": 1, "confidence": None, "prob_positive": 0.9}, "正面", None, {"error": 3}])
def test_a_malformed_result_fails_its_text_only_and_the_analyzer_does_not_raise(fake_server, bad):
    fake_server.sentiment = lambda texts: (200, {}, {"results": [_good(), bad, _good(0)]})
    analyzer = WeiboSentimentAnalyzer(url=fake_server.url, retries=0)
    assert analyzer.initialize()
    batch = analyzer.analyze_batch(TEXTS, show_progress=False)
    assert [r.success for r in batch.results] == [True, False, True]
    assert "malformed" in batch.results[1].error_message and batch.results[2].sentiment_label == "非常负面"  # 0.9: very


def test_an_html_answer_is_a_named_error_and_the_analyzer_passes_the_texts_through(fake_server):
    fake_server.sentiment = lambda texts: (200, {"content-type": "text/html"}, "<html>502 Bad Gateway</html>")
    with SentimentClient(fake_server.url, retries=0) as client, pytest.raises(BadAnswer, match="not JSON"):
        client.score(TEXTS)
    analyzer = WeiboSentimentAnalyzer(url=fake_server.url, retries=0)
    assert analyzer.initialize()
    batch = analyzer.analyze_batch(TEXTS, show_progress=False)
    assert not batch.analysis_performed and "BadAnswer" in batch.results[0].error_message
    fake_server.models_answer = lambda: (200, {"content-type": "text/html"}, "<html>login</html>")
    assert not WeiboSentimentAnalyzer(url=fake_server.url, retries=0).initialize()


@pytest.mark.parametrize("retry_after", ["Wed, 21 Oct 2015 07:28:00 GMT", "-1", "nan", "soon"])
def test_any_retry_after_is_waited_on_or_ignored_never_a_crash(fake_server, retry_after):
    answers = iter([(503, {"retry-after": retry_after}, {"error": "busy", "detail": "queue full"})])
    fake_server.sentiment = lambda texts: next(answers, (200, {}, {"results": [_good() for _ in texts]}))
    with SentimentClient(fake_server.url, retries=1, max_retry_wait_s=0.5) as client:
        assert [r["label"] for r in client.score(TEXTS)] == [1, 1, 1]
    assert fake_server.calls == 2


def test_a_server_that_never_answers_is_given_up_on_by_the_deadline(fake_server):
    fake_server.models_answer = lambda: (200, {}, STALL)
    began = time.monotonic()
    analyzer = WeiboSentimentAnalyzer(url=fake_server.url, retries=3, timeout_s=1.0, deadline_s=2.5)
    assert not analyzer.initialize() and "deadline" in analyzer.disable_reason
    assert time.monotonic() - began < 6


# the ONNX export cache: what it records is checked at load; a stale, tampered or damaged export is made again
@pytest.fixture
def exported(trained, tmp_path):
    """A copy of the tiny adapter checkpoint on its own copy of the base model, exported once."""
    base = shutil.copytree(Path(read_info(trained("adapter_tuning")[0] / "best")["base_model_path"]), tmp_path / "base")
    folder = shutil.copytree(trained("adapter_tuning")[0] / "best", tmp_path / "checkpoint", ignore=shutil.ignore_patterns("onnx"))
    info = json.loads((folder / "checkpoint.json").read_text())
    (folder / "checkpoint.json").write_text(json.dumps({**info, "base_model_path": str(base), "base_model": str(base)}))
    Classifier.load(folder, backend="onnx")
    return folder, base, onnx_backend.cache_folder(folder)


def _garbage(path):
    path.write_bytes(b"\x00garbage" * 10)


def _truncate(path):
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _append_neg_node(path):
    import onnx

    graph = onnx.load(str(path))
    graph.graph.node.append(onnx.helper.make_node("Neg", ["logits"], ["negated"]))
    graph.graph.output[0].name = "negated"
    onnx.save(graph, str(path))


DAMAGES = {
    "model.onnx garbage": lambda cache: _garbage(cache / "model.onnx"),
    "model.onnx truncated": lambda cache: _truncate(cache / "model.onnx"),
    "model.onnx missing": lambda cache: (cache / "model.onnx").unlink(),
    "model.onnx with a Neg appended": lambda cache: _append_neg_node(cache / "model.onnx"),
    "model.int8.onnx garbage": lambda cache: _garbage(cache / "model.int8.onnx"),
    "export.json not JSON": lambda cache: (cache / "export.json").write_text("{not json"),
    "export.json empty object": lambda cache: (cache / "export.json").write_text("{}"),
    "export.json a bad margin": lambda cache: (cache / "export.json").write_text(json.dumps(
        {**json.loads((cache / "export.json").read_text()), "int8": {"recheck_margin": "x"}})),
}


@pytest.mark.parametrize("damage", list(DAMAGES))
def test_a_damaged_or_tampered_export_is_made_again_and_scores_as_pytorch(exported, damage, capsys):
    folder, _, cache = exported
    DAMAGES[damage](cache)
    capsys.readouterr()
    for backend in ("onnx", "onnx-int8"):
        onnx_run = Classifier.load(folder, backend=backend)
        said = capsys.readouterr().err
        if backend == "onnx":
            assert "exporting it again" in said and str(cache) in said
        assert onnx_run.onnx.path.parent == cache
        reference = Classifier.load(folder, backend="torch", mixed_precision="no").probabilities(TEXTS)
        assert np.array_equal(onnx_run.probabilities(TEXTS).argmax(1), reference.argmax(1))


def test_an_export_of_base_weights_changed_in_place_is_made_again(exported, capsys):
    folder, base, cache = exported
    weights = next(base.glob("*.safetensors"))
    tensors = load_file(weights)
    save_file({name: -tensor if tensor.is_floating_point() else tensor for name, tensor in tensors.items()}, weights,
              metadata={"format": "pt"})
    capsys.readouterr()
    onnx_run = Classifier.load(folder, backend="onnx")
    assert "other base-model weights" in capsys.readouterr().err
    reference = Classifier.load(folder, backend="torch", mixed_precision="no").probabilities(TEXTS)
    np.testing.assert_allclose(onnx_run.probabilities(TEXTS), reference, atol=1e-4)


def test_a_sound_export_inside_a_read_only_checkpoint_is_used_not_redone(exported, tmp_path, monkeypatch, capsys):
    folder, _, cache = exported
    monkeypatch.setenv(onnx_backend.CACHE_ENV_VAR, str(tmp_path / "elsewhere"))
    with read_only(folder):
        capsys.readouterr()
        onnx_run = Classifier.load(folder, backend="onnx")
        assert "exporting" not in capsys.readouterr().err and onnx_run.onnx.path.parent == cache
    assert not (tmp_path / "elsewhere").exists()


# read-only and full disks
def test_onnx_with_a_read_only_checkpoint_and_a_read_only_cache_is_one_line(trained, tmp_path, read_only_dir):
    folder = shutil.copytree(trained("adapter_tuning")[0] / "best", tmp_path / "checkpoint", ignore=shutil.ignore_patterns("onnx"))
    with read_only(folder):
        result = run_script(PREDICT, "--checkpoint", folder, "--backend", "onnx", "--text", "今天好开心",
                            env_extra={onnx_backend.CACHE_ENV_VAR: str(read_only_dir / "cache")})
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    assert "cannot write the ONNX export" in result.stderr and onnx_backend.CACHE_ENV_VAR in result.stderr


def test_score_py_into_a_read_only_folder_is_one_line_and_writes_nothing(trained, tmp_path, read_only_dir):
    posts = tmp_path / "posts.csv"
    posts.write_text("id,text\n1,今天好开心\n2,心好累\n", encoding="utf-8")
    result = run_script(REPO_ROOT / "score.py", "--input", posts, "--output", read_only_dir / "scored.csv",
                        "--checkpoint", trained("adapter_tuning")[0] / "best")
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    assert "cannot be written" in result.stderr and not list(read_only_dir.iterdir())


@pytest.fixture
def full_disk(tmp_path):
    """A 64 KiB tmpfs: a disk that fills (root only; skipped where it cannot be mounted)."""
    folder = tmp_path / "full"
    folder.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(folder)], capture_output=True).returncode:
        pytest.skip("cannot mount a small tmpfs here")
    yield folder
    subprocess.run(["umount", str(folder)], check=True)


def test_a_full_disk_leaves_no_temporary_file_behind(full_disk):
    with pytest.raises(OSError, match="No space left"):
        with atomic_file(full_disk / "out.json") as handle:
            handle.write("x" * 1_000_000)
    assert not list(full_disk.iterdir())


def test_slow_clients_are_disconnected_and_the_server_keeps_answering(trained):
    server = Server("--checkpoint", trained("adapter_tuning")[0] / "best", "--backend", "torch", "--request-read-timeout-s", "2")
    try:
        slow = []
        for i in range(20):
            connection = socket.create_connection(("127.0.0.1", server.port))
            connection.sendall(b"POST /api/sentiment HTTP/1.1\r\nHost: x\r\n" if i % 2 else b"P")
            slow.append(connection)
        began = time.monotonic()
        open_ones = list(slow)
        while open_ones and time.monotonic() - began < 8:
            for connection in list(open_ones):
                try:
                    connection.sendall(b"X")  # a byte every half second: never a whole request
                except OSError:
                    open_ones.remove(connection)
            time.sleep(0.5)
        assert not open_ones, f"{len(open_ones)} of 20 slow connections still open after {time.monotonic() - began:.0f} s"
        assert server.post({"texts": ["今天好开心"]}).status_code == 200
        # a request sent in full within the bound, on a connection opened earlier, is answered
        with httpx.Client(base_url=server.url) as client:
            assert client.post("/api/sentiment", json={"texts": ["心好累"]}).status_code == 200
            time.sleep(1)
            assert client.post("/api/sentiment", json={"texts": ["还行"]}).status_code == 200
    finally:
        for connection in slow:
            connection.close()
        assert server.stop() == 0


def test_a_spark_run_refused_for_its_jdbc_driver_makes_no_output_table(trained, tmp_path, mariadb_url):
    import pandas as pd
    import sqlalchemy as sa

    crawl = f"sqlite:///{tmp_path / 'crawl.db'}"
    pd.DataFrame({"note_id": [1, 2], "content": ["今天好开心", "心好累"]}).to_sql("weibo_note", sa.create_engine(crawl), index=False)
    result = run_script(REPO_ROOT / "score.py", "--engine", "spark", "--input", crawl, "--table", "weibo_note", "--id-column",
                        "note_id", "--output", mariadb_url, "--output-table", "refused_run", "--checkpoint",
                        trained("adapter_tuning")[0] / "best")
    assert result.returncode == 2 and "JDBC driver jar" in result.stderr, result.stderr
    engine = sa.create_engine(mariadb_url)
    assert not [name for name in sa.inspect(engine).get_table_names() if name.startswith("refused_run")]
    engine.dispose()


def test_the_client_names_a_failed_text_by_its_place_in_the_callers_list(fake_server):
    fake_server.LIMITS = {"max_texts_per_request": 2, "max_body_bytes": 1_000_000}
    fake_server.sentiment = lambda texts: (200, {}, {"results": [
        {"error": f"texts[{i}]: empty"} if not text.strip() else _good() for i, text in enumerate(texts)]})
    with SentimentClient(fake_server.url, retries=0) as client:
        results = client.score(["好", "好", "好", " "])  # the blank one is the second text of the second request
    assert results[3]["error"] == "texts[3]: empty" and all("error" not in r for r in results[:3])


# the smaller cases: each refused early, in one line, naming what is wrong
def test_refusals_come_before_the_work_and_name_the_right_flag(tiny_models, weibo_csv, trained, tmp_path):
    lora_train = REPO_ROOT / "lora" / "train.py"
    common = ["--model", tiny_models["gpt2"], "--data", weibo_csv, "--human-data", "none", "--epochs", "1"]
    cases = [
        (lora_train, [*common, "--output-dir", tmp_path / "merge", "--merge-to", tmp_path], "--merge-to"),
        (REPO_ROOT / "bert_lora" / "train.py", ["--model", tiny_models["bert"], "--data", weibo_csv, "--human-data", "none",
                                                "--output-dir", tmp_path / "teacher", "--teacher", tmp_path / "missing"], "--teacher"),
        (REPO_ROOT / "compare.py", [trained("lora")[0] / "best", "--extra", tmp_path / "missing.csv"], "file not found"),
        (REPO_ROOT / "compare.py", [trained("lora")[0] / "best", "--backend", "tensorrt"], "--backend tensorrt"),
        (REPO_ROOT / "serve.py", ["--checkpoint", trained("lora")[0] / "best", "--backend", "tensorrt"], "--backend tensorrt"),
        (REPO_ROOT / "score.py", ["--input", weibo_csv, "--output", tmp_path / "s.csv", "--backend", "tensorrt"], "--backend tensorrt"),
    ]
    for script, args, named in cases:
        result = run_script(script, *args)
        assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
        assert named in result.stderr and "epoch 1" not in result.stderr + result.stdout, result.stderr
        assert "--checkpoint" not in result.stderr or script.name != "train.py"
        assert "ChineseNlpCorpus" not in result.stderr and "Uvicorn running" not in result.stderr
    assert not (tmp_path / "merge").exists() and not (tmp_path / "teacher").exists()


def test_a_refused_run_leaves_no_empty_output_folder(tiny_models, tmp_path):
    train_script = REPO_ROOT / "adapter_tuning" / "train.py"
    for args in (["--data", "/dev/null"], ["--resume"]):
        out = tmp_path / "never"
        result = run_script(train_script, "--model", tiny_models["gpt2"], "--human-data", "none", "--output-dir", out, *args)
        assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
        assert not out.exists(), f"{args}: {list(out.iterdir())}"


def test_a_resume_in_another_precision_is_said_or_refused(tiny_models, weibo_csv, tmp_path):
    from weibo_senti.models import resolve_mixed_precision

    here = resolve_mixed_precision("auto", "cpu")[0]
    other = "no" if here == "bf16" else "bf16"
    train("adapter_tuning", tiny_models["gpt2"], weibo_csv, tmp_path / "run", "--epochs", "1", "--mixed-precision", other)
    args = ["--model", tiny_models["gpt2"], "--data", weibo_csv, "--human-data", "none", "--output-dir", tmp_path / "run",
            *FAST, "--epochs", "2", "--resume"]
    result = run_script(REPO_ROOT / "adapter_tuning" / "train.py", *args)
    assert result.returncode == 2 and f"trained in {other}" in result.stderr and f"--mixed-precision {other}" in result.stderr
    result = run_script(REPO_ROOT / "adapter_tuning" / "train.py", *args, "--mixed-precision", here)
    assert result.returncode == 0 and f"trained in {other} so far; it goes on in {here}, as asked" in result.stdout + result.stderr


def test_a_body_that_is_not_json_text_is_422_as_documented(trained):
    server = Server("--checkpoint", trained("adapter_tuning")[0] / "best", "--backend", "torch")
    try:
        for body in (b'{"texts": ["\xff\xfe"]}', b"[" * 100_000 + b"]" * 100_000, b"{bad"):
            answer = httpx.post(server.url + "/api/sentiment", content=body, headers={"content-type": "application/json"})
            assert answer.status_code == 422 and answer.json()["error"] == "invalid_request", answer.text
    finally:
        assert server.stop() == 0
