import json
import math
import re

import pytest
import torch
from safetensors.torch import load_file

from conftest import train
from weibo_senti import UserError, training
from weibo_senti.checkpoint import load_checkpoint
from weibo_senti.data import EncodedTexts, load_labelled_csv, make_collate, split_train_val


@pytest.mark.parametrize("method", ["adapter_tuning", "lora", "bert_lora"])
def test_short_run_lowers_the_loss_and_keeps_the_best_checkpoint(trained, method):
    output_dir, log = trained(method)
    assert [entry["epoch"] for entry in log] == [1, 2, 3, 4]
    assert log[-1]["train_loss"] < log[0]["train_loss"]
    assert min(entry["val_loss"] for entry in log) < log[0]["val_loss"]
    for key in ("val_accuracy", "val_macro_f1", "val_no_emoticons_accuracy", "val_no_emoticons_macro_f1", "train_seconds",
                "val_no_emoticons_recall_negative", "val_no_emoticons_recall_positive", "val_no_emoticons_calibration_error"):
        assert key in log[0]
    assert json.loads((output_dir / "training_log.json").read_text(encoding="utf-8")) == log
    info = json.loads((output_dir / "best" / "checkpoint.json").read_text(encoding="utf-8"))
    best = max(log, key=lambda entry: entry[training.SELECTION_METRIC])  # the first of equals
    assert info["method"] == method and info["epoch"] == best["epoch"]
    assert info["selected_by"] == {"metric": training.SELECTION_METRIC, "rule": training.SELECTION_RULES[training.SELECTION_METRIC]}
    assert info["parameters"]["trainable"] < info["parameters"]["total"]


@pytest.mark.parametrize("method", ["adapter_tuning", "bert_lora"])
def test_the_model_card_says_what_checkpoint_json_says(trained, method):
    best = trained(method)[0] / "best"
    info = json.loads((best / "checkpoint.json").read_text(encoding="utf-8"))
    card = (best / "README.md").read_text(encoding="utf-8")  # PEFT's empty template replaced, for LoRA too
    assert "More Information Needed" not in card and card.startswith(f"---\nbase_model: {info['base_model']}\n")
    assert ("library_name: peft" in card) == (method == "bert_lora")
    assert f"| emoticon tags removed | {info['metrics']['val_no_emoticons_accuracy']:.4f} |" in card
    assert f"{method}/predict.py --checkpoint FOLDER" in card
    if "calibration" in info:  # written after training: the card was written again with it
        assert f"temperature {info['calibration']['temperature']:g}" in card and "before the confidence fit" in card


def test_checkpoint_holds_only_the_trained_weights(trained):
    output_dir, _ = trained("adapter_tuning")
    weights = load_file(output_dir / "best" / "adapter_model.safetensors")
    assert weights and all(".adapter." in name or name.startswith("score.") for name in weights)
    model, _, _ = load_checkpoint(output_dir / "best")
    for name, tensor in weights.items():
        torch.testing.assert_close(model.state_dict()[name], tensor)


def test_resume_continues_where_the_run_stopped(tiny_models, weibo_csv, tmp_path, monkeypatch):
    args = ("--epochs", "3", "--adapter-size", "16")
    full_log = train("adapter_tuning", tiny_models["gpt2"], weibo_csv, tmp_path / "full", *args)

    real_evaluate, calls = training.evaluate, []

    def crash_in_second_epoch(*a, **k):
        calls.append(1)
        if len(calls) == 3:  # epoch 2's first evaluation
            raise KeyboardInterrupt
        return real_evaluate(*a, **k)

    monkeypatch.setattr(training, "evaluate", crash_in_second_epoch)
    with pytest.raises(KeyboardInterrupt):
        train("adapter_tuning", tiny_models["gpt2"], weibo_csv, tmp_path / "split", *args)
    monkeypatch.setattr(training, "evaluate", real_evaluate)
    assert len(json.loads((tmp_path / "split" / "training_log.json").read_text())) == 1

    resumed_log = train("adapter_tuning", tiny_models["gpt2"], weibo_csv, tmp_path / "split", *args, "--resume")
    assert [e["epoch"] for e in resumed_log] == [1, 2, 3]
    for full, resumed in zip(full_log, resumed_log):
        assert resumed["train_loss"] == pytest.approx(full["train_loss"], abs=1e-6)
        assert resumed["val_loss"] == pytest.approx(full["val_loss"], abs=1e-6)
    for name in ("best", "last"):
        expected = load_file(tmp_path / "full" / name / "adapter_model.safetensors")
        got = load_file(tmp_path / "split" / name / "adapter_model.safetensors")
        for key in expected:
            torch.testing.assert_close(got[key], expected[key], atol=1e-6, rtol=0)


