"""The e5 recipe (mean pooling, a text prefix) and LP-FT / WiSE-FT: trained, saved, and read back by every path."""
import numpy as np
import pytest
import torch

import tiny
from conftest import train
from weibo_senti import UserError, lora
from weibo_senti.checkpoint import read_info
from weibo_senti.lpft import choose_alpha, interpolate, parse_alphas
from weibo_senti.predict import Classifier
from weibo_senti.serving import load_models

TEXTS = [text for _, text in tiny.synthetic_rows(16, seed=5)]
RECIPE = ["--pooling", "mean", "--text-prefix", "passage: ", "--linear-probe", "150", "--wise-alphas", "0,0.5"]


@pytest.fixture(scope="module")
def recipe(tiny_models, weibo_csv, tmp_path_factory):
    output_dir = tmp_path_factory.mktemp("recipe")
    train("bert_lora", tiny_models["bert"], weibo_csv, output_dir, "--epochs", "2", *RECIPE)
    return output_dir


def test_mean_pooling_reads_the_mean_of_the_unpadded_tokens(recipe):
    classifier = Classifier.load(recipe / "best", backend="torch")
    model = classifier.model
    assert model.base_model.pooler is None and model.config.classifier_pooling == "mean"
    encoded = classifier.tokenizer(["passage: " + text for text in TEXTS[:4]], padding=True, return_tensors="pt")
    with torch.inference_mode():
        hidden = model.base_model(**encoded).last_hidden_state
        mask = encoded["attention_mask"].unsqueeze(-1).float()
        expected = model.classifier((hidden * mask).sum(1) / mask.sum(1))
        np.testing.assert_allclose(model(**encoded).logits.numpy(), expected.numpy(), atol=1e-5)
        # padding changes nothing: each text alone scores as in the batch
        alone = torch.cat([model(**classifier.tokenizer(["passage: " + text], return_tensors="pt")).logits for text in TEXTS[:4]])
    np.testing.assert_allclose(alone.numpy(), expected.numpy(), atol=1e-5)


def test_the_checkpoint_records_the_recipe_and_every_load_puts_the_prefix_first(recipe):
    info = read_info(recipe / "best")
    assert info["method_settings"]["pooling"] == "mean" and info["text_prefix"] == "passage: "
    assert info["linear_probe"]["texts"] == 150 and 0.5 <= info["linear_probe"]["train_accuracy"] <= 1
    classifier = Classifier.load(recipe / "best", backend="torch")
    bare = Classifier(classifier.model, classifier.tokenizer, classifier.max_length, "bare", calibration=(classifier.temperature, classifier.bias))
    np.testing.assert_allclose(classifier.probabilities(TEXTS), bare.probabilities(["passage: " + t for t in TEXTS]), atol=1e-6)
    assert not np.allclose(classifier.probabilities(TEXTS), bare.probabilities(TEXTS), atol=1e-4)


def test_the_merged_export_and_onnx_runtime_score_as_the_checkpoint(recipe, tmp_path):
    reference = Classifier.load(recipe / "best", backend="torch").probabilities(TEXTS)
    merged = Classifier.load(lora.export_merged(recipe / "best", tmp_path / "merged"), backend="torch")
    assert merged.text_prefix == "passage: "
    np.testing.assert_allclose(merged.probabilities(TEXTS), reference, atol=1e-4)
    np.testing.assert_allclose(Classifier.load(recipe / "best", backend="onnx").probabilities(TEXTS), reference, atol=1e-4)


def test_the_adapter_trains_with_the_recipe_and_onnx_runtime_scores_it_as_pytorch(tiny_models, weibo_csv, tmp_path):
    train("adapter_tuning", tiny_models["bert"], weibo_csv, tmp_path / "out", "--epochs", "1", *RECIPE)
    info = read_info(tmp_path / "out" / "best")
    assert info["method_settings"]["pooling"] == "mean" and info["text_prefix"] == "passage: " and "wise_ft" in info
    reference = Classifier.load(tmp_path / "out" / "best", backend="torch")
    assert reference.model.base_model.pooler is None and reference.text_prefix == "passage: "
    exported = Classifier.load(tmp_path / "out" / "best", backend="onnx")
    np.testing.assert_allclose(exported.probabilities(TEXTS), reference.probabilities(TEXTS), atol=1e-4)


