"""Score Weibo posts: the interactive console of the original scripts, or --text / --file / stdin in batches."""
import argparse
import contextlib
import functools
import json
import os
import re
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import torch
from transformers import AutoConfig, AutoModelForSequenceClassification, pipeline

from . import REPO_ROOT, UserError, tokens
from .calibration import apply_calibration, calibration_of
from .checkpoint import CheckpointError, atomic_file, find_checkpoint, load_checkpoint, read_info
from .data import MISSING_TEXT_MARKERS, DataError, read_csv_text, scores
from .onnx_backend import BACKENDS
from .models import (
    PRECISION_DTYPES, MIXED_PRECISIONS, MODELS_DIR, PAD_TO_MULTIPLE_OF, autocast, load_tokenizer, quiet_loading, resolve_mixed_precision, resolve_model,
)
from .pooling import use_mean_pooling

BACKEND_HELP = (
    "what scores the texts: torch; onnx (ONNX Runtime fp32, exported once beside the checkpoint); onnx-int8; auto: PyTorch on a GPU "
    "or a CPU with native bf16, else the fastest path measured on this kind of CPU (int8 only where it gave fp32's labels on >= 99.5%% of "
    "the check texts)"
)
SENTIMENTS = ("负面", "正面")  # label 0, label 1: BettaFish's names, one vocabulary in every output (the analyzer's levels add 中性 and 非常)
DEFAULT_MAX_LENGTH = 128
SHIPPED_CLASSIFIERS = MODELS_DIR / "classifiers"  # <method>/: the classifiers committed with the repository
DEFAULT_METHOD = "adapter_tuning"  # the default classifier's method: the best shipped one on people's labels (README, Results)
# score.py's default. Issue 43's rule: the fastest shipped classifier within 1 point of the default on people's labels
# (weibo2018's held-out posts, results/human_labels/runs.md). Issue 47's: one model in one installation unless the
# operator asks for two, so that a post scored in a table and through the analyzer gets one answer. Since 2026-12-05 the
# 4-layer student (0.8747 against 0.8787; 213 against 82 texts/s, README) qualifies under the first; the second keeps the
# default here, and docs/scoring.md gives the student's --checkpoint for an operator who wants the speed.
SCORING_CLASSIFIER = SHIPPED_CLASSIFIERS / DEFAULT_METHOD


def clean_text(text):
    """The original scripts' optional cleaning: {%...%} tags, @user, 【...】, zero-width characters, emoji."""
    text = re.sub(r"\{%.*?%\}", "", text)
    text = re.sub(r"@[\w\-]+[:：]?", "", text)
    text = re.sub(r"【.*?】", "", text)
    text = re.sub(r"[\u200b-\u200f\u2060\ufeff]", "", text)
    text = re.sub(r"[\U0001F000-\U0001FAFF\u2600-\u27BF\uFE0F]", "", text)
    return re.sub(r"\s+", " ", text).strip()


def runtime_options(cfg):
    """Classifier.load's options from a script's MIXED_PRECISION, BACKEND and BATCH_TOKENS settings; an unknown backend
    is refused here, before any data is read or any server starts."""
    if cfg.backend not in BACKENDS:
        raise UserError(f"--backend {cfg.backend}: not one of {', '.join(BACKENDS)}")
    return {"mixed_precision": cfg.mixed_precision, "backend": cfg.backend, "batch_tokens": getattr(cfg, "batch_tokens", 0)}


def prediction_device(backend):
    """Where PyTorch scores: the GPU when one is visible and the backend lets PyTorch run (torch, auto), else the CPU;
    the ONNX Runtime paths are its CPU build. CUDA_VISIBLE_DEVICES="" keeps a GPU machine's scoring on its CPU."""
    return torch.device("cuda" if backend in ("torch", "auto") and torch.cuda.is_available() else "cpu")