def scripted_evaluation(monkeypatch, epochs):
    """training.evaluate replaced by one that gives, epoch after epoch, macro-F1 with tags and without them on the
    selection half as listed in `epochs`."""
    scripted = iter(epochs)

    def evaluate(model, loader, accelerator, fit_positions=None):
        metrics = {"loss": 0.5, "accuracy": 0.5, "macro_f1": 0.5, "recall_negative": 0.5, "recall_positive": 0.5, "calibration_error": 0.1}
        if fit_positions is None:  # the texts as they are
            with_tags, evaluate.fit = next(scripted)
            return {**metrics, "macro_f1": with_tags}
        return {**metrics, **{f"fit_{key}": value for key, value in metrics.items()}, "fit_macro_f1": evaluate.fit}

    monkeypatch.setattr(training, "evaluate", evaluate)


def test_best_is_the_epoch_best_without_tags_on_the_selection_half_not_with_tags(tiny_models, weibo_csv, tmp_path, monkeypatch, capsys):
    scripted_evaluation(monkeypatch, [(0.99, 0.70), (0.98, 0.75), (0.99, 0.75)])
    log = train("adapter_tuning", tiny_models["gpt2"], weibo_csv, tmp_path, "--epochs", "3", "--max-samples", "100")
    assert [entry["val_no_emoticons_fit_macro_f1"] for entry in log] == [0.70, 0.75, 0.75]
    assert json.loads((tmp_path / "best" / "checkpoint.json").read_text())["epoch"] == 2  # higher without tags; a tie keeps the earlier
    assert "best macro-F1 without emoticon tags on the validation texts the confidence is fitted on: 0.7500" in capsys.readouterr().out


def test_a_run_of_an_earlier_version_resumes_under_its_rule_with_tags(tiny_models, weibo_csv, tmp_path, monkeypatch, capsys):
    args = ("--adapter-size", "8", "--max-samples", "100")
    train("adapter_tuning", tiny_models["gpt2"], weibo_csv, tmp_path, "--epochs", "1", *args)
    state_path = tmp_path / "last" / "training_state.pt"
    state = torch.load(state_path, weights_only=True)
    del state["selected_by"], state["best_score"]
    torch.save({**state, "best_f1": 0.5}, state_path)  # what earlier versions wrote
    scripted_evaluation(monkeypatch, [(0.6, 0.1)])
    train("adapter_tuning", tiny_models["gpt2"], weibo_csv, tmp_path, "--epochs", "2", *args, "--resume")
    assert "best validation macro-F1 with the emoticon tags, the rule of runs started by earlier versions so far 0.5000" in capsys.readouterr().out
    info = json.loads((tmp_path / "best" / "checkpoint.json").read_text())
    assert info["epoch"] == 2 and info["selected_by"]["metric"] == "val_macro_f1"
    assert "the best epoch by validation macro-F1 with the emoticon tags" in (tmp_path / "best" / "README.md").read_text()


def test_the_selection_half_is_the_half_the_confidence_is_fitted_on(weibo_csv):
    from weibo_senti.calibration import MIN_TEXTS, calibration_halves

    table, _ = load_labelled_csv(weibo_csv)
    fit, held_out = calibration_halves(table, 42)
    positions = training.selection_positions(table, 42)
    assert len(table) >= MIN_TEXTS and sorted(positions) == sorted(fit.index) and not set(positions) & set(held_out.index)
    few = table.iloc[: MIN_TEXTS - 1]
    assert list(training.selection_positions(few, 42)) == list(range(len(few)))  # too few to halve: all of them


