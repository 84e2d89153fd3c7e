"""Score Weibo posts: the interactive console of the original scripts, or --text / --file / stdin in batches."""
import argparse
import json
import os
import re
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
from transformers import AutoConfig, AutoModelForSequenceClassification, pipeline

from .checkpoint import CheckpointError, find_checkpoint, load_checkpoint, read_info
from .data import DataError, read_csv_text, scores
from .models import MODELS_DIR, load_tokenizer, resolve_model

SENTIMENTS = ("负面情感", "正面情感")  # label 0, label 1, as the original console printed them
DEFAULT_MAX_LENGTH = 128
SHIPPED_CLASSIFIERS = MODELS_DIR / "classifiers"  # <method>/: trained on the embedded mini models, committed


def clean_text(text):
    """The original scripts' optional cleaning: {%...%} tags, @user, 【...】, zero-width characters, emoji."""
    text = re.sub(r"\{%.*?%\}", "", text)
    text = re.sub(r"@[\w\-]+[:：]?", "", text)
    text = re.sub(r"【.*?】", "", text)
    text = re.sub(r"[\u200b-\u200f\u2060\ufeff]", "", text)
    text = re.sub(r"[\U0001F000-\U0001FAFF\u2600-\u27BF\uFE0F]", "", text)
    return re.sub(r"\s+", " ", text).strip()


class Classifier:
    """A loaded model with its tokenizer; predict() takes any number of texts and batches them by length."""

    def __init__(self, model, tokenizer, max_length, source, use_pipeline=False, clean=False):
        if model.config.num_labels != 2:
            raise CheckpointError(f"{source}: a two-class (negative, positive) classifier is needed, it has {model.config.num_labels} labels")
        self.model, self.tokenizer, self.max_length, self.source, self.clean = model.eval(), tokenizer, max_length, source, clean
        self.pipeline = None
        if use_pipeline:
            # A PeftModel's base model carries the LoRA layers and the trained head, so the pipeline sees the trained model.
            plain_model = model.get_base_model() if hasattr(model, "get_base_model") else model
            self.pipeline = pipeline("text-classification", model=plain_model, tokenizer=tokenizer, top_k=None)

    @classmethod
    def load(cls, location, expected_method=None, **options):
        """A checkpoint of this toolkit, a plain (or merged) classifier folder, or a hub id of a fine-tuned classifier."""
        path = find_checkpoint(Path(location))
        if (path / "checkpoint.json").is_file():
            model, tokenizer, info = load_checkpoint(path, expected_method)
            return cls(model, tokenizer, info["max_length"], f"{path} ({info['method']}, base {info['base_model']})", **options)
        if path.is_dir() and not (path / "config.json").is_file():
            raise CheckpointError(f"{path} is neither a checkpoint of this toolkit (no checkpoint.json) nor a classifier folder (no config.json)")
        if not path.is_dir() and (path.is_absolute() or str(location).startswith(".") or "/" not in str(location)):
            raise CheckpointError(f"no checkpoint at {path}: train one first (python <method>/train.py) or pass --checkpoint PATH")
        folder = resolve_model(str(location))
        architectures = AutoConfig.from_pretrained(folder).architectures or []
        if not any(name.endswith("ForSequenceClassification") for name in architectures):
            raise CheckpointError(
                f"{folder} is a base model ({', '.join(architectures) or 'no architecture recorded'}), not a trained classifier: "
                "fine-tune it with train.py, or pass a checkpoint folder with --checkpoint"
            )
        model = AutoModelForSequenceClassification.from_pretrained(folder, dtype=torch.float32)
        return cls(model, load_tokenizer(folder), DEFAULT_MAX_LENGTH, f"{location} (plain classifier)", **options)

    def probabilities(self, texts, batch_size=64):
        """[n, 2] array of P(negative), P(positive)."""
        texts = [clean_text(t) if self.clean else t for t in texts]
        if self.pipeline is not None:
            return self._pipeline_probabilities(texts, batch_size)
        order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
        result = np.zeros((len(texts), 2), dtype=np.float32)
        with torch.inference_mode():
            for start in range(0, len(order), batch_size):
                chunk = order[start:start + batch_size]
                encoded = self.tokenizer([texts[i] for i in chunk], padding=True, truncation=True, max_length=self.max_length, return_tensors="pt")
                encoded = {key: value.to(self.model.device) for key, value in encoded.items() if key in ("input_ids", "attention_mask")}
                logits = self.model(**encoded).logits
                result[chunk] = torch.softmax(logits.float(), dim=-1).cpu().numpy()
        return result

    def _pipeline_probabilities(self, texts, batch_size):
        label2id = self.model.config.label2id
        outputs = self.pipeline(texts, batch_size=batch_size, truncation=True, max_length=self.max_length)
        result = np.zeros((len(texts), 2), dtype=np.float32)
        for row, scores in enumerate(outputs):
            for score in scores:
                result[row, label2id[score["label"]]] = score["score"]
        return result

    def predict(self, texts, batch_size=64):
        probabilities = self.probabilities(list(texts), batch_size)
        labels = probabilities.argmax(axis=1)
        return [
            {"label": int(label), "sentiment": SENTIMENTS[label], "confidence": float(p[label]), "prob_positive": float(p[1])}
            for label, p in zip(labels, probabilities)
        ]


