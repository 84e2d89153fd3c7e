"""The deployment benchmarks of bench/, each in its smoke mode: they run and report what they promise."""
import json

import pytest

from conftest import run_script
from weibo_senti import REPO_ROOT


def test_benchmark_smoke_mode_runs_and_prints_every_ratio():
    result = run_script(REPO_ROOT / "bench" / "run.py", "--smoke")
    assert result.returncode == 0, result.stderr[-3000:]
    for measure in ("training samples/s", "val macro-F1 after equal training", "ours batched vs reference one-by-one",
                    "checkpoint bytes", "peak RSS MB, training", "LoRA merged vs plain base", "adapter vs plain base"):
        assert measure in result.stdout


def test_serve_load_smoke_mode_measures_every_server(trained):
    checkpoint = trained("bert_lora")[0] / "best"
    result = run_script(REPO_ROOT / "bench" / "serve_load.py", "--smoke", "--checkpoint", checkpoint, "--adapters", "2")
    assert result.returncode == 0, result.stderr[-3000:]
    for line in ("ours ", "ours fp32", "original", "RSS, 2 shared", "RSS, 2 copies", '"texts_per_s"'):
        assert line in result.stdout
    assert '"errors": {}' in result.stdout


def test_score_scale_smoke_mode_measures_rate_and_memory(trained):
    checkpoint = trained("adapter_tuning")[0] / "best"
    result = run_script(REPO_ROOT / "bench" / "score_scale.py", "--smoke", "--engines", "local", "--checkpoint", checkpoint)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "300 rows" in result.stdout and "600 rows" in result.stdout and "peak RSS" in result.stdout


def test_expected_calibration_error_is_the_gap_between_confidence_and_accuracy():
    import numpy as np

    from weibo_senti.data import expected_calibration_error

    right = np.array([True] * 9 + [False])
    assert expected_calibration_error(np.full(10, 0.9), right, 10) == pytest.approx(0.0)  # says 0.9, right 9 of 10
    assert expected_calibration_error(np.full(10, 0.99), right, 10) == pytest.approx(0.09)  # overstates by 0.09


def test_inference_bench_measures_every_path_and_keys_the_results_by_cpu_kind(trained, tmp_path):
    import shutil

    checkpoint = shutil.copytree(trained("lora")[0] / "best", tmp_path / "lora")
    result = run_script(REPO_ROOT / "bench" / "inference.py", "--checkpoint", checkpoint, "--texts", "40", "--ctranslate2", "",
                        "--out", tmp_path / "inference")
    assert result.returncode == 0, result.stderr[-3000:]
    runs = json.loads((tmp_path / "inference.json").read_text(encoding="utf-8"))
    (kind, run), = runs.items()
    assert kind == run["machine"]["kind"] and "avx2" in run["machine"]["flags"]
    paths = [row["path"] for row in run["classifiers"][0]["paths"]]
    assert paths[0] == "PyTorch fp32" and paths[-2:] == ["ONNX Runtime fp32", "ONNX Runtime int8"]
    assert run["classifiers"][0]["paths"][-2]["without_tags"]["identical_labels"] == 1.0  # fp32 through either runtime
    assert "**auto picks:**" in (tmp_path / "inference.md").read_text(encoding="utf-8")
