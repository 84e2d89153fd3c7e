"""Does cutting texts at 128 tokens cost accuracy? The longest tenth of train.py's validation texts (by tokens, tags
removed), scored with the cut at each length, with and without tags, and what each length costs in texts/s. Weibo posts
rarely run past 128 tokens, so longer texts are also made from them: each of those texts followed by JOINED - 1 other
validation texts of its label (tags removed), a stand-in for the reviews and long posts of other sources.
python studies/length/length.py                                           # the default classifier
python studies/length/length.py --checkpoint models/classifiers/bert_lora --lengths 128,256
Writes studies/length/results.{json,md}.
"""
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from weibo_senti import cli, repo_relative  # noqa: E402
from weibo_senti.checkpoint import atomic_file, write_json_atomic  # noqa: E402
from weibo_senti.data import load_labelled_csv, scores, split_train_val, strip_emoticons  # noqa: E402
from weibo_senti.predict import Classifier, runtime_options  # noqa: E402
from bench.inference import cpu  # noqa: E402

CHECKPOINT = Path("models/classifiers/adapter_tuning")  # a trained checkpoint folder
DATA = Path(os.environ.get("WEIBO_SENTI_DATA", "dataset/weibo_senti_100k.csv"))  # label,review CSV
VAL_FRACTION = 0.1  # as in train.py
SEED = 42  # as in train.py
LONGEST_SHARE = 0.1  # the share of validation texts, longest first (in tokens, without tags), that is scored
LENGTHS = "128,256,512"  # cuts, in tokens, to compare
JOINED = 4  # validation texts of one label joined into each long text
BATCH_SIZE = 32  # texts per model call
MIXED_PRECISION = "auto"  # auto (bf16 where the CPU or GPU computes it natively, else fp32), no, bf16 or fp16 (CUDA only)
BACKEND = "torch"  # torch, onnx, onnx-int8 or auto (as predict.py)
OUT = Path("studies/length/results")  # .json and .md are written


def main(cfg):
    table, report = load_labelled_csv(cfg.data)
    print(report)
    _, val = split_train_val(table, cfg.val_fraction, cfg.seed)
    classifier = Classifier.load(cfg.checkpoint, **runtime_options(cfg))
    print(classifier.describe_runtime(), file=sys.stderr)
    without_tags = val["review"].map(strip_emoticons)
    tokens = np.array([len(ids) for ids in classifier.tokenizer(without_tags.tolist())["input_ids"]])
    longest = np.argsort(-tokens, kind="stable")[:max(1, int(round(cfg.longest_share * len(val))))]
    labels = val["label"].to_numpy()[longest]
    generator = np.random.default_rng(cfg.seed)
    joined = []
    for row in longest:
        same_label = np.flatnonzero((val["label"].to_numpy() == val["label"].iloc[row]) & (np.arange(len(val)) != row))
        joined.append("".join(without_tags.iloc[[row, *generator.choice(same_label, cfg.joined - 1, replace=False)]]))
    joined_tokens = np.array([len(ids) for ids in classifier.tokenizer(joined)["input_ids"]])
    result = {
        "command": " ".join(["python studies/length/length.py", *sys.argv[1:]]),
        "checkpoint": repo_relative(cfg.checkpoint),
        "runs_as": classifier.runs_as,
        "cpu": cpu(),
        "validation_texts": len(val),
        "tokens_without_tags": {
            "over_128": int((tokens > 128).sum()), "over_256": int((tokens > 256).sum()), "max": int(tokens.max()),
            "scored_texts": len(longest), "scored_min": int(tokens[longest].min()), "scored_median": int(np.median(tokens[longest])),
            "joined_median": int(np.median(joined_tokens)), "joined_over_512": int((joined_tokens > 512).sum()),
        },
        "by_length": [],
    }
    classifier.probabilities(joined[:cfg.batch_size], cfg.batch_size)  # warm-up, so that the first cut's texts/s is not the slowest
    for length in (int(value) for value in cfg.lengths.split(",")):
        classifier.max_length = length
        row = {"max_length": length}
        for name, chosen in (("without_tags", without_tags.to_numpy()[longest].tolist()),
                             ("with_tags", val["review"].to_numpy()[longest].tolist()), ("joined", joined)):
            started = time.perf_counter()
            predicted = classifier.probabilities(chosen, cfg.batch_size).argmax(axis=1)
            row[name] = {key: round(value, 4) for key, value in scores(labels, predicted).items()}
            row[name]["texts_per_second"] = round(len(chosen) / (time.perf_counter() - started), 1)
        result["by_length"].append(row)
        print(row, file=sys.stderr)
    write_json_atomic(cfg.out.with_suffix(".json"), result)
    counts = result["tokens_without_tags"]
    lines = [
        "# Accuracy of the longest texts by where they are cut", "",
        f"Command: `{result['command']}`; {result['checkpoint']}, {result['runs_as']}, on {result['cpu']['cores']} cores of "
        f"{result['cpu']['name']} ({', '.join(result['cpu']['flags']) or 'no AVX2'}).", "",
        f"Of {len(val):,} validation texts without tags, {counts['over_128']} run past 128 tokens and {counts['over_256']} past "
        f"256 (longest: {counts['max']}). Scored: the longest {counts['scored_texts']} ({counts['scored_min']} tokens or "
        f"more, median {counts['scored_median']}), without and with their tags; then each joined with {cfg.joined - 1} other "
        f"validation texts of its label, without tags (median {counts['joined_median']} tokens, {counts['joined_over_512']} "
        "past 512).", "",
        "| max_length | accuracy without tags | macro-F1 without tags | texts/s | accuracy with tags | joined: accuracy | joined: texts/s |",
        "|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in result["by_length"]:
        lines.append(f"| {row['max_length']} | {row['without_tags']['accuracy']:.4f} | {row['without_tags']['macro_f1']:.4f} | "
                     f"{row['without_tags']['texts_per_second']:.1f} | {row['with_tags']['accuracy']:.4f} | "
                     f"{row['joined']['accuracy']:.4f} | {row['joined']['texts_per_second']:.1f} |")
    with atomic_file(cfg.out.with_suffix(".md")) as handle:
        handle.write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    cli.main(lambda: main(cli.parse_config(globals())))
