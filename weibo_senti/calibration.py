"""Calibration: two numbers fitted after training and applied after the network, P = softmax(logits / T + [0, bias]).

- The bias moves the decision threshold to where the two classes' recall is equal. Without their emoticon tags,
  weibo_senti_100k's texts are called negative more often than they are (positivity is carried by the tags), and text
  from other sources more so; the bias undoes the part of that seen on Weibo texts. It changes the label of texts near 50%.
- The temperature T (Guo et al., ICML 2017, "On Calibration of Modern Neural Networks") then makes a stated confidence
  of 0.8 right about 80% of the time. It changes no label.

Both are fitted on half the validation texts with their emoticon tags removed (the texts users score look like that)
and reported on the other half, with and without tags. Where the run had human-labelled posts (weibo2018), they are
fitted on half of those instead, as they are and without tags together: their labels are people's, not the tags'. checkpoint.json keeps them and that report; every prediction
path (predict.py, serve.py, score.py, compare.py) applies them.
"""
import numpy as np
from scipy.optimize import minimize_scalar
from scipy.special import log_softmax
from sklearn.model_selection import train_test_split

from .data import expected_calibration_error

TEMPERATURE_RANGE = (0.05, 20.0)
MIN_TEXTS = 200  # fewer validation texts than this: nothing is fitted (T stays 1, the bias 0); on fewer it fits noise
# The five levels BettaFish's prompts promise (非常负面 ... 非常正面), read off the calibrated confidence by two edges fitted
# on human-labelled posts: under `neutral_below` the label was right at most NEUTRAL_ACCURACY of the time (the classifier
# cannot tell: 中性); from `very_from` up, at least VERY_ACCURACY of the time (非常). Each band holds MIN_BAND_TEXTS or more.
NEUTRAL_ACCURACY = 0.6
VERY_ACCURACY = 0.95
MIN_BAND_TEXTS = 20
LEVELS = ("非常负面", "负面", "中性", "正面", "非常正面")


def calibration_of(info):
    """(temperature, bias) as a checkpoint.json records them ((1, 0): not calibrated)."""
    record = info.get("calibration") or {}
    return float(record.get("temperature", 1.0)), float(record.get("bias", 0.0))


def calibration_halves(val_rows, seed):
    """(fit, held_out): a seeded, stratified halving of the validation rows; compare.py reports on the held-out half."""
    if len(val_rows) < MIN_TEXTS:
        return val_rows.iloc[:0], val_rows
    stratify = val_rows["label"] if val_rows["label"].value_counts().min() >= 2 else None
    return train_test_split(val_rows, test_size=0.5, stratify=stratify, random_state=seed)


def _logits(probabilities):
    """The logits up to one constant per row, which the softmax ignores: log p."""
    return np.log(np.clip(np.asarray(probabilities, dtype=np.float64), 1e-30, None))


def apply_calibration(probabilities, temperature, bias=0.0):
    """softmax(logits / T + [0, bias]), from softmax(logits)."""
    scaled = _logits(probabilities) / np.asarray(temperature, dtype=np.float64).reshape(-1, 1)
    scaled[:, 1] += bias
    return np.exp(log_softmax(scaled, axis=1)).astype(np.float32)


def recall_balancing_threshold(probabilities, labels):
    """The threshold on log P(positive) - log P(negative) at which the two classes' recall is closest to equal (the
    one nearest 0 among equals): above it a text is called positive. 0 when one class is missing: nothing to balance."""
    margin = _logits(probabilities) @ np.array([-1.0, 1.0])
    labels = np.asarray(labels)
    negatives, positives = np.sort(margin[labels == 0]), np.sort(margin[labels == 1])
    if not len(negatives) or not len(positives):
        return 0.0
    candidates = np.append(np.unique(margin), 0.0)
    recall_negative = np.searchsorted(negatives, candidates, side="left") / len(negatives)
    recall_positive = 1 - np.searchsorted(positives, candidates, side="left") / len(positives)
    return float(candidates[np.lexsort((np.abs(candidates), np.abs(recall_negative - recall_positive)))[0]])


def fit_temperature(probabilities, labels, threshold=0.0):
    """The T in TEMPERATURE_RANGE that minimises the negative log-likelihood of `labels` under softmax((logits -
    [0, threshold]) / T) (probabilities at T = 1)."""
    log_p = _logits(probabilities)
    log_p[:, 1] -= threshold
    rows, labels = np.arange(len(log_p)), np.asarray(labels)

    def loss(log_t):
        return -log_softmax(log_p / np.exp(log_t), axis=1)[rows, labels].mean()

    low, high = np.log(TEMPERATURE_RANGE[0]), np.log(TEMPERATURE_RANGE[1])
    return float(np.exp(minimize_scalar(loss, bounds=(low, high), method="bounded").x))


