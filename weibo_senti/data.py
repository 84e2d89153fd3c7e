"""Read and check the labelled data (a label,review CSV, or weibo2018's mid,label,text lines), split it, and turn it
into padded batches."""
import io
import random
import re
import sys
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import torch
from sklearn.metrics import accuracy_score, confusion_matrix, f1_score, precision_recall_fscore_support
from sklearn.model_selection import train_test_split
from . import REPO_ROOT, UserError

LABEL_NAMES = ("negative", "positive")  # label 0, label 1
DATA_ENV_VAR = "WEIBO_SENTI_DATA"
PUBLIC_DATASET_HINT = (
    "weibo_senti_100k is public: ChineseNlpCorpus (github.com/SophonPlus/ChineseNlpCorpus, "
    "datasets/weibo_senti_100k). Save it as dataset/weibo_senti_100k.csv, or point to your copy with "
    f"--data PATH or the environment variable {DATA_ENV_VAR}=PATH."
)
# weibo2018 (BettaFish's WeiboSentiment_MachineLearning data): posts labelled by people from their words, not from tags
HUMAN_DATA = REPO_ROOT / "dataset" / "weibo2018" / "train.txt"
HUMAN_VAL_ROWS = 1500  # posts of it held out for choosing the best epoch, the calibration and the report
HUMAN_SPLIT_SEED = 2018  # fixed, whatever --seed says: every run and every checkpoint is judged on the same posts
MISSING_TEXT_MARKERS = {"nan", "NaN", "NAN", "None", "null", "NULL"}  # what pandas or Excel wrote for an empty cell

# Weibo emoticon tags such as [哈哈] or [泪]: the labels of weibo_senti_100k were derived from them.
EMOTICON_TAG = re.compile(r"\[[^\[\]\s]{1,10}\]")


class DataError(UserError):
    """Bad input data; the message names the file, the rows and the column."""


def scores(labels, predictions):
    """Accuracy and macro-F1, the two figures every evaluation here reports."""
    return {
        "accuracy": float(accuracy_score(labels, predictions)),
        "macro_f1": float(f1_score(labels, predictions, average="macro")),
    }


CALIBRATION_BINS = 10


def expected_calibration_error(confidence, right, bins=CALIBRATION_BINS):
    """How far the stated confidence is from the accuracy it claims: the mean gap over equal-width bins, by their size."""
    confidence, right = np.asarray(confidence, dtype=float), np.asarray(right, dtype=float)
    edges = np.linspace(0.5, 1.0, bins + 1)
    which = np.clip(np.digitize(confidence, edges[1:-1]), 0, bins - 1)
    return float(sum(abs(confidence[which == b].mean() - right[which == b].mean()) * (which == b).mean()
                     for b in range(bins) if (which == b).any()))


def detailed_scores(labels, predictions, probabilities=None):
    """scores() plus precision and recall per class and the confusion matrix (rows: true label, columns: predicted),
    as the original scripts' evaluation listed them; with the [n, 2] probabilities, the expected calibration error."""
    precision, recall, _, support = precision_recall_fscore_support(labels, predictions, labels=[0, 1], zero_division=0)
    calibration = {}
    if probabilities is not None:
        right = np.asarray(predictions) == np.asarray(labels)
        calibration = {"calibration_error": expected_calibration_error(np.asarray(probabilities).max(axis=1), right)}
    return {
        **scores(labels, predictions),
        **calibration,
        "per_class": {
            name: {"precision": float(precision[i]), "recall": float(recall[i]), "support": int(support[i])}
            for i, name in enumerate(LABEL_NAMES)
        },
        "confusion_matrix": confusion_matrix(labels, predictions, labels=[0, 1]).tolist(),
    }


def strip_emoticons(text):
    return EMOTICON_TAG.sub("", text)


def _rows(row_numbers, shown=8):
    listed = ", ".join(str(r) for r in row_numbers[:shown])
    more = len(row_numbers) - shown
    return listed + (f" and {more:,} more" if more > 0 else "")


def _read_utf8(path, hint, kind="a .csv file"):
    """The file's text; a clear DataError when it is missing, not a regular file or not UTF-8."""
    if path.is_dir():
        raise DataError(f"{path} is a folder, not a file: give the path of {kind} itself")
    if path.exists() and not path.is_file():
        raise DataError(f"{path} is not a regular file (a device or a pipe?): give the path of {kind}")
    if not path.is_file():
        raise DataError(f"file not found: {path}" + (f"\n{hint}" if hint else ""))
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as error:
        line = raw[: error.start].count(b"\n") + 1
        raise DataError(
            f"{path}: not UTF-8 text (line {line}, byte offset {error.start}: {raw[error.start:error.start + 4]!r}). "
            f"Convert it first, for example: iconv -f GBK -t UTF-8 {path.name} > utf8.csv"
        ) from None
    return text.removeprefix("\ufeff")  # a BOM at the start of the file would become part of the first column name