def test_resume_refuses_changed_settings_and_missing_runs(tiny_models, weibo_csv, tmp_path):
    with pytest.raises(UserError, match="no run to resume"):
        train("adapter_tuning", tiny_models["gpt2"], weibo_csv, tmp_path, "--epochs", "1", "--resume")
    train("adapter_tuning", tiny_models["gpt2"], weibo_csv, tmp_path, "--epochs", "1", "--max-samples", "100")
    with pytest.raises(UserError, match="max_samples: 100 -> 0"):
        train("adapter_tuning", tiny_models["gpt2"], weibo_csv, tmp_path, "--epochs", "1", "--resume")


def test_resume_with_more_epochs_extends_a_finished_run_and_says_so(tiny_models, weibo_csv, tmp_path, capsys):
    args = ("--adapter-size", "8", "--max-samples", "100", "--lr", "1e-3", "--warmup-ratio", "0")
    train("adapter_tuning", tiny_models["gpt2"], weibo_csv, tmp_path, "--epochs", "2", *args)
    last_weights = load_file(tmp_path / "last" / "adapter_model.safetensors")
    with pytest.raises(UserError, match="epochs: 2 -> 1"):  # fewer epochs would leave the schedule unfinished
        train("adapter_tuning", tiny_models["gpt2"], weibo_csv, tmp_path, "--epochs", "1", *args, "--resume")
    capsys.readouterr()
    log = train("adapter_tuning", tiny_models["gpt2"], weibo_csv, tmp_path, "--epochs", "3", *args, "--resume")
    out = capsys.readouterr().out
    assert [entry["epoch"] for entry in log] == [1, 2, 3]
    assert "extending the run from 2 to 3 epochs" in out and "restarts at 3.33e-04" in out  # a third of LR=1e-3, decaying to 0
    info = json.loads((tmp_path / "last" / "checkpoint.json").read_text(encoding="utf-8"))
    assert info["run"]["epochs"] == "3" and info["extended_from_epochs"] == 2
    assert "(epoch 3 of 3; planned as 2, extended with --resume)" in (tmp_path / "last" / "README.md").read_text(encoding="utf-8")
    assert any(not torch.equal(tensor, load_file(tmp_path / "last" / "adapter_model.safetensors")[name])
               for name, tensor in last_weights.items())


def test_saved_model_predicts_like_the_in_memory_model(trained, weibo_csv):
    from weibo_senti.predict import Classifier

    output_dir, _ = trained("adapter_tuning")
    model, tokenizer, info = load_checkpoint(output_dir / "best")
    table, _ = load_labelled_csv(weibo_csv)
    _, val = split_train_val(table, 0.1, seed=42)
    batch = make_collate(tokenizer.pad_token_id)([EncodedTexts(val["review"], None, tokenizer, 128)[i] for i in range(len(val))])
    with torch.no_grad():
        expected = torch.softmax(model(**batch).logits, -1).numpy()
    got = Classifier.load(output_dir / "best").probabilities(val["review"].tolist(), batch_size=7)
    assert got == pytest.approx(expected, abs=1e-5)


def test_length_grouped_training_lowers_the_loss_and_is_recorded(tiny_models, weibo_csv, tmp_path):
    log = train("lora", tiny_models["gpt2"], weibo_csv, tmp_path / "grouped", "--epochs", "2", "--group-by-length")
    assert log[-1]["train_loss"] < log[0]["train_loss"]
    info = json.loads((tmp_path / "grouped" / "best" / "checkpoint.json").read_text())
    assert info["run"]["group_by_length"] == "True"