# score.py's and serve.py's batches and queue on a GPU, where not given on the command line (their constants are the
# CPU's). A GPU computes a batch of 64 texts in less time than the CPU takes to make it: large batches of about equal
# token counts keep it busy, and a queue as deep as many clients' requests together keeps them from 503s
# (results/gpu.md).
GPU_SETTINGS = {"batch_tokens": 65536, "chunk_rows": 50000, "max_batch_size": 4096, "max_queue": 65536}


def fit_to_device(cfg):
    """On a GPU, the GPU_SETTINGS that the command line did not give. Returns the start-up line saying where the texts
    are scored and with which batches."""
    runtime_options(cfg)  # checks --backend
    device = prediction_device(cfg.backend)
    if device.type == "cuda":
        for name, value in GPU_SETTINGS.items():
            if hasattr(cfg, name) and name not in cfg.given:
                setattr(cfg, name, value)
    names = [name for name in ("batch_size", "forward_batch_size", *GPU_SETTINGS) if hasattr(cfg, name)]
    chosen = ", ".join(f"--{name.replace('_', '-')} {getattr(cfg, name)}" for name in names)
    where = f"GPU ({torch.cuda.get_device_name(device)}): where not given, the GPU's" if device.type == "cuda" else "CPU"
    return f"device: {where} batches and queue: {chosen}"


def text_problem(text):
    """Why `text` cannot be scored, or None: every input gets a result or a named error, never a traceback."""
    if not isinstance(text, str):
        return f"not text ({type(text).__name__})"
    if not text.strip():
        return "empty text"
    if "\x00" in text:
        return "contains a NUL character (binary data?)"
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as error:
        return f"not valid Unicode at character {error.start} (an unpaired surrogate)"
    return None


def prediction_cut(info):
    """The tokens a checkpoint's texts are cut at when predicting: checkpoint.json's predict_max_length, where training
    recorded a longer cut measured better on its base, else the training cut."""
    return info.get("predict_max_length", info["max_length"])


def cast_keeping_head_fp32(model, dtype):
    """Cast the model's weights to `dtype`, all but the classification head, which reads its input in fp32: the logits,
    and so the calibrated confidence, keep fp32's resolution."""
    model.to(dtype)
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    head = getattr(inner, "classifier", None) or getattr(inner, "score", None)
    if isinstance(head, torch.nn.Module):
        head.float()
        head.register_forward_pre_hook(lambda module, args: tuple(a.float() if torch.is_tensor(a) and a.is_floating_point() else a for a in args))
    return model


