"""Calibration (a recall-balancing bias and a temperature): fitted at the end of training and by calibrate.py, kept in
checkpoint.json, used by every path."""
import json
import shutil

import numpy as np
import pytest
import torch
from scipy.special import softmax

import tiny
from conftest import run_script, train
from weibo_senti import REPO_ROOT, lora
from weibo_senti.calibration import apply_calibration, calibration_of, fit_temperature, recall_balancing_threshold
from weibo_senti.checkpoint import model_name, read_info
from weibo_senti.data import expected_calibration_error
from weibo_senti.predict import Classifier

TEXTS = [text for _, text in tiny.synthetic_rows(16, seed=3)]


@pytest.fixture(scope="module")
def calibrated(tiny_models, weibo_csv, tmp_path_factory):
    """A bert_lora run with 200 validation texts, enough to fit a temperature on (the shared tiny runs have 40)."""
    output_dir = tmp_path_factory.mktemp("calibrated")
    train("bert_lora", tiny_models["bert"], weibo_csv, output_dir, "--epochs", "3", "--val-fraction", "0.5")
    return output_dir / "best"


def _with_calibration(source, destination, temperature, bias):
    shutil.copytree(source, destination, ignore=shutil.ignore_patterns("onnx"))
    info = {**read_info(destination), "calibration": {"temperature": temperature, "bias": bias}}
    (destination / "checkpoint.json").write_text(json.dumps(info), encoding="utf-8")
    return destination


def test_the_fitted_temperature_is_the_one_the_labels_were_drawn_at():
    generator = np.random.default_rng(0)
    logits = generator.normal(0, 4, size=(20000, 2))
    labels = (generator.random(20000) < softmax(logits / 2.5, axis=1)[:, 1]).astype(int)
    overconfident = softmax(logits, axis=1)
    temperature = fit_temperature(overconfident, labels)
    assert temperature == pytest.approx(2.5, rel=0.05)
    calibrated = apply_calibration(overconfident, temperature)
    np.testing.assert_allclose(calibrated, softmax(logits / temperature, axis=1), atol=1e-5)
    assert (calibrated.argmax(axis=1) == overconfident.argmax(axis=1)).all()  # labels never change
    error = {name: expected_calibration_error(p.max(axis=1), p.argmax(axis=1) == labels) for name, p in
             (("before", overconfident), ("after", calibrated))}
    assert error["after"] < 0.02 < error["before"]


def test_the_bias_balances_the_recalls_of_a_classifier_that_leans_to_one_class():
    generator = np.random.default_rng(0)
    labels = np.repeat([0, 1], 5000)
    margins = np.where(labels == 1, 1.0, -1.0) * generator.gamma(2.0, 1.0, 10000) - 0.6  # calls too many texts negative
    probabilities = softmax(np.stack([np.zeros(10000), margins], axis=1), axis=1)
    said = probabilities.argmax(axis=1)
    assert (said[labels == 0] == 0).mean() - (said[labels == 1] == 1).mean() > 0.1
    threshold = recall_balancing_threshold(probabilities, labels)
    assert -0.75 < threshold < -0.45  # where the two classes mirror each other: -0.6
    temperature = fit_temperature(probabilities, labels, threshold)
    balanced = apply_calibration(probabilities, temperature, -threshold / temperature).argmax(axis=1)
    assert abs((balanced[labels == 0] == 0).mean() - (balanced[labels == 1] == 1).mean()) < 0.005
    even = softmax(np.stack([np.zeros(10000), margins + 0.6], axis=1), axis=1)
    assert abs(recall_balancing_threshold(even, labels)) < 0.05  # a classifier that does not lean is left as it is
    assert recall_balancing_threshold(probabilities[labels == 1], labels[labels == 1]) == 0.0  # one class: nothing to balance


def test_training_fits_a_calibration_that_every_load_applies(calibrated):
    best = calibrated
    record = read_info(best)["calibration"]
    assert record["temperature"] > 0 and record["temperature"] != 1.0 and record["held_out_texts"] == 100
    assert set(record["held_out"]) == {"without_tags", "with_tags"}
    before, after = record["held_out"]["without_tags"]["before"], record["held_out"]["without_tags"]["after"]
    assert set(before) == set(after) == {"calibration_error", "accuracy", "recall"}
    classifier = Classifier.load(best, backend="torch")
    assert (classifier.temperature, classifier.bias) == (record["temperature"], record["bias"])
    encoded = classifier.tokenizer(TEXTS, padding=True, return_tensors="pt")
    with torch.inference_mode():
        logits = classifier.model(**encoded).logits
    expected = torch.softmax(logits / record["temperature"] + torch.tensor([0.0, record["bias"]]), dim=-1).numpy()
    np.testing.assert_allclose(classifier.probabilities(TEXTS), expected, atol=1e-5)
    confidences = [result["confidence"] for result in classifier.predict(TEXTS)]
    np.testing.assert_allclose(confidences, expected.max(axis=1), atol=1e-5)


def test_a_run_with_too_few_validation_texts_keeps_the_softmax_as_it_is(trained):
    assert "calibration" not in read_info(trained("adapter_tuning")[0] / "best")
    classifier = Classifier.load(trained("adapter_tuning")[0] / "best")
    assert (classifier.temperature, classifier.bias) == (1.0, 0.0)