def test_a_base_with_measured_settings_supplies_those_not_given_on_the_command_line(tiny_models, weibo_csv, tmp_path, capsys):
    import shutil

    base = shutil.copytree(tiny_models["gpt2"], tmp_path / "base")
    (base / "fine_tuning.json").write_text(json.dumps({"adapter_tuning": {"epochs": 1, "emoticon_drop": 0.5, "lr": 0.02}}))
    log = train("adapter_tuning", base, weibo_csv, tmp_path / "out", "--adapter-size", "8")  # FAST gives --lr
    assert len(log) == 1
    info = json.loads((tmp_path / "out" / "best" / "checkpoint.json").read_text())
    assert info["run"]["emoticon_drop"] == "0.5" and info["run"]["lr"] == "0.01" and info["run"]["epochs"] == "1"
    assert "settings measured best on" in capsys.readouterr().out


def test_a_base_with_a_measured_prediction_cut_has_its_checkpoints_predict_at_it(tiny_models, weibo_csv, tmp_path):
    import shutil

    from weibo_senti.predict import Classifier

    base = shutil.copytree(tiny_models["bert"], tmp_path / "base")
    (base / "fine_tuning.json").write_text(json.dumps({"predict": {"max_length": 100000}}))  # more than its positions
    train("bert_lora", base, weibo_csv, tmp_path / "out", "--epochs", "1", "--max-length", "16")
    info = json.loads((tmp_path / "out" / "best" / "checkpoint.json").read_text())
    positions = json.loads((base / "config.json").read_text())["max_position_embeddings"]
    assert info["max_length"] == 16 and info["predict_max_length"] == positions
    assert Classifier.load(tmp_path / "out" / "best").max_length == positions


def test_bf16_training_records_its_precision_and_saves_fp32_weights(tiny_models, weibo_csv, tmp_path):
    train("lora", tiny_models["gpt2"], weibo_csv, tmp_path / "out", "--epochs", "1", "--mixed-precision", "bf16")
    info = json.loads((tmp_path / "out" / "best" / "checkpoint.json").read_text())
    assert info["mixed_precision"] == "bf16"
    weights = load_file(tmp_path / "out" / "best" / "adapter_model.safetensors")
    assert {tensor.dtype for tensor in weights.values()} == {torch.float32}


def test_checkpoint_records_the_data_inside_the_repository_relative_to_it(tiny_models, tmp_path):
    from weibo_senti import REPO_ROOT

    train("adapter_tuning", tiny_models["gpt2"], REPO_ROOT / "dataset" / "weibo_senti_100k.csv", tmp_path / "out",
          "--epochs", "1", "--max-samples", "200", "--adapter-size", "8")
    info = json.loads((tmp_path / "out" / "best" / "checkpoint.json").read_text())
    assert info["run"]["data"] == "dataset/weibo_senti_100k.csv"


@pytest.mark.parametrize("precisions", [("no", "bf16"), ("bf16", "no")])
def test_runs_of_different_precisions_in_one_process_each_get_their_own(tiny_models, weibo_csv, tmp_path, precisions):
    # On a CPU without native bf16, 'auto' resolves to fp32, and a later bf16 run in the same process (a notebook, the
    # test suite) used to fail with "AcceleratorState has already been initialized and cannot be changed".
    for precision in precisions:
        train("lora", tiny_models["gpt2"], weibo_csv, tmp_path / precision, "--epochs", "1", "--max-samples", "100",
              "--mixed-precision", precision)
        info = json.loads((tmp_path / precision / "best" / "checkpoint.json").read_text())
        assert info["mixed_precision"] == precision


def test_a_diverging_run_stops_instead_of_saving_nan_as_the_best(tiny_models, weibo_csv, tmp_path):
    with pytest.raises(UserError, match=r"the training loss is (nan|inf).*try a smaller --lr"):
        train("adapter_tuning", tiny_models["gpt2"], weibo_csv, tmp_path / "out", "--epochs", "1", "--lr", "1e30")
    assert not (tmp_path / "out" / "best").exists()


@pytest.mark.parametrize("flags, words", [
    (("--lr", "inf"), "--lr inf (LR): out of range, must be a finite number > 0"),
    (("--seed", "-1"), "--seed -1 (SEED): out of range"),
])
def test_settings_out_of_range_stop_before_the_data_is_read(tiny_models, tmp_path, flags, words):
    with pytest.raises(UserError, match=re.escape(words)):
        train("adapter_tuning", tiny_models["gpt2"], tmp_path / "no-data.csv", tmp_path / "out", *flags)