class Classifier:
    """A loaded model with its tokenizer; predict() takes any number of texts and batches them by length."""

    def __init__(self, model, tokenizer, max_length, source, use_pipeline=False, clean=False, mixed_precision="no", backend="torch",
                 checkpoint=None, calibration=(1.0, 0.0), text_prefix="", batch_tokens=0):
        """backend: torch, onnx (ONNX Runtime fp32), onnx-int8, or auto (onnx_backend.resolve_backend); the onnx ones
        export `checkpoint` (a folder) once and keep the export beside it. calibration: (temperature, bias), applied as
        softmax(logits / temperature + [0, bias]) (calibration.py fits them; checkpoint.json keeps them). text_prefix:
        put before every text, as the model was trained (e5's "passage: "). batch_tokens > 0: batches hold as many
        length-sorted texts as fit in that many padded tokens, instead of batch_size texts. The model moves to
        prediction_device(); on a GPU in bf16 (fp16) its weights are cast once, the head kept in fp32."""
        if model.config.num_labels != 2:
            raise CheckpointError(f"{source}: a two-class (negative, positive) classifier is needed, it has {model.config.num_labels} labels")
        self.model, self.tokenizer, self.max_length, self.source, self.clean = (
            model.to(prediction_device(backend)).eval(), tokenizer, max_length, source, clean)
        (self.temperature, self.bias), self.text_prefix = calibration, text_prefix
        self.adapter_calibrations = {}  # adapter name -> its checkpoint's (temperature, bias), for a PeftModel serving several
        self.batch_tokens = batch_tokens
        # on a CPU the weights stay fp32 and 'bf16' runs the forward pass under autocast; on a GPU autocast's per-call
        # casts cost more CPU time than the forward pass of a small model, so the weights are cast once instead
        self.precision, self.precision_reason = resolve_mixed_precision(mixed_precision, self.model.device.type)
        self.weights_cast = self.model.device.type == "cuda" and self.precision != "no"
        if self.weights_cast:
            cast_keeping_head_fp32(self.model, PRECISION_DTYPES[self.precision])
            self.precision_reason += "; weights cast once, the head in fp32"
        self.onnx, self.backend, self.backend_reason = None, "torch", "as asked"
        if backend != "torch":
            self._use_onnx(backend, checkpoint, use_pipeline)
        self.pipeline = None
        if use_pipeline:
            # A PeftModel's base model carries the LoRA layers and the trained head, so the pipeline sees the trained model.
            plain_model = model.get_base_model() if hasattr(model, "get_base_model") else model
            self.pipeline = pipeline("text-classification", model=plain_model, tokenizer=tokenizer, top_k=None, device=model.device)

    def _use_onnx(self, choice, checkpoint, use_pipeline):
        from . import onnx_backend

        onnx_backend.check_backend(choice)
        cannot = (
            "--pipeline runs PyTorch" if use_pipeline
            else "a LoRA model kept unmerged, to share its base with other adapters, runs PyTorch" if hasattr(self.model, "peft_config")
            else "a model on a GPU runs PyTorch" if self.model.device.type != "cpu"
            else "a model not loaded from a folder has nowhere to keep its export" if checkpoint is None
            else None
        )
        if cannot:
            if choice != "auto":
                raise UserError(f"--backend {choice}: {cannot}; use --backend torch or auto")
            self.backend_reason = f"auto: {cannot}"
            return
        measured = functools.cache(lambda: onnx_backend.measured_here(self, checkpoint))
        self.backend, self.backend_reason = onnx_backend.resolve_backend(choice, self.precision == "bf16", measured)
        if self.backend == "torch":
            return
        if self.backend == "onnx-int8":  # asked for, or chosen by auto: said where it falls short of the bar
            fidelity = measured()["int8_fidelity"]
            agreement = fidelity["identical_labels"]
            if np.isnan(agreement):
                print("note: int8 was not checked against PyTorch fp32 (no data set at export), so --backend auto would not "
                      "take it", file=sys.stderr)
            elif not agreement >= onnx_backend.FIDELITY_BAR:
                print(f"note: int8 gave PyTorch fp32's label on {agreement:.1%} of the check texts (largest change of P(positive) "
                      f"{fidelity['max_change_prob_positive']:.3f}), below the {onnx_backend.FIDELITY_BAR:.1%} that "
                      "--backend auto asks of it", file=sys.stderr)
        folder, record = onnx_backend.ensure_exported(self, checkpoint)
        self.onnx = onnx_backend.load_exported(folder, record, self.backend)
        self.precision, self.precision_reason = "no", "ONNX Runtime"

    @property
    def max_length(self):
        return self.encoder.max_length

    @max_length.setter
    def max_length(self, tokens_at_most):
        self.encoder = tokens.TextEncoder(self.tokenizer, tokens_at_most)

    @property
    def runs_as(self):
        """What scores the texts, in words: PyTorch fp32 / bf16, ONNX Runtime fp32 / int8."""
        if self.backend == "torch":
            on_gpu = f" on {torch.cuda.get_device_name(self.model.device)}" if self.model.device.type == "cuda" else ""
            return f"PyTorch {'fp32' if self.precision == 'no' else self.precision}{on_gpu}"
        from .onnx_backend import NAMES

        return NAMES[self.backend]

    def describe_runtime(self):
        """The line scripts print on what scores the texts and why."""
        if self.backend == "torch":
            return f"runs as: {self.runs_as} (precision: {self.precision_reason}; backend: {self.backend_reason})"
        return f"runs as: {self.runs_as} ({self.backend_reason})"

    @classmethod
    def load(cls, location, expected_method=None, merge_lora=True, **options):
        """A checkpoint of this toolkit, a plain (or merged) classifier folder, or a hub id of a fine-tuned classifier.
        merge_lora: fold a LoRA checkpoint into its base (half the prediction time on a CPU, the same labels); False
        keeps the PeftModel, to which more adapters can be added."""
        path = find_checkpoint(Path(location))
        if (path / "checkpoint.json").is_file():
            model, tokenizer, info = load_checkpoint(path, expected_method)
            if merge_lora and hasattr(model, "merge_and_unload"):
                model = model.merge_and_unload()
            return cls(model, tokenizer, prediction_cut(info), f"{path} ({info['method']}, base {info['base_model']})", checkpoint=path,
                       calibration=calibration_of(info), text_prefix=info.get("text_prefix", ""), **options)
        if path.is_dir() and not (path / "config.json").is_file():
            raise CheckpointError(f"{path} is neither a checkpoint of this toolkit (no checkpoint.json) nor a classifier folder (no config.json)")
        if not path.is_dir() and (path.is_absolute() or str(location).startswith(".") or "/" not in str(location)):
            raise CheckpointError(f"no checkpoint at {path}: train one first (python <method>/train.py) or pass --checkpoint PATH")
        folder = resolve_model(str(location))
        config = AutoConfig.from_pretrained(folder)
        architectures = config.architectures or []
        if not any(name.endswith("ForSequenceClassification") for name in architectures):
            raise CheckpointError(
                f"{folder} is a base model ({', '.join(architectures) or 'no architecture recorded'}), not a trained classifier: "
                "fine-tune it with train.py, or pass a checkpoint folder with --checkpoint"
            )
        with quiet_loading() if getattr(config, "classifier_pooling", "cls") == "mean" else contextlib.nullcontext():
            model = AutoModelForSequenceClassification.from_pretrained(folder, dtype=torch.float32)  # a mean-pooled one has no pooler
        if getattr(config, "classifier_pooling", "cls") == "mean":
            use_mean_pooling(model)
        return cls(model, load_tokenizer(folder), DEFAULT_MAX_LENGTH, f"{location} (plain classifier)", checkpoint=folder,
                   calibration=(getattr(config, "calibration_temperature", 1.0), getattr(config, "calibration_bias", 0.0)), text_prefix=getattr(config, "text_prefix", ""), **options)

    def probabilities(self, texts, batch_size=64, adapter_names=None):
        """[n, 2] array of P(negative), P(positive). adapter_names: for a PEFT model holding several adapters, the one
        to score each text with (one batch may mix them)."""
        texts = [self.text_prefix + (clean_text(t) if self.clean else t) for t in texts]
        if self.pipeline is not None:
            return apply_calibration(self._pipeline_probabilities(texts, batch_size), self.temperature, self.bias)
        return self.probabilities_with(self.onnx, texts, batch_size, adapter_names)

    def probabilities_with(self, onnx_model, texts, batch_size=64, adapter_names=None, precision=None):
        """probabilities() through an onnx_backend.OnnxModel, or through PyTorch when it is None (in `precision`, by
        default the classifier's). Batches are sorted by token length; the logits come back from the device once."""
        precision = "no" if onnx_model is not None else precision or self.precision
        device = self.model.device if onnx_model is None else torch.device("cpu")
        multiple = PAD_TO_MULTIPLE_OF["bf16" if self.weights_cast else precision]
        made = tokens.batches(texts, self.encoder, batch_size, self.batch_tokens, multiple, tokens.WINDOW if device.type == "cuda" else None)
        positions, logits = [], []
        with torch.inference_mode(), contextlib.nullcontext() if self.weights_cast else autocast(precision, device.type):
            for rows, input_ids, attention_mask in tokens.to_device(made, device):
                if onnx_model is not None:
                    batch_logits = torch.from_numpy(onnx_model.logits(input_ids.numpy(), attention_mask.numpy()))
                else:
                    extra = {"adapter_names": [adapter_names[i] for i in rows]} if adapter_names is not None else {}
                    batch_logits = self.model(input_ids=input_ids, attention_mask=attention_mask, **extra).logits
                positions.append(rows)
                logits.append(batch_logits.float())
        result = np.zeros((len(texts), 2), dtype=np.float32)
        if positions:
            positions = np.concatenate(positions)
            temperature, bias = self._calibrations(positions, adapter_names)
            scaled = torch.cat(logits).cpu() / temperature
            scaled[:, 1] += bias
            result[positions] = torch.softmax(scaled, dim=-1).numpy()
        if onnx_model is not None and onnx_model.recheck_margin:  # int8's second look: the near-even texts again, in fp32
            near = np.flatnonzero(np.abs(result[:, 1] - 0.5) < onnx_model.recheck_margin)
            if len(near):
                result[near] = self.probabilities_with(onnx_model.recheck_model, [texts[i] for i in near], batch_size)
        return result

    def _calibrations(self, rows, adapter_names):
        """(temperature, bias) for the texts `rows`: the classifier's, or per text that of the adapter it is scored with."""
        if adapter_names is None:
            return self.temperature, self.bias
        pairs = torch.tensor([self.adapter_calibrations.get(adapter_names[i], (self.temperature, self.bias)) for i in rows])
        return pairs[:, :1], pairs[:, 1]

    def _pipeline_probabilities(self, texts, batch_size):
        label2id = self.model.config.label2id
        with autocast(self.precision, self.model.device.type):
            outputs = self.pipeline(texts, batch_size=batch_size, truncation=True, max_length=self.max_length)
        result = np.zeros((len(texts), 2), dtype=np.float32)
        for row, scores in enumerate(outputs):
            for score in scores:
                result[row, label2id[score["label"]]] = score["score"]
        return result

    def predict(self, texts, batch_size=64, adapter_names=None):
        probabilities = self.probabilities(list(texts), batch_size, adapter_names)
        labels = probabilities.argmax(axis=1)
        return [
            {"label": int(label), "sentiment": SENTIMENTS[label], "confidence": float(p[label]), "prob_positive": float(p[1])}
            for label, p in zip(labels, probabilities)
        ]

    def text_problem(self, text):
        """text_problem(), and with --clean, a text that cleaning leaves empty (it would be scored as if it said nothing)."""
        problem = text_problem(text)
        if problem is None and self.clean and not clean_text(text):
            return "empty once cleaned (--clean removed all of it)"
        return problem

    def predict_each(self, texts, batch_size=64):
        """One entry per text, in order: predict()'s result, or {"error": why} for a text that cannot be scored.
        A batch that fails is retried text by text, so one bad text never costs the others their results."""
        texts = list(texts)
        results = [{"error": problem} if (problem := self.text_problem(text)) else None for text in texts]
        good = [i for i, result in enumerate(results) if result is None]
        try:
            for i, result in zip(good, self.predict([texts[i] for i in good], batch_size)):
                results[i] = result
        except Exception:
            for i in good:
                try:
                    results[i] = self.predict([texts[i]])[0]
                except Exception as error:
                    results[i] = {"error": f"cannot be scored: {type(error).__name__}: {str(error).splitlines()[0][:200] if str(error) else ''}"}
        return results


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
        result = classifier.predict_each([text])[0]  # one bad input must not end the session
        if "error" in result:
            print(f"预测出错: {result['error']}")
            continue
        print(f"预测结果: {result['sentiment']} (置信度: {result['confidence']:.4f})")


