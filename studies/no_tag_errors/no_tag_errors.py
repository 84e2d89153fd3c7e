"""Where a classifier goes wrong once the emoticon tags are removed: accuracy by the length of the text left, how sure
it is when wrong, what a confidence threshold keeps (BettaFish's min_confidence) and how right that is, the expected
calibration error, and its surest mistakes, on train.py's validation split. The labels of weibo_senti_100k were made
from the tags, so a text whose words say one thing and whose tag says the other counts as an error here.
python studies/no_tag_errors/no_tag_errors.py                                   # the default classifier
python studies/no_tag_errors/no_tag_errors.py --checkpoint models/classifiers/bert_lora
Writes studies/no_tag_errors/results.{json,md}.
"""
import os
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from weibo_senti import cli, repo_relative  # noqa: E402
from weibo_senti.checkpoint import atomic_file, write_json_atomic  # noqa: E402
from weibo_senti.data import expected_calibration_error, load_labelled_csv, split_train_val, strip_emoticons  # noqa: E402
from weibo_senti.predict import Classifier  # noqa: E402

CHECKPOINT = Path("models/classifiers/adapter_tuning")  # a trained checkpoint folder
DATA = Path(os.environ.get("WEIBO_SENTI_DATA", "dataset/weibo_senti_100k.csv"))  # label,review CSV
VAL_FRACTION = 0.1  # as in train.py
SEED = 42  # as in train.py
MAX_SAMPLES = 0  # the validation part of train.py's --max-samples subset of this many rows (0 = all), to match such a run
LENGTH_BINS = "0,1,5,10,20,40,80"  # lower edges, in characters of the text left without tags
SURE = 0.9  # an error is "sure" when the wrong class gets at least this probability
SHOWN = 20  # the surest errors listed in the report
MIN_CONFIDENCES = "0.5,0.6,0.7,0.8,0.9,0.95"  # thresholds on the confidence (the probability of the label given)
CALIBRATION_BINS = 10  # equal-width confidence bins of the expected calibration error
OUT = Path("studies/no_tag_errors/results")  # .json and .md are written


def _length_bin(low, high):
    return f"{low}+" if high is None else str(low) if high == low + 1 else f"{low}-{high - 1}"


def main(cfg):
    table, report = load_labelled_csv(cfg.data)
    print(report)
    _, val = split_train_val(table, cfg.val_fraction, cfg.seed, cfg.max_samples)
    texts = [strip_emoticons(text) for text in val["review"]]
    labels = val["label"].to_numpy()
    positive = Classifier.load(cfg.checkpoint, mixed_precision="auto").probabilities(texts)[:, 1]
    right = (positive >= 0.5).astype(int) == labels
    wrong_class_probability = np.where(labels == 1, 1 - positive, positive)
    sure_errors = int(((~right) & (wrong_class_probability >= cfg.sure)).sum())

    lengths = np.array([len(text.strip()) for text in texts])
    edges = [int(edge) for edge in cfg.length_bins.split(",")] + [None]
    by_length = []
    for low, high in zip(edges, edges[1:]):
        inside = (lengths >= low) & (lengths < (high or lengths.max() + 1))
        if inside.any():
            by_length.append({"characters": _length_bin(low, high), "texts": int(inside.sum()),
                              "accuracy": round(float(right[inside].mean()), 4)})
    confidence = np.maximum(positive, 1 - positive)
    by_min_confidence = []
    for threshold in (float(t) for t in cfg.min_confidences.split(",")):
        kept = confidence >= threshold
        by_min_confidence.append({"min_confidence": threshold, "share_kept": round(float(kept.mean()), 4),
                                  "accuracy_of_kept": round(float(right[kept].mean()), 4) if kept.any() else None})
    surest = np.argsort(-np.where(right, -1.0, wrong_class_probability))[: min(cfg.shown, int((~right).sum()))]
    examples = [{"label": int(labels[i]), "p_positive": round(float(positive[i]), 3), "text": val["review"][i]} for i in surest]
    result = {
        "command": "python studies/no_tag_errors/no_tag_errors.py" + "".join(f" {arg}" for arg in sys.argv[1:]),
        "checkpoint": repo_relative(cfg.checkpoint),
        "texts": len(texts),
        "accuracy_no_tags": round(float(right.mean()), 4),
        "recall_without_tags": {name: round(float(right[labels == label].mean()), 4) for label, name in enumerate(("negative", "positive"))},
        "errors": int((~right).sum()),
        f"errors_with_wrong_class_p_at_least_{cfg.sure}": sure_errors,
        "accuracy_by_length_without_tags": by_length,
        "by_min_confidence_without_tags": by_min_confidence,
        "mean_confidence_without_tags": round(float(confidence.mean()), 4),
        "expected_calibration_error_without_tags": round(expected_calibration_error(confidence, right, cfg.calibration_bins), 4),
        "surest_errors": examples,
    }
    write_json_atomic(cfg.out.with_suffix(".json"), result)
    lines = [f"`{result['command']}` (checkpoint `{result['checkpoint']}`, {len(texts):,} validation texts, tags removed)", "",
             f"Accuracy {result['accuracy_no_tags']:.4f} (recall negative {result['recall_without_tags']['negative']:.3f}, positive "
             f"{result['recall_without_tags']['positive']:.3f}); {result['errors']:,} errors, {sure_errors:,} of them with "
             f"P(wrong class) ≥ {cfg.sure}.", "", "| characters left | texts | accuracy |", "|---|---:|---:|"]
    lines += [f"| {row['characters']} | {row['texts']:,} | {row['accuracy']:.3f} |" for row in by_length]
    lines += ["", f"Mean confidence {result['mean_confidence_without_tags']:.4f} at accuracy {result['accuracy_no_tags']:.4f}; "
              f"expected calibration error {result['expected_calibration_error_without_tags']:.4f} ({cfg.calibration_bins} bins).", "",
              "| min_confidence | texts kept | accuracy of those kept |", "|---:|---:|---:|"]
    lines += [f"| {row['min_confidence']:g} | {row['share_kept']:.1%} | {'-' if row['accuracy_of_kept'] is None else format(row['accuracy_of_kept'], '.3f')} |" for row in by_min_confidence]
    lines += ["", "Surest errors (the text as in the dataset, tags included; the model saw it without them):", "",
              "| label | P(positive) | text |", "|---:|---:|---|"]
    lines += [f"| {e['label']} | {e['p_positive']:.3f} | {e['text'][:120].replace('|', '¦').replace(chr(10), ' ')} |" for e in examples]
    with atomic_file(cfg.out.with_suffix(".md")) as handle:
        handle.write("\n".join(lines) + "\n")
    print("\n".join(lines[:len(by_length) + len(by_min_confidence) + 11]))


if __name__ == "__main__":
    cli.main(lambda: main(cli.parse_config(globals())))
