"""The studies of studies/, each on a tiny model: they still run and write what their README says."""
import json
import shutil

import pytest

from conftest import run_script
from weibo_senti import REPO_ROOT




def test_tfidf_baseline_scores_both_fits_with_and_without_emoticons(weibo_csv):
    result = run_script(REPO_ROOT / "studies" / "tfidf_baseline" / "tfidf_baseline.py", "--data", weibo_csv, "--min-df", "1")
    assert result.returncode == 0, result.stderr[-3000:]
    rows = [line.split() for line in result.stdout.splitlines() if line.startswith("training texts")]
    assert len(rows) == 2 and all(0.0 <= float(value) <= 1.0 for row in rows for value in row[-4:])


def test_no_tag_errors_reports_accuracy_by_length_and_the_surest_errors(trained, weibo_csv, tmp_path):
    checkpoint = trained("adapter_tuning")[0] / "best"
    out = tmp_path / "no_tag_errors"
    result = run_script(REPO_ROOT / "studies" / "no_tag_errors" / "no_tag_errors.py", "--checkpoint", checkpoint, "--data", weibo_csv,
                        "--out", out, "--shown", "5")
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(out.with_suffix(".json").read_text(encoding="utf-8"))
    assert sum(row["texts"] for row in report["accuracy_by_length_without_tags"]) == report["texts"]
    assert len(report["surest_errors"]) == min(5, report["errors"])
    assert all((e["p_positive"] >= 0.5) != (e["label"] == 1) for e in report["surest_errors"])
    assert "| characters left | texts | accuracy |" in out.with_suffix(".md").read_text(encoding="utf-8")
    thresholds = report["by_min_confidence_without_tags"]
    assert thresholds[0] == {"min_confidence": 0.5, "share_kept": 1.0, "accuracy_of_kept": report["accuracy_no_tags"]}
    assert [row["share_kept"] for row in thresholds] == sorted((row["share_kept"] for row in thresholds), reverse=True)
    assert 0 <= report["expected_calibration_error_without_tags"] <= 0.5


def test_selection_rule_keeps_the_checkpoint_best_without_tags_on_the_half_that_chooses(trained, tmp_path):
    output_dir, log = trained("adapter_tuning")
    out = tmp_path / "selection.json"
    result = run_script(REPO_ROOT / "studies" / "selection_rule" / "selection_rule.py", output_dir / "last", output_dir / "best", "--out", out)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(out.read_text(encoding="utf-8"))
    assert [row["epoch"] for row in report["checkpoints"]] == [len(log), json.loads((output_dir / "best" / "checkpoint.json").read_text())["epoch"]]
    fit = [row["fit_half"]["macro_f1"] for row in report["checkpoints"]]
    assert report["kept"] == report["checkpoints"][fit.index(max(fit))]["checkpoint"]  # the first listed of equals
    assert report["checkpoints"][0]["fit_half"]["macro_f1"] == pytest.approx(log[-1]["val_no_emoticons_fit_macro_f1"], abs=0.03)


def test_length_bench_scores_the_longest_texts_at_each_cut(trained, weibo_csv, tmp_path):
    checkpoint = trained("bert_lora")[0] / "best"
    out = tmp_path / "length"
    result = run_script(REPO_ROOT / "studies" / "length" / "length.py", "--checkpoint", checkpoint, "--data", weibo_csv, "--lengths", "8,64",
                        "--out", out)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(out.with_suffix(".json").read_text(encoding="utf-8"))
    assert [row["max_length"] for row in report["by_length"]] == [8, 64] and report["tokens_without_tags"]["scored_texts"] == 4
    for row in report["by_length"]:
        assert set(row) == {"max_length", "without_tags", "with_tags", "joined"}
        assert all(0 <= row[name]["accuracy"] <= 1 and row[name]["texts_per_second"] > 0 for name in ("without_tags", "with_tags", "joined"))
    assert report["cpu"]["kind"] in ("bf16", "vnni", "avx2", "other")
    assert "| max_length |" in out.with_suffix(".md").read_text(encoding="utf-8")