RESULT_COLUMNS = ("pred_label", "sentiment", "confidence", "prob_positive", "error")


def output_path(path, out):
    """Where --file's results go, checked before any scoring: an output that cannot be written fails at once."""
    out = Path(out) if out else path.with_name(path.stem + ".predictions.csv")
    if out.is_dir():
        raise DataError(f"--out {out}: a folder is there; give the path of the CSV file to write")
    if not out.parent.is_dir():
        raise DataError(f"--out {out}: the folder {out.parent} does not exist; create it first or choose another --out")
    if not os.access(out.parent, os.W_OK):
        raise DataError(f"--out {out}: the folder {out.parent} is not writable")
    return out


def read_file_to_score(path, column):
    """--file's table, checked before the model loads: the text column is there, and no column of the user's would be
    overwritten by the results."""
    table = read_csv_text(path, hint=None)
    if column not in table.columns:
        raise DataError(f"{path}: no column '{column}' (columns: {', '.join(table.columns)}); choose one with --column")
    if table.empty:
        raise DataError(f"{path}: the file has a header but no rows: nothing to score")
    clash = [name for name in RESULT_COLUMNS if name in table.columns]
    if clash:
        raise DataError(f"{path}: it already has the column(s) {', '.join(clash)}, which the results would overwrite; "
                        "rename them first (an earlier predictions file: score the original file instead)")
    return table


