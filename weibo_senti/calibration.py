"""Temperature scaling (Guo et al., ICML 2017, "On Calibration of Modern Neural Networks"): one number T divides the
logits, so that a stated confidence of 0.8 is right about 80% of the time. Labels never change.

T is fitted on half the validation texts with their emoticon tags removed (the texts users score look like that) and
the calibration error is reported on the other half, with and without tags. checkpoint.json keeps T and that report;
every prediction path (predict.py, serve.py, score.py, compare.py) divides by it.
"""
import numpy as np
from scipy.optimize import minimize_scalar
from scipy.special import log_softmax
from sklearn.model_selection import train_test_split

from .data import expected_calibration_error, strip_emoticons

TEMPERATURE_RANGE = (0.05, 20.0)
MIN_TEXTS = 200  # fewer validation texts than this: no temperature is fitted (T stays 1); on fewer it fits noise


def temperature_of(info):
    """The temperature a checkpoint.json records (1: not calibrated)."""
    return float((info.get("calibration") or {}).get("temperature", 1.0))


def calibration_halves(val_rows, seed):
    """(fit, held_out): a seeded, stratified halving of the validation rows; compare.py reports on the held-out half."""
    if len(val_rows) < MIN_TEXTS:
        return val_rows.iloc[:0], val_rows
    stratify = val_rows["label"] if val_rows["label"].value_counts().min() >= 2 else None
    return train_test_split(val_rows, test_size=0.5, stratify=stratify, random_state=seed)


def _logits(probabilities):
    """The logits up to one constant per row, which the softmax ignores: log p."""
    return np.log(np.clip(np.asarray(probabilities, dtype=np.float64), 1e-30, None))


def apply_temperature(probabilities, temperature):
    """softmax(logits / T), from softmax(logits)."""
    scaled = _logits(probabilities) / np.asarray(temperature, dtype=np.float64).reshape(-1, 1)
    return np.exp(log_softmax(scaled, axis=1)).astype(np.float32)


def fit_temperature(probabilities, labels):
    """The T in TEMPERATURE_RANGE that minimises the negative log-likelihood of `labels` (probabilities at T = 1)."""
    log_p = _logits(probabilities)
    rows, labels = np.arange(len(log_p)), np.asarray(labels)

    def loss(log_t):
        return -log_softmax(log_p / np.exp(log_t), axis=1)[rows, labels].mean()

    low, high = np.log(TEMPERATURE_RANGE[0]), np.log(TEMPERATURE_RANGE[1])
    return float(np.exp(minimize_scalar(loss, bounds=(low, high), method="bounded").x))


def calibration_error(probabilities, labels):
    """The expected calibration error of [n, 2] probabilities against 0/1 labels."""
    return expected_calibration_error(probabilities.max(axis=1), probabilities.argmax(axis=1) == np.asarray(labels))


def calibrate(classifier, val_rows, seed, batch_size=64):
    """Fit the classifier's temperature on half of `val_rows` without tags; returns checkpoint.json's "calibration"
    record, or None when there are too few texts to fit one."""
    fit, held_out = calibration_halves(val_rows, seed)
    if fit.empty:
        return None
    kept, classifier.temperature = classifier.temperature, 1.0
    try:
        fitted = classifier.probabilities(fit["review"].map(strip_emoticons).tolist(), batch_size)
        temperature = fit_temperature(fitted, fit["label"])
        errors = {}
        for name, texts in (("without_tags", held_out["review"].map(strip_emoticons)), ("with_tags", held_out["review"])):
            probabilities = classifier.probabilities(texts.tolist(), batch_size)
            errors[name] = {
                "before": round(calibration_error(probabilities, held_out["label"]), 4),
                "after": round(calibration_error(apply_temperature(probabilities, temperature), held_out["label"]), 4),
            }
    finally:
        classifier.temperature = kept
    return {
        "temperature": round(temperature, 4),
        "fitted_on": f"{len(fit):,} validation texts without emoticon tags (seed {seed})",
        "calibration_error_held_out": errors,
        "held_out_texts": len(held_out),
    }


def describe(record):
    errors = record["calibration_error_held_out"]
    return (f"temperature {record['temperature']:.3f} (fitted on {record['fitted_on']}); calibration error on the other "
            f"{record['held_out_texts']:,}: without tags {errors['without_tags']['before']:.3f} -> {errors['without_tags']['after']:.3f}, "
            f"with tags {errors['with_tags']['before']:.3f} -> {errors['with_tags']['after']:.3f}")


def calibrate_checkpoint(folder, val_rows, seed, batch_size=64, say=print):
    """Fit `folder`'s temperature on `val_rows` (the validation rows of the run that trained it) and write it into its
    checkpoint.json (atomically). Returns the record, or None when there were too few texts."""
    from .checkpoint import INFO_FILE, find_checkpoint, read_info, write_json_atomic
    from .predict import Classifier

    folder = find_checkpoint(folder)
    classifier = Classifier.load(folder, mixed_precision="auto")
    record = calibrate(classifier, val_rows, seed, batch_size)
    if record is None:
        say(f"{folder}: not calibrated (fewer than {MIN_TEXTS} validation texts); confidences are the softmax as it is")
        return None
    write_json_atomic(folder / INFO_FILE, {**read_info(folder), "calibration": record})
    say(f"{folder}: {describe(record)}")
    return record
