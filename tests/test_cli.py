import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import TRAIN_SCRIPTS, run_script, script_config
from weibo_senti import REPO_ROOT

COMMON_FLAGS = ["--model", "--data", "--output-dir", "--epochs", "--batch-size", "--lr", "--warmup-ratio", "--max-length",
                "--val-fraction", "--seed", "--max-samples", "--resume", "--emoticon-drop"]


@pytest.mark.parametrize("method, extra", [
    ("adapter_tuning", ["--adapter-size"]),
    ("lora", ["--lora-r", "--lora-alpha", "--lora-dropout", "--target-modules", "--merge-to"]),
    ("bert_lora", ["--lora-r", "--lora-alpha", "--lora-dropout", "--target-modules", "--merge-to"]),
])
def test_help_lists_every_constant(method, extra):
    result = run_script(TRAIN_SCRIPTS[method], "--help")
    assert result.returncode == 0
    for flag in COMMON_FLAGS + extra:
        assert flag in result.stdout


def test_defaults_match_the_original_scripts_and_flags_override_them():
    adapter = script_config("adapter_tuning", [])
    assert (adapter.model, adapter.epochs, adapter.batch_size, adapter.lr, adapter.adapter_size) == ("uer/gpt2-chinese-cluecorpussmall", 2, 16, 5e-5, 64)
    assert adapter.data == REPO_ROOT / "dataset" / "weibo_senti_100k.csv"  # relative defaults belong to the repository
    lora = script_config("lora", ["--lora-r", "4", "--lr", "1e-3", "--data", "here.csv", "--resume"])
    assert (lora.lora_r, lora.lora_alpha, lora.lora_dropout, lora.target_modules) == (4, 32, 0.1, "c_attn,c_proj")
    assert lora.lr == 1e-3 and lora.resume is True and lora.data == Path("here.csv")  # typed paths stay relative to the caller
    bert = script_config("bert_lora", [])
    assert (bert.model, bert.target_modules, bert.epochs) == ("bert-base-chinese", "query,value", 3)


def test_bad_data_ends_with_a_message_not_a_traceback(tiny_models, tmp_path):
    bad = tmp_path / "bad.csv"
    bad.write_text("label,text\n1,好\n", encoding="utf-8")
    result = run_script(
        "train.py", "--data", bad, "--model", tiny_models["gpt2"], "--output-dir", tmp_path / "out", cwd=REPO_ROOT / "adapter_tuning"
    )
    assert result.returncode == 2
    assert result.stderr.startswith(f"error: {bad}: missing column(s) review")
    assert "Traceback" not in result.stderr


def test_missing_model_folder_ends_with_what_was_tried(weibo_csv, tmp_path):
    # a hub id that cannot be had falls back to the embedded mini model (tests/test_models.py); a folder does not
    missing = tmp_path / "no-such-model"
    result = run_script(TRAIN_SCRIPTS["lora"], "--data", weibo_csv, "--model", missing, "--output-dir", tmp_path / "out")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert f"cannot find the model '{missing}'" in result.stderr and "--model PATH" in result.stderr


def test_two_cpu_processes_through_accelerate_launch(tiny_models, weibo_csv, tmp_path):
    env = {**os.environ, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
               "--mixed_precision", "no", "--dynamo_backend", "no", str(TRAIN_SCRIPTS["adapter_tuning"]),
               "--model", str(tiny_models["gpt2"]), "--data", str(weibo_csv), "--output-dir", str(tmp_path),
               "--epochs", "2", "--lr", "1e-2"]
    result = subprocess.run(command, capture_output=True, text=True, env=env, cwd=REPO_ROOT, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "processes: 2" in result.stdout
    log = json.loads((tmp_path / "training_log.json").read_text(encoding="utf-8"))
    assert len(log) == 2
    assert round(log[-1]["val_accuracy"] * 40, 6).is_integer()  # all 40 validation rows counted once across processes
    from weibo_senti.predict import Classifier

    assert Classifier.load(tmp_path / "best").predict(["好开心[哈哈]"])[0]["label"] in (0, 1)


def test_a_data_path_that_is_not_a_file_is_named_for_what_it_is(tmp_path):
    from weibo_senti.data import DataError, read_csv_text

    with pytest.raises(DataError, match="/dev/null is not a regular file"):
        read_csv_text(Path("/dev/null"))