def score_file(classifier, path, table, column, out, batch_size):
    """Adds RESULT_COLUMNS to the CSV; rows that cannot be scored keep empty results and say why in 'error'.
    Returns the number of such rows."""
    texts = ["" if text in MISSING_TEXT_MARKERS else text for text in table[column]]  # empty or NaN cells: skipped, said why
    results = classifier.predict_each(texts, batch_size)
    for key in RESULT_COLUMNS:
        source = "label" if key == "pred_label" else key
        table[key] = [result.get(source, "") for result in results]
    failed = sum("error" in result for result in results)
    try:
        with atomic_file(out, newline="") as handle:
            table.to_csv(handle, index=False, lineterminator="\r\n")  # RFC 4180; also makes csv quote a text holding a lone \r
    except OSError as error:  # a full disk, say: the temporary file is gone and any earlier file is as it was
        raise DataError(f"--out {out}: cannot be written ({os.strerror(error.errno) if error.errno else error}); nothing was written there") from None
    print(f"scored {len(table) - failed:,} of {len(table):,} texts from {path} -> {out}", file=sys.stderr)
    if failed:
        reasons = Counter(result["error"] for result in results if "error" in result)
        print(f"{failed:,} rows not scored (see the 'error' column): " + "; ".join(f"{n:,} {why}" for why, n in reasons.most_common()), file=sys.stderr)
    scored = table[table["error"] == ""]
    if len(scored) and "label" in scored.columns and scored["label"].isin(["0", "1"]).all():
        against_labels = scores(scored["label"].astype(int), scored["pred_label"].astype(int))
        print(f"against its 'label' column: accuracy {against_labels['accuracy']:.4f}, macro-F1 {against_labels['macro_f1']:.4f}", file=sys.stderr)
    return failed