def test_wise_ft_keeps_the_alpha_its_rule_picks_and_the_fine_tuned_weights_beside_it(recipe):
    record = read_info(recipe / "best")["wise_ft"]
    assert [row["alpha"] for row in record["candidates"]] == [0.0, 0.5, 1.0]
    assert record["alpha"] == choose_alpha(record["candidates"], 0.003)
    if record["alpha"] < 1:
        assert read_info(recipe / "best_finetuned").get("wise_ft") is None
    accuracy = next(row["accuracy"] for row in record["candidates"] if row["alpha"] == record["alpha"])
    assert read_info(recipe / "best")["metrics"]["val_no_emoticons_accuracy"] == accuracy


def test_interpolation_scales_the_update_and_moves_the_head_from_the_probe():
    model = torch.nn.Module()
    model.layer = torch.nn.Module()
    model.layer.lora_B = torch.nn.ModuleDict({"default": torch.nn.Linear(2, 2, bias=False)})
    model.classifier = torch.nn.Linear(2, 2)
    finetuned = {name: torch.full_like(p, 4.0) for name, p in model.named_parameters()}
    probe = {name: torch.full_like(p, 2.0) for name, p in model.named_parameters()}
    interpolate(model, finetuned, probe, 0.25)
    assert torch.all(model.layer.lora_B["default"].weight == 1.0)  # 0.25 x the fine-tuned update
    assert torch.all(model.classifier.weight == 2.5)  # probe + 0.25 x (fine-tuned - probe)


def test_interpolation_from_a_trained_classifier_moves_every_tensor_from_where_it_started():
    model = torch.nn.Module()
    model.layer = torch.nn.Module()
    model.layer.lora_B = torch.nn.ModuleDict({"default": torch.nn.Linear(2, 2, bias=False)})
    finetuned = {name: torch.full_like(p, 4.0) for name, p in model.named_parameters()}
    start = {name: torch.full_like(p, 2.0) for name, p in model.named_parameters()}
    interpolate(model, finetuned, start, 0.25, scale_updates=False)
    assert torch.all(model.layer.lora_B["default"].weight == 2.5)  # start + 0.25 x (fine-tuned - start), not 0.25 x fine-tuned


def test_choose_alpha_takes_the_smallest_within_the_tolerance():
    rows = [{"alpha": 0.0, "accuracy": 0.70}, {"alpha": 0.5, "accuracy": 0.798}, {"alpha": 1.0, "accuracy": 0.80}]
    assert choose_alpha(rows, 0.003) == 0.5
    assert choose_alpha(rows, 0.0) == 1.0
    assert parse_alphas("0.5,0") == [0.0, 0.5, 1.0]


@pytest.mark.parametrize("flags, message", [
    (["--wise-alphas", "0,1.5", "--linear-probe", "10"], "between 0 and 1"),
    (["--wise-alphas", "0.5"], "needs --linear-probe N .* or --init-from"),
    (["--pooling", "max"], "--pooling max"),
])
def test_bad_recipe_settings_are_named_before_any_work(tiny_models, weibo_csv, tmp_path, flags, message):
    with pytest.raises(UserError, match=message):
        train("bert_lora", tiny_models["bert"], weibo_csv, tmp_path / "out", *flags)
    assert not (tmp_path / "out" / "best").exists()


def test_mean_pooling_is_refused_for_gpt2_whose_head_reads_the_last_token(tiny_models, weibo_csv, tmp_path):
    with pytest.raises(UserError, match="last token"):
        train("lora", tiny_models["gpt2"], weibo_csv, tmp_path / "out", "--pooling", "mean")


def test_checkpoints_that_read_one_base_differently_do_not_share_it(recipe, trained):
    served = load_models([("mean", recipe / "best"), ("cls", trained("bert_lora")[0] / "best")], {"backend": "torch"})
    assert served["mean"].classifier is not served["cls"].classifier
    np.testing.assert_allclose(served["mean"].classifier.probabilities(TEXTS),
                               Classifier.load(recipe / "best", backend="torch").probabilities(TEXTS), atol=1e-5)