def test_linear_probe_bench_scores_each_prefix_and_pooling(tiny_models, weibo_csv, tmp_path):
    out = tmp_path / "probe"
    result = run_script(REPO_ROOT / "studies" / "linear_probe" / "linear_probe.py", "--model", tiny_models["bert"], "--data", weibo_csv,
                        "--train-texts", "60", "--val-texts", "20", "--prefixes", "none,query: ", "--out", out)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = json.loads(out.with_suffix(".json").read_text(encoding="utf-8"))["rows"]
    assert [(row["prefix"], row["pooling"]) for row in rows] == [("(none)", "cls"), ("(none)", "mean"), ("query: ", "cls"), ("query: ", "mean")]
    assert all(0 <= row[name]["accuracy"] <= 1 for row in rows for name in ("with_tags", "without_tags"))
    assert "| `query: ` | mean |" in out.with_suffix(".md").read_text(encoding="utf-8")


def test_int8_sensitivity_quantizes_each_kind_of_matrix_alone_then_all_then_smoothed_then_as_the_product_does(trained, tmp_path):
    checkpoint = trained("bert_lora")[0] / "best"
    out = tmp_path / "int8"
    result = run_script(REPO_ROOT / "studies" / "int8_sensitivity" / "int8_sensitivity.py", "--checkpoint", checkpoint,  # the data set in dataset/
                        "--texts", "20", "--calibration-texts", "16", "--smooth-alphas", "0.5", "--out", out)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = json.loads(out.with_suffix(".json").read_text(encoding="utf-8"))["rows"]
    *alone, everything, smoothed, split, seven_bits, product = rows
    assert "outlier input channels split off" in split["quantized"] and "7-bit" in seven_bits["quantized"]
    assert product["quantized"].endswith("(what --backend onnx-int8 runs)") and 0 <= product["rechecked"] <= 1
    kinds = [row["quantized"] for row in alone]
    assert "bert/encoder/attention/self/query" in kinds and "bert/encoder/intermediate/dense" in kinds
    assert everything["matrices"] == smoothed["matrices"] == sum(row["matrices"] for row in alone)
    assert smoothed["quantized"].endswith("SmoothQuant at a = 0.5")
    assert all(0 <= row["identical_labels"] <= 1 for row in rows)
    assert "| int8 on |" in out.with_suffix(".md").read_text(encoding="utf-8")


def test_onnx_profile_sums_each_operators_time_for_fp32_and_int8(trained, weibo_csv, tmp_path):
    import shutil

    checkpoint = shutil.copytree(trained("bert_lora")[0] / "best", tmp_path / "bert_lora")
    out = tmp_path / "profile"
    result = run_script(REPO_ROOT / "studies" / "onnx_profile" / "onnx_profile.py", "--checkpoint", checkpoint, "--data", weibo_csv, "--texts", "20", "--out", out)
    assert result.returncode == 0, result.stderr[-3000:]
    (run,) = json.loads(out.with_suffix(".json").read_text(encoding="utf-8")).values()
    seconds = run["operator_seconds"]
    assert seconds["fp32"]["MatMul"] > 0 and "DynamicQuantizeLinear" in seconds["int8"] and "DynamicQuantizeLinear" not in seconds["fp32"]
    assert "| **all** |" in out.with_suffix(".md").read_text(encoding="utf-8")


@pytest.mark.skipif(shutil.which("valgrind") is None, reason="valgrind emulates the CPU without AVX-512 (apt-get install valgrind)")
def test_int8_avx2_kernels_runs_int8_on_an_emulated_cpu_without_avx512_and_compares_it(trained, tmp_path):
    checkpoint = shutil.copytree(trained("bert_lora")[0] / "best", tmp_path / "bert_lora", ignore=shutil.ignore_patterns("onnx"))
    out = tmp_path / "avx2.json"
    result = run_script(REPO_ROOT / "studies" / "int8_avx2_kernels" / "int8_avx2_kernels.py", "--checkpoint", checkpoint, "--texts", "4", "--shards", "1", "--out", out)
    assert result.returncode == 0, result.stderr[-3000:]  # it stops when the emulated CPU is not avx2
    entry = next(iter(json.loads(out.read_text(encoding="utf-8")).values()))
    assert entry["texts"] == 4 and "avx2" in entry["emulated"]
    for name in ("int8_alone_avx2_against_int8_here", "int8_alone_avx2_against_pytorch_fp32", "int8_with_second_look_avx2_against_pytorch_fp32"):
        assert 0 <= entry[name]["identical_labels"] <= 1 and 0 <= entry[name]["max_change_prob_positive"] <= 1