def score_stream(classifier, lines, out, batch_size, chunk_lines=1024):
    """One text per input line (bytes or str), one JSON object per output line, in input order, in chunks so that a
    long stream starts answering at once. A line that cannot be scored gets {"line", "error"} there and a message on
    stderr; the others are scored all the same. Returns the number of such lines."""
    chunk, failed = [], 0
    for number, line in enumerate(lines, start=1):
        chunk.append((number, *_decoded(line)))
        if len(chunk) == chunk_lines:
            failed += _write_json_lines(classifier, chunk, out, batch_size)
            chunk = []
    if chunk:
        failed += _write_json_lines(classifier, chunk, out, batch_size)
    return failed


def _decoded(line):
    """(text, None) for a stdin line, or (None, why) for one that is not UTF-8."""
    if isinstance(line, bytes):
        try:
            line = line.decode("utf-8")
        except UnicodeDecodeError as error:
            return None, f"not UTF-8 (byte {error.start}: {line[error.start:error.start + 4]!r})"
    return line.rstrip("\r\n"), None


def _write_json_lines(classifier, chunk, out, batch_size):
    failed = 0
    results = classifier.predict_each([text for _, text, _ in chunk], batch_size)
    for (number, text, undecodable), result in zip(chunk, results):
        why = undecodable or result.get("error")
        if why == "empty text":
            row = {"line": number, "skipped": why}
        elif why:
            row = {"line": number, "error": why}
            failed += 1
            print(f"line {number}: {why}", file=sys.stderr)
        else:
            row = {"line": number, "text": text, **result}
        out.write(json.dumps(row, ensure_ascii=False).translate(_LINE_BREAKS_ESCAPED) + "\n")
    out.flush()
    return failed