def console(classifier, read=input):
    print(f"\nmodel: {classifier.source}")
    print("\n============= 微博情感分析 =============")
    print("输入微博内容进行分析 (输入 'q' 退出):")
    while True:
        try:
            text = read("\n请输入微博内容: ")
        except (EOFError, KeyboardInterrupt):
            print()
            return
        if text.strip().lower() == "q":
            return
        if not text.strip():
            print("输入不能为空，请重新输入")
            continue
        try:
            result = classifier.predict([text])[0]
        except Exception as error:  # one bad input must not end the session
            print(f"预测出错: {error}")
            continue
        print(f"预测结果: {result['sentiment']} (置信度: {result['confidence']:.4f})")


def score_file(classifier, path, column, out, batch_size):
    table = read_csv_text(path)
    if column not in table.columns:
        raise DataError(f"{path}: no column '{column}' (columns: {', '.join(table.columns)}); choose one with --column")
    results = classifier.predict(table[column].tolist(), batch_size)
    table["pred_label"] = [r["label"] for r in results]
    for key in ("sentiment", "confidence", "prob_positive"):
        table[key] = [r[key] for r in results]
    out = out or path.with_name(path.stem + ".predictions.csv")
    with tempfile.NamedTemporaryFile("w", encoding="utf-8", newline="", dir=out.parent, delete=False, suffix=".tmp") as tmp:
        table.to_csv(tmp, index=False)
    os.replace(tmp.name, out)
    print(f"scored {len(table):,} texts from {path} -> {out}", file=sys.stderr)
    if "label" in table.columns and table["label"].isin(["0", "1"]).all():
        against_labels = scores(table["label"].astype(int), table["pred_label"])
        print(f"against its 'label' column: accuracy {against_labels['accuracy']:.4f}, macro-F1 {against_labels['macro_f1']:.4f}", file=sys.stderr)


def score_stream(classifier, lines, out, batch_size, chunk_lines=1024):
    """One text per input line, one JSON object per output line, in chunks so a long stream starts answering at once."""
    chunk = []
    for line in lines:
        text = line.rstrip("\r\n")
        if text.strip():
            chunk.append(text)
        if len(chunk) == chunk_lines:
            _write_json_lines(classifier, chunk, out, batch_size)
            chunk = []
    if chunk:
        _write_json_lines(classifier, chunk, out, batch_size)


def _write_json_lines(classifier, texts, out, batch_size):
    for text, result in zip(texts, classifier.predict(texts, batch_size)):
        out.write(json.dumps({"text": text, **result}, ensure_ascii=False) + "\n")
    out.flush()


def default_checkpoint(trained, method):
    """The user's own best checkpoint; before one is trained, the classifier shipped with the repository."""
    shipped = SHIPPED_CLASSIFIERS / method
    if find_checkpoint(trained).is_dir() or not shipped.is_dir():
        return trained
    info = read_info(shipped)
    metrics = info["metrics"]
    print(
        f"no trained checkpoint at {trained}: using the classifier shipped with the repository, {shipped} "
        f"(base {info['base_model']}; validation accuracy {metrics['val_accuracy']:.3f}, "
        f"{metrics['val_no_emoticons_accuracy']:.3f} with emoticon tags removed). Train your own with {method}/train.py.",
        file=sys.stderr,
    )
    return shipped


def main(trained_checkpoint, method, argv=None):
    parser = argparse.ArgumentParser(
        description="Weibo sentiment: interactive console ('q' quits); --text, --file or lines on stdin score in batches.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument(
        "--checkpoint",
        help=f"checkpoint folder, merged classifier folder, or hub id of a fine-tuned classifier (default: {trained_checkpoint}, "
        f"or {SHIPPED_CLASSIFIERS / method} until you have trained one)",
    )
    parser.add_argument("--text", help="score this one text and exit")
    parser.add_argument("--file", type=Path, help="CSV file to score")
    parser.add_argument("--column", default="review", help="text column of --file")
    parser.add_argument("--out", type=Path, help="where --file's predictions go (default: <file>.predictions.csv)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--pipeline", action="store_true", help="score through transformers pipeline('text-classification')")
    parser.add_argument("--clean", action="store_true", help="remove {%%...%%} tags, @user, 【...】, zero-width characters and emoji first")
    args = parser.parse_args(argv)

    checkpoint = args.checkpoint or default_checkpoint(Path(trained_checkpoint), method)
    classifier = Classifier.load(checkpoint, expected_method=method, use_pipeline=args.pipeline, clean=args.clean)
    if args.text is not None:
        result = classifier.predict([args.text])[0]
        print(f"{result['sentiment']} (置信度: {result['confidence']:.4f})")
    elif args.file is not None:
        score_file(classifier, args.file, args.column, args.out, args.batch_size)
    elif not sys.stdin.isatty():
        score_stream(classifier, sys.stdin, sys.stdout, args.batch_size)
    else:
        console(classifier)
