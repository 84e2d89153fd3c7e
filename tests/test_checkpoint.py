import json
import os
import shutil
import stat

import pytest

import tiny
from conftest import run_script
from weibo_senti import REPO_ROOT
from weibo_senti.checkpoint import CheckpointError, atomic_directory, find_checkpoint, load_checkpoint, write_checkpoint
from weibo_senti.predict import Classifier


def test_interrupted_write_leaves_the_previous_best_loadable(trained, tmp_path, monkeypatch):
    output_dir, _ = trained("adapter_tuning")
    model, tokenizer, info = load_checkpoint(output_dir / "best")
    best = tmp_path / "best"
    write_checkpoint(best, model, tokenizer, info)
    before = Classifier.load(best).probabilities(["好开心[哈哈]"])

    def crash_halfway(tensors, path, metadata=None):
        open(path, "wb").write(b"half a file")
        raise OSError("disk full")

    monkeypatch.setattr("adapter_tuning.adapter.save_file", crash_halfway)
    with pytest.raises(CheckpointError, match="disk full; the previous .* is unchanged"):
        write_checkpoint(best, model, tokenizer, {**info, "epoch": 99})
    assert json.loads((best / "checkpoint.json").read_text())["epoch"] == info["epoch"]
    assert [p.name for p in tmp_path.iterdir()] == ["best"]  # no half-written folder left behind
    assert Classifier.load(best).probabilities(["好开心[哈哈]"]) == pytest.approx(before)


def test_checkpoint_files_are_as_readable_as_any_file_the_user_writes(trained, tmp_path):
    model, tokenizer, info = load_checkpoint(trained("lora")[0] / "best")
    write_checkpoint(tmp_path / "best", model, tokenizer, info)
    umask = os.umask(0)
    os.umask(umask)
    for path in [tmp_path / "best", *(tmp_path / "best").iterdir()]:
        expected = (0o777 if path.is_dir() else 0o666) & ~umask
        assert stat.S_IMODE(path.stat().st_mode) == expected, path.name  # safetensors alone would make the weights 0600


def test_crash_between_the_two_renames_is_found_through_the_previous_copy(tmp_path):
    final = tmp_path / "best"
    with atomic_directory(final) as tmp:
        (tmp / "weights").write_text("old")
    final.rename(tmp_path / "best.previous")  # what a crash right after the first rename leaves
    assert find_checkpoint(final) == tmp_path / "best.previous"
    with atomic_directory(final) as tmp:
        (tmp / "weights").write_text("new")
    assert (final / "weights").read_text() == "new" and not (tmp_path / "best.previous").exists()


def test_missing_checkpoint(tmp_path):
    with pytest.raises(CheckpointError, match="no checkpoint at .*train one first"):
        Classifier.load(tmp_path / "nothing")


def test_folder_that_is_not_a_checkpoint(tmp_path):
    (tmp_path / "random").mkdir()
    with pytest.raises(CheckpointError, match="neither a checkpoint of this toolkit"):
        Classifier.load(tmp_path / "random")


def test_checkpoint_of_another_method(trained):
    output_dir, _ = trained("lora")
    with pytest.raises(CheckpointError, match="holds a lora checkpoint; use lora/predict.py"):
        Classifier.load(output_dir / "best", expected_method="bert_lora")


@pytest.mark.parametrize("method", ["adapter_tuning", "lora"])
def test_corrupt_weights_file_is_named(trained, tmp_path, method):
    output_dir, _ = trained(method)
    copy = shutil.copytree(output_dir / "best", tmp_path / "best")
    weights = next(copy.glob("*.safetensors"))
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(CheckpointError, match=f"{copy}: cannot load the trained weights"):
        Classifier.load(copy)


def test_corrupt_checkpoint_json_is_named(trained, tmp_path):
    output_dir, _ = trained("adapter_tuning")
    copy = shutil.copytree(output_dir / "best", tmp_path / "best")
    (copy / "checkpoint.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="checkpoint.json is damaged"):
        Classifier.load(copy)


def test_base_model_folder_is_not_taken_for_a_classifier(tiny_models):
    with pytest.raises(CheckpointError, match="is a base model .*not a trained classifier"):
        Classifier.load(tiny_models["gpt2"])



@pytest.mark.parametrize("damage, named", [
    (lambda info: [info], "a JSON object is expected, it holds a list"),
    (lambda info: "adapter_tuning", "a JSON object is expected, it holds a str"),
    (lambda info: {k: v for k, v in info.items() if k != "max_length"}, "'max_length' must be an integer >= 2, it is missing"),
    (lambda info: {**info, "max_length": -3}, "'max_length' must be an integer >= 2, it is -3"),
    (lambda info: {**info, "method_settings": None}, "'method_settings' must be an object"),
])
def test_a_damaged_checkpoint_json_is_one_line_in_every_script(trained, tmp_path, damage, named):
    output_dir, _ = trained("adapter_tuning")
    copy = shutil.copytree(output_dir / "best", tmp_path / "best")
    info = json.loads((copy / "checkpoint.json").read_text())
    (copy / "checkpoint.json").write_text(json.dumps(damage(info)))
    source = tiny.write_csv(tmp_path / "posts.csv", tiny.synthetic_rows(40))
    for script, args in (
        (REPO_ROOT / "adapter_tuning" / "predict.py", ("--checkpoint", copy, "--text", "好开心")),
        (REPO_ROOT / "score.py", ("--checkpoint", copy, "--input", source, "--output", tmp_path / "out", "--id-column", "label",
                                  "--text-column", "review")),
        (REPO_ROOT / "compare.py", (copy, "--data", source)),
    ):
        result = run_script(script, *args)
        assert result.returncode == 2 and named in result.stderr and "Traceback" not in result.stderr, (script, result.stderr[-2000:])