def fit_bands(probabilities, labels):
    """{neutral_below, very_from}: the two edges on the confidence (the calibrated probability of the label given) by
    the rule above; 0.5 (no neutral band) or 1.0 (no 'very' band) where no band of MIN_BAND_TEXTS posts meets it."""
    confidence = probabilities.max(axis=1)
    order = np.argsort(confidence, kind="stable")
    sure, right = confidence[order], (probabilities.argmax(axis=1) == np.asarray(labels))[order]
    counts = np.arange(1, len(sure) + 1)
    below = np.cumsum(right) / counts  # accuracy of the k least sure
    above = np.cumsum(right[::-1])[::-1] / counts[::-1]  # accuracy from the k-th least sure up
    unsure = np.nonzero((below <= NEUTRAL_ACCURACY) & (counts >= MIN_BAND_TEXTS))[0]
    if not len(unsure):
        neutral_below = 0.5  # no neutral band
    else:  # up to the next post's confidence; all of them: every confidence is 'cannot tell'
        neutral_below = float(sure[unsure[-1] + 1]) if unsure[-1] + 1 < len(sure) else 1.0
    very = np.nonzero((above >= VERY_ACCURACY) & (counts[::-1] >= MIN_BAND_TEXTS))[0]
    very_from = max(float(sure[very[0]]) if len(very) else 1.0, neutral_below)
    return {"neutral_below": round(neutral_below, 4), "very_from": round(very_from, 4)}


def level_of(label, confidence, bands):
    """One of LEVELS for a binary label and its confidence, by the bands {neutral_below, very_from}."""
    if confidence < bands["neutral_below"]:
        return LEVELS[2]
    return LEVELS[(4 if confidence >= bands["very_from"] else 3) if label == 1 else (0 if confidence >= bands["very_from"] else 1)]


def bands_report(probabilities, labels, bands):
    """Per level: its share of the texts and how often their binary label was right."""
    labels, said, sure = np.asarray(labels), probabilities.argmax(axis=1), probabilities.max(axis=1)
    levels = np.array([level_of(label, confidence, bands) for label, confidence in zip(said, sure)])
    return {level: {"share": round(float((levels == level).mean()), 4),
                    "accuracy": round(float((said == labels)[levels == level].mean()), 4) if (levels == level).any() else None}
            for level in LEVELS}


def calibration_error(probabilities, labels):
    """The expected calibration error of [n, 2] probabilities against 0/1 labels."""
    return expected_calibration_error(probabilities.max(axis=1), probabilities.argmax(axis=1) == np.asarray(labels))


def report(probabilities, labels):
    labels = np.asarray(labels)
    said = probabilities.argmax(axis=1)
    return {"calibration_error": round(calibration_error(probabilities, labels), 4), "accuracy": round(float((said == labels).mean()), 4),
            "recall": [round(float((said[labels == label] == label).mean()), 4) for label in (0, 1)]}


def describe(record):
    before, after = record["held_out"]["without_tags"]["before"], record["held_out"]["without_tags"]["after"]
    tagged = record["held_out"]["with_tags"]
    text = (f"temperature {record['temperature']:.3f}, bias {record['bias']:+.3f} (fitted on {record['fitted_on']}); on the other "
            f"{record['held_out_texts']:,} without tags, before -> after: recall negative / positive {before['recall'][0]:.3f} / "
            f"{before['recall'][1]:.3f} -> {after['recall'][0]:.3f} / {after['recall'][1]:.3f}, accuracy {before['accuracy']:.4f} -> "
            f"{after['accuracy']:.4f}, calibration error {before['calibration_error']:.3f} -> {after['calibration_error']:.3f}; "
            f"with tags: accuracy {tagged['before']['accuracy']:.4f} -> {tagged['after']['accuracy']:.4f}, calibration error "
            f"{tagged['before']['calibration_error']:.3f} -> {tagged['after']['calibration_error']:.3f}")
    if record.get("bands"):
        text += "; " + describe_bands(record["bands"])
    return text


def describe_bands(bands):
    shares = ", ".join(f"{level} {band['share']:.0%}" for level, band in bands["held_out"].items())
    return (f"five levels: 中性 under a confidence of {bands['neutral_below']:.3f}, 非常 from {bands['very_from']:.3f} "
            f"(of the held-out posts: {shares})")