def read_csv_text(path, hint=PUBLIC_DATASET_HINT):
    """The CSV as a DataFrame of strings; a clear DataError when the file is missing, not UTF-8 or not CSV.
    hint: what to do when the file is missing (where to get the training data; None for files to score)."""
    text = _read_utf8(path, hint)
    try:
        table = pd.read_csv(io.StringIO(text), dtype=str, keep_default_na=False)
    except (pd.errors.ParserError, pd.errors.EmptyDataError) as error:
        raise DataError(f"{path}: not a readable CSV file: {error}") from None
    _warn_of_swallowed_rows(path, table)
    return table


def _warn_of_swallowed_rows(path, table):
    """A quote left open swallows the lines after it into one cell until the next quote: legal CSV, so pandas says
    nothing. Lines inside a cell that have a row's number of commas are said on stderr, by row and column."""
    commas = len(table.columns) - 1
    if commas < 1:
        return
    for column in table.columns:
        multiline = table[column].str.contains("\n", regex=False)
        for index in table.index[multiline]:
            lines = table.at[index, column].split("\n")[1:]
            looks_like_rows = sum(line.count(",") == commas for line in lines)
            if looks_like_rows:
                print(f"warning: {path}: row {index + 2}, column '{column}' holds {looks_like_rows} line(s) that read as rows of "
                      "their own: a quote left open? They were read as one text", file=sys.stderr)


@dataclass
class DataReport:
    path: str
    rows_read: int
    rows_used: int = 0
    problems: list = field(default_factory=list)  # one line per kind of problem, with row numbers

    header: bool = True  # row 1 is a header line (a CSV); weibo2018's lines have none

    def __str__(self):
        head = f"{self.path}: {self.rows_read:,} rows read, {self.rows_used:,} used" + (" (row 1 is the header)" if self.header else "")
        return "\n".join([head] + [f"  {line}" for line in self.problems])


def read_weibo2018_lines(path):
    """weibo2018's format: one post a line, `mid,label,text`, no header; the text may hold commas (split on the first
    two). Returns a DataFrame of strings with the columns label and review, and line numbers as its index."""
    text = _read_utf8(path, PUBLIC_DATASET_HINT, "a weibo2018 .txt file")
    rows, labels, reviews = [], [], []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        parts = line.split(",", 2)
        if len(parts) < 3:
            raise DataError(f"{path}, line {number}: expected 'mid,label,text' (weibo2018's format), got {line[:60]!r}")
        rows.append(number)
        labels.append(parts[1])
        reviews.append(parts[2])
    return pd.DataFrame({"label": labels, "review": reviews}, index=rows)