def test_an_output_dir_that_is_a_file_is_named(tiny_models, weibo_csv, tmp_path):
    (tmp_path / "taken").write_text("a file of mine")
    with pytest.raises(UserError, match="--output-dir .*taken: a file is there"):
        train("adapter_tuning", tiny_models["gpt2"], weibo_csv, tmp_path / "taken", "--epochs", "1")
    assert (tmp_path / "taken").read_text() == "a file of mine"


def test_a_read_only_output_dir_is_named(tiny_models, weibo_csv, read_only_dir):
    with pytest.raises(UserError, match="--output-dir .*: cannot be written .*choose another"):
        train("adapter_tuning", tiny_models["gpt2"], weibo_csv, read_only_dir / "run", "--epochs", "1")


def test_resume_from_a_last_checkpoint_without_its_run_record_is_named(tiny_models, weibo_csv, tmp_path):
    train("adapter_tuning", tiny_models["gpt2"], weibo_csv, tmp_path, "--epochs", "1", "--max-samples", "100")
    info_path = tmp_path / "last" / "checkpoint.json"
    info = json.loads(info_path.read_text())
    del info["run"]
    info_path.write_text(json.dumps(info))
    with pytest.raises(UserError, match="has no record of its run"):
        train("adapter_tuning", tiny_models["gpt2"], weibo_csv, tmp_path, "--epochs", "2", "--max-samples", "100", "--resume")


@pytest.mark.parametrize("method, teacher_method", [("bert_lora", "lora"), ("lora", "adapter_tuning")])
def test_a_student_cut_to_its_first_layer_learns_from_a_teacher_and_reloads(trained, tiny_models, weibo_csv, tmp_path, capsys, method, teacher_method):
    from conftest import BASE_FAMILY
    from weibo_senti.predict import Classifier

    teacher = trained(teacher_method)[0] / "best"
    base = tiny_models[BASE_FAMILY[method]]
    log = train(method, base, weibo_csv, tmp_path, "--epochs", "3", "--base-layers", "1", "--teacher", str(teacher))
    assert f"teacher: {teacher}" in capsys.readouterr().out
    assert log[-1]["train_loss"] < log[0]["train_loss"] and all(math.isfinite(entry["train_loss"]) for entry in log)
    info = json.loads((tmp_path / "best" / "checkpoint.json").read_text(encoding="utf-8"))
    assert info["method_settings"]["base_layers"] == 1 and info["run"]["teacher"] == str(teacher)
    assert f"distilled from `{teacher}`" in (tmp_path / "best" / "README.md").read_text(encoding="utf-8")  # the card says so
    student = Classifier.load(tmp_path / "best")
    assert student.model.config.num_hidden_layers == 1
    assert student.predict(["今天好开心"])[0]["label"] in (0, 1)
    with pytest.raises(UserError, match="teacher: .* -> None"):  # a resumed run keeps its teacher
        train(method, base, weibo_csv, tmp_path, "--epochs", "4", "--base-layers", "1", "--resume")


def test_a_student_cannot_keep_more_layers_than_its_base_has(tiny_models, weibo_csv, tmp_path):
    with pytest.raises(UserError, match="--base-layers 5 .*out of range, .* has 2 layers"):
        train("lora", tiny_models["gpt2"], weibo_csv, tmp_path, "--base-layers", "5")


def test_the_distillation_loss_is_cross_entropy_at_weight_0_and_zero_when_the_student_is_the_teacher():
    logits, labels = torch.tensor([[2.0, -1.0], [0.5, 0.3]]), torch.tensor([0, 1])
    cross_entropy = torch.nn.functional.cross_entropy(logits, labels)
    assert torch.isclose(training.distillation_loss(logits, logits + 5, labels, 0.0, 2.0), cross_entropy)
    assert torch.isclose(training.distillation_loss(logits, logits, labels, 1.0, 2.0), torch.tensor(0.0), atol=1e-6)