def test_calibrate_py_refits_and_the_model_id_changes_but_not_the_export(calibrated, tmp_path):
    from weibo_senti.onnx_backend import cache_folder

    checkpoint = tmp_path / "best"
    shutil.copytree(calibrated, checkpoint, ignore=shutil.ignore_patterns("onnx"))
    calibrated = read_info(checkpoint)
    (checkpoint / "checkpoint.json").write_text(json.dumps({k: v for k, v in calibrated.items() if k != "calibration"}), encoding="utf-8")
    before_id, before_export = model_name(checkpoint), cache_folder(checkpoint)
    assert calibration_of(read_info(checkpoint)) == (1.0, 0.0)
    result = run_script(REPO_ROOT / "calibrate.py", checkpoint)
    assert result.returncode == 0, result.stderr
    assert "temperature" in result.stdout and "bias" in result.stdout and "without tags" in result.stdout
    # the same texts give the same temperature, up to bf16's roundings: calibrate.py scores in batches of 64, train.py of
    # 2 x its batch size, and on a CPU with AMX the bf16 kernels round differently with the batch's row count
    refit, fitted = read_info(checkpoint)["calibration"], calibrated["calibration"]
    assert refit["temperature"] == pytest.approx(fitted["temperature"], abs=2e-3) and refit["bias"] == pytest.approx(fitted["bias"], abs=2e-3)
    assert refit["fitted_on"] == fitted["fitted_on"]
    assert f"temperature {calibrated['calibration']['temperature']:.3f}" in (checkpoint / "README.md").read_text(encoding="utf-8")
    assert model_name(checkpoint) != before_id  # score.py rescores: its confidences changed
    assert cache_folder(checkpoint) == before_export  # the exported network did not


def test_calibrate_py_names_what_it_cannot_use(tmp_path):
    result = run_script(REPO_ROOT / "calibrate.py", tmp_path / "nowhere")
    assert result.returncode == 2 and "no checkpoint at" in result.stderr and "Traceback" not in result.stderr


def test_the_merged_export_keeps_the_calibration(calibrated, tmp_path):
    best = calibrated
    merged = lora.export_merged(best, tmp_path / "merged")
    classifier = Classifier.load(merged, backend="torch")
    assert (classifier.temperature, classifier.bias) == pytest.approx(calibration_of(read_info(best)))
    np.testing.assert_allclose(classifier.probabilities(TEXTS), Classifier.load(best, backend="torch").probabilities(TEXTS), atol=1e-4)


def test_onnx_runtime_applies_the_same_calibration(calibrated, tmp_path):
    checkpoint = tmp_path / "best"
    shutil.copytree(calibrated, checkpoint, ignore=shutil.ignore_patterns("onnx"))
    torch_probabilities = Classifier.load(checkpoint, backend="torch").probabilities(TEXTS)
    np.testing.assert_allclose(Classifier.load(checkpoint, backend="onnx").probabilities(TEXTS), torch_probabilities, atol=1e-5)


def test_adapters_sharing_a_base_each_keep_their_own_calibration(trained, tmp_path):
    from weibo_senti.serving import load_models

    best = trained("bert_lora")[0] / "best"
    folders = {"cool": _with_calibration(best, tmp_path / "cool", 0.5, -0.3), "warm": _with_calibration(best, tmp_path / "warm", 2.0, 0.4)}
    served = load_models(list(folders.items()), {"backend": "torch"})
    assert served["cool"].classifier is served["warm"].classifier  # one PeftModel, two adapters
    for name, folder in folders.items():
        got = served[name].classifier.probabilities(TEXTS, adapter_names=[served[name].adapter] * len(TEXTS))
        np.testing.assert_allclose(got, Classifier.load(folder, backend="torch").probabilities(TEXTS), atol=1e-5)


def test_the_five_levels_edges_follow_their_rule_on_calibrated_probabilities():
    from weibo_senti.calibration import LEVELS, NEUTRAL_ACCURACY, VERY_ACCURACY, bands_report, fit_bands, level_of

    rng = np.random.default_rng(0)
    confidence = rng.uniform(0.5, 1, 4000)
    labels = rng.integers(0, 2, 4000)
    said = np.where(rng.uniform(size=4000) < confidence, labels, 1 - labels)  # right as often as it says: calibrated
    positive = np.where(said == 1, confidence, 1 - confidence)
    probabilities = np.stack([1 - positive, positive], axis=1)
    bands = fit_bands(probabilities, labels)
    assert 0.55 < bands["neutral_below"] < 0.75 and 0.85 < bands["very_from"] < 0.95
    report = bands_report(probabilities, labels, bands)
    assert report["中性"]["accuracy"] <= NEUTRAL_ACCURACY + 0.01
    assert min(report["非常正面"]["accuracy"], report["非常负面"]["accuracy"]) >= VERY_ACCURACY - 0.02
    assert [level_of(1, 0.6, bands), level_of(0, 0.8, bands), level_of(1, 0.99, bands), level_of(0, 0.99, bands)] == \
        [LEVELS[2], LEVELS[1], LEVELS[4], LEVELS[0]]
    coin = np.full((100, 2), 0.5)  # right half the time at every confidence: all neutral, no 'very' band
    assert fit_bands(coin, np.arange(100) % 2) == {"neutral_below": 1.0, "very_from": 1.0}
    always_right = np.tile([[0.9, 0.1]], (100, 1))  # no neutral band
    assert fit_bands(always_right, np.zeros(100, dtype=int)) == {"neutral_below": 0.5, "very_from": 0.9}