def load_labelled_csv(path, hint=PUBLIC_DATASET_HINT):
    """Read `label,review` (or weibo2018's `mid,label,text` lines, a .txt file), drop the rows that cannot be used and
    say why. Returns (DataFrame, DataReport); its column `row` is the row number (the line, in a .txt file). hint: what
    a missing file's message adds (where the training data comes from; None for a file of one's own, as --extra)."""
    if path.suffix == ".txt":
        raw = read_weibo2018_lines(path)
        report = DataReport(str(path), len(raw), header=False)
        table = pd.DataFrame({"row": raw.index, "label": raw["label"].str.strip(), "review": raw["review"]})
    else:
        table = read_csv_text(path, hint=hint)
        table.columns = [str(c).strip() for c in table.columns]
        missing = [c for c in ("label", "review") if c not in table.columns]
        if missing:
            raise DataError(
                f"{path}: missing column(s) {', '.join(missing)}; the header is {', '.join(table.columns) or '(empty)'}. "
                "Expected a header line 'label,review' (1 positive, 0 negative)."
            )
        report = DataReport(str(path), len(table))
        table = pd.DataFrame({"row": range(2, len(table) + 2), "label": table["label"].str.strip(), "review": table["review"]})

    bad_label = ~table["label"].isin({"0", "1"})
    if bad_label.any():
        examples = ", ".join(repr(v) for v in table.loc[bad_label, "label"].unique()[:5])
        report.problems.append(
            f"dropped {bad_label.sum():,} rows whose column 'label' is not 0 or 1 ({examples}): rows {_rows(table.loc[bad_label, 'row'].tolist())}"
        )
        table = table[~bad_label]

    has_bom = table["review"].str.startswith("\ufeff")
    if has_bom.any():
        report.problems.append(
            f"removed a leading BOM (U+FEFF) from column 'review' in rows {_rows(table.loc[has_bom, 'row'].tolist())}"
        )
        table = table.assign(review=table["review"].str.lstrip("\ufeff"))

    empty = (table["review"].str.strip() == "") | table["review"].isin(MISSING_TEXT_MARKERS)
    if empty.any():
        report.problems.append(f"dropped {empty.sum():,} rows with an empty or NaN 'review': rows {_rows(table.loc[empty, 'row'].tolist())}")
        table = table[~empty]

    table = table.assign(label=table["label"].astype(int))
    conflicting = table.groupby("review")["label"].transform("nunique") > 1
    if conflicting.any():
        report.problems.append(
            f"dropped {conflicting.sum():,} rows whose 'review' text also appears with the other label "
            f"({table.loc[conflicting, 'review'].nunique():,} texts): rows {_rows(table.loc[conflicting, 'row'].tolist())}"
        )
        table = table[~conflicting]

    repeated = table.duplicated(subset=["review", "label"])
    if repeated.any():
        report.problems.append(
            f"dropped {repeated.sum():,} rows repeating an earlier row (would leak between train and validation): "
            f"rows {_rows(table.loc[repeated, 'row'].tolist())}"
        )
        table = table[~repeated]

    report.rows_used = len(table)
    if table.empty:
        raise DataError(f"{path}: no usable rows left.\n{report}")
    if table["label"].nunique() < 2:
        raise DataError(f"{path}: every usable row has label {table['label'].iloc[0]}; both 0 and 1 are needed.\n{report}")
    return table.reset_index(drop=True), report


def split_train_val(table, val_fraction, seed, max_samples=0):
    """Stratified, seeded split. max_samples > 0 then keeps a stratified subset of that many rows in all, taken from
    each part, so a quick run never trains on a text that the full run holds out for validation."""
    try:
        train, val = train_test_split(table, test_size=val_fraction, stratify=table["label"], random_state=seed)
        if 0 < max_samples < len(table):
            val_size = max(2, round(max_samples * val_fraction))
            train = _stratified_subset(train, max_samples - val_size, seed)
            val = _stratified_subset(val, val_size, seed)
    except ValueError as error:
        raise DataError(f"cannot split {len(table):,} rows with validation fraction {val_fraction} (max samples {max_samples}): {error}") from None
    return train.reset_index(drop=True), val.reset_index(drop=True)


