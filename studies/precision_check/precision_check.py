"""Does bf16 change what a classifier says? Labels and speed in fp32 and in bf16 autocast, on the validation texts.

python studies/precision_check/precision_check.py adapter_tuning/output/best [more checkpoints ...]

For each checkpoint: the validation split of train.py (seed 42), as it is and with every [...] tag removed, scored
in fp32 and in bf16 (the same weights; autocast). Prints the share of identical labels, the largest change of
P(positive), both accuracies and texts/s; writes studies/precision_check/results.json. Target: identical labels on >= 99.5%.
"""
import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from weibo_senti import REPO_ROOT  # noqa: E402


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoints", nargs="+", type=Path)
    parser.add_argument("--data", type=Path, default=REPO_ROOT / "dataset" / "weibo_senti_100k.csv")
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "studies" / "precision_check" / "results.json")
    args = parser.parse_args()

    from weibo_senti.data import load_labelled_csv, scores, split_train_val, strip_emoticons
    from weibo_senti.predict import Classifier

    table, _ = load_labelled_csv(args.data)
    _, val = split_train_val(table, 0.1, seed=42)
    texts = {"val": val["review"].tolist(), "val_no_emoticons": val["review"].map(strip_emoticons).tolist()}
    results = []
    for checkpoint in args.checkpoints:
        classifier = Classifier.load(checkpoint)
        row = {"checkpoint": str(checkpoint), "texts": len(val)}
        for name, batch in texts.items():
            probabilities = {}
            for precision in ("no", "bf16"):
                classifier.precision = precision
                classifier.probabilities(batch[:64])  # warm-up
                started = time.perf_counter()
                probabilities[precision] = classifier.probabilities(batch)
                row[f"{name}_texts_per_second_{precision}"] = round(len(batch) / (time.perf_counter() - started), 1)
                row[f"{name}_accuracy_{precision}"] = scores(val["label"], probabilities[precision].argmax(1))["accuracy"]
            same = probabilities["no"].argmax(1) == probabilities["bf16"].argmax(1)
            row[f"{name}_identical_labels"] = float(same.mean())
            row[f"{name}_max_prob_change"] = float(np.abs(probabilities["no"][:, 1] - probabilities["bf16"][:, 1]).max())
        print(json.dumps(row, indent=2), flush=True)
        results.append(row)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"command": " ".join(["python", "studies/precision_check/precision_check.py", *sys.argv[1:]]), "results": results}, indent=2) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