# characters that end a line for str.splitlines() and many readers, though JSON allows them raw inside a string
_LINE_BREAKS_ESCAPED = str.maketrans({"\x85": "\\u0085", "\u2028": "\\u2028", "\u2029": "\\u2029"})


def default_classifier():
    """(method, checkpoint) that serve.py, score.py and BettaFish use unless told: DEFAULT_METHOD's own trained
    output/best, or before one is trained its shipped classifier."""
    return DEFAULT_METHOD, default_checkpoint(REPO_ROOT / DEFAULT_METHOD / "output" / "best", DEFAULT_METHOD)


def default_scoring_classifier():
    """score.py's checkpoint unless told: the user's own trained DEFAULT_METHOD output/best, or before one is trained the
    shipped SCORING_CLASSIFIER (whole crawls are where speed counts most)."""
    return default_checkpoint(REPO_ROOT / DEFAULT_METHOD / "output" / "best", DEFAULT_METHOD, SCORING_CLASSIFIER)


def default_checkpoint(trained, method, shipped=None):
    """The user's own best checkpoint; before one is trained, the classifier shipped with the repository (`shipped`, or
    the one of `method`)."""
    shipped = shipped or SHIPPED_CLASSIFIERS / method
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
    parser.add_argument(
        "--mixed-precision", default="auto", choices=MIXED_PRECISIONS,
        help="auto: bf16 where the CPU or GPU computes it natively (same labels as fp32 on >= 99.5%% of texts, see README), else fp32",
    )
    parser.add_argument("--backend", default="auto", choices=BACKENDS, help=BACKEND_HELP)
    args = parser.parse_args(argv)
    if args.text is not None and not args.text.strip():
        raise DataError("--text is empty: give the text to score")
    if args.batch_size < 1:
        raise DataError(f"--batch-size {args.batch_size}: must be at least 1")
    # the input and the output are checked before the model loads
    table = read_file_to_score(args.file, args.column) if args.file is not None else None
    out = output_path(args.file, args.out) if args.file is not None else None

    checkpoint = args.checkpoint or default_checkpoint(Path(trained_checkpoint), method)
    classifier = Classifier.load(
        checkpoint, expected_method=method, use_pipeline=args.pipeline, clean=args.clean, mixed_precision=args.mixed_precision,
        backend=args.backend,
    )
    print(classifier.describe_runtime(), file=sys.stderr)
    if args.text is not None:
        result = classifier.predict_each([args.text])[0]
        if "error" in result:
            raise DataError(f"--text: {result['error']}; give the text to score")
        print(f"{result['sentiment']} (置信度: {result['confidence']:.4f})")
    elif args.file is not None:
        if score_file(classifier, args.file, table, args.column, out, args.batch_size):
            raise SystemExit(1)
    elif not sys.stdin.isatty():
        if score_stream(classifier, sys.stdin.buffer, sys.stdout, args.batch_size):
            raise SystemExit(1)  # some lines failed: each is named on stderr and in the output
    else:
        console(classifier)