def split_human(table, val_rows=HUMAN_VAL_ROWS, samples=0, seed=HUMAN_SPLIT_SEED):
    """The human-labelled posts' fixed split: (train, val), `val_rows` held out, stratified, with a seed no run changes.
    samples > 0: a stratified subset of that many training posts (the learning curve); validation stays the same."""
    try:
        train, val = train_test_split(table, test_size=min(val_rows, len(table) // 2), stratify=table["label"], random_state=seed)
        if 0 < samples < len(train):
            train = _stratified_subset(train, samples, seed)
    except ValueError as error:
        raise DataError(f"cannot split {len(table):,} human-labelled rows ({val_rows} for validation, {samples} for training): {error}") from None
    return train.reset_index(drop=True), val.reset_index(drop=True)


def _stratified_subset(table, size, seed):
    if size >= len(table):
        return table
    subset, _ = train_test_split(table, train_size=size, stratify=table["label"], random_state=seed)
    return subset


def encode_compactly(tokenizer, texts, max_length, chunk_size=2000, **options):
    """Token ids as one int32 array per text. Tokenizing in chunks matters: a fast tokenizer keeps a full Encoding
    (tokens, offsets, masks) per text of a call, about 800 MB for the 66k training texts in one call."""
    ids = []
    for start in range(0, len(texts), chunk_size):
        encoded = tokenizer(texts[start:start + chunk_size], truncation=True, max_length=max_length, return_attention_mask=False, **options)
        ids += [np.asarray(row, dtype=np.int32) for row in encoded["input_ids"]]
    return ids


class EncodedTexts(torch.utils.data.Dataset):
    """Texts tokenized once, unpadded; `collate` pads each batch to its own longest text.

    emoticon_drop > 0: each time a text is drawn, with that probability it comes without its emoticon tags, so the
    model cannot lean on the tags alone (the labels of weibo_senti_100k were derived from them).
    teacher_tokenizer: each item also carries the same text (tags dropped or not alike) in a teacher's own token ids,
    as teacher_input_ids, for knowledge distillation.
    text_prefix, teacher_prefix: put before every text the model (the teacher) reads, e.g. e5's "passage: "."""

    def __init__(self, texts, labels, tokenizer, max_length, emoticon_drop=0.0, teacher_tokenizer=None, text_prefix="", teacher_prefix=""):
        texts = list(texts)
        stripped = [strip_emoticons(text) for text in texts] if emoticon_drop > 0 else None
        self.labels = list(labels) if labels is not None else None
        self.emoticon_drop = emoticon_drop
        self.ids = {"input_ids": self._encoded(tokenizer, texts, stripped, max_length, text_prefix)}
        if teacher_tokenizer is not None:
            self.ids["teacher_input_ids"] = self._encoded(teacher_tokenizer, texts, stripped, max_length, teacher_prefix)
        self.input_ids = self.ids["input_ids"][0]

    @staticmethod
    def _encoded(tokenizer, texts, stripped, max_length, prefix):
        """(ids of the texts, ids of the texts without tags or None)"""
        def encode(some):
            return encode_compactly(tokenizer, [prefix + text for text in some] if prefix else some, max_length)

        return encode(texts), stripped and encode(stripped)

    def __len__(self):
        return len(self.input_ids)

    def __getitem__(self, index):
        drop = self.emoticon_drop > 0 and random.random() < self.emoticon_drop
        item = {key: (stripped if drop else whole)[index] for key, (whole, stripped) in self.ids.items()}
        if self.labels is not None:
            item["labels"] = self.labels[index]
        return item


class LengthGroupedBatches:
    """Batches of texts of similar length, so that padding to the longest costs little: shuffle, sort each window of
    `window` batches by length (window 1: no grouping), cut it into batches, shuffle the batches. Draws from torch's
    global generator, which the training loop seeds per epoch, so --resume and every process see the same batches.

    pools: [(positions, count)]: each epoch takes `count` positions of each pool drawn afresh (None: all of them), to mix
    sources in a set share; by default every text, every epoch."""

    def __init__(self, lengths, batch_size, window=50, pools=None):
        self.lengths, self.batch_size, self.window = lengths, batch_size, window
        self.pools = pools or [(list(range(len(lengths))), None)]

    def _epoch_positions(self):
        taken = []
        for positions, count in self.pools:
            if count is None or count >= len(positions):
                taken += positions
            else:
                taken += [positions[i] for i in torch.randperm(len(positions))[:count].tolist()]
        return [taken[i] for i in torch.randperm(len(taken)).tolist()]

    def __iter__(self):
        order = self._epoch_positions()
        span = self.batch_size * self.window
        batches = []
        for start in range(0, len(order), span):
            chunk = sorted(order[start:start + span], key=self.lengths.__getitem__)
            batches += [chunk[i:i + self.batch_size] for i in range(0, len(chunk), self.batch_size)]
        for index in torch.randperm(len(batches)).tolist():
            yield batches[index]

    def __len__(self):
        texts = sum(len(positions) if count is None else min(count, len(positions)) for positions, count in self.pools)
        return -(-texts // self.batch_size)


def make_collate(pad_token_id, pad_to_multiple_of=1, teacher_pad_token_id=None):
    """Pad each batch to its longest text, rounded up to a multiple of `pad_to_multiple_of`: in bf16, few distinct
    shapes let oneDNN reuse its compiled kernels (measured 1.17x faster steps at 8 on a 2-core CPU). A teacher's ids,
    when the items carry them, become teacher_input_ids and teacher_attention_mask."""

    def padded(rows, pad):
        longest = -(-max(len(row) for row in rows) // pad_to_multiple_of) * pad_to_multiple_of
        input_ids = torch.full((len(rows), longest), pad, dtype=torch.long)
        attention_mask = torch.zeros((len(rows), longest), dtype=torch.long)
        for i, row in enumerate(rows):
            input_ids[i, : len(row)] = torch.as_tensor(row)
            attention_mask[i, : len(row)] = 1
        return input_ids, attention_mask

    def collate(items):
        input_ids, attention_mask = padded([item["input_ids"] for item in items], pad_token_id)
        batch = {"input_ids": input_ids, "attention_mask": attention_mask}
        if "teacher_input_ids" in items[0]:
            batch["teacher_input_ids"], batch["teacher_attention_mask"] = padded([item["teacher_input_ids"] for item in items], teacher_pad_token_id)
        if "labels" in items[0]:
            batch["labels"] = torch.tensor([item["labels"] for item in items])
        return batch

    return collate
