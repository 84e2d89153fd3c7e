"""ONNX Runtime for CPU prediction: a classifier exported once per checkpoint (fp32 by torch.onnx.export, int8 by
ONNX Runtime's dynamic quantization with per-channel weights), cached beside it in onnx/<model id>/ with the int8
model's measured fidelity, and run through an InferenceSession. predict.Classifier chooses it with backend=...

optimum's exporter is not used: its ONNX exporter (optimum-onnx) requires transformers < 4.58, and this toolkit runs on 5.x.
"""
import json
import logging
import math
import os
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from filelock import FileLock

from . import UserError
from .checkpoint import CheckpointError, atomic_directory, find_checkpoint, model_name
from .predict import BACKENDS

FIDELITY_BAR = 0.995  # the least share of probe texts whose int8 label must equal fp32's for `auto` to choose int8
PROBE_TEXTS = 500  # validation texts, tags removed (the uncertain case), on which int8 is checked against fp32 at export
OPSET = 17
FP32_FILE, INT8_FILE, RECORD_FILE = "model.onnx", "model.int8.onnx", "export.json"
CACHE_ENV_VAR = "WEIBO_SENTI_ONNX_CACHE"  # where exports go when the checkpoint's folder cannot be written


def cache_folder(checkpoint):
    """<checkpoint>/onnx/<method@digest>/, or under $WEIBO_SENTI_ONNX_CACHE (default ~/.cache/weibo_senti/onnx) when the
    checkpoint's folder is read-only. The name holds the digest of the weights, so a retrained checkpoint exports anew (a recalibrated one does not)."""
    folder = find_checkpoint(Path(checkpoint))
    name = model_name(folder, graph_only=True).replace("@", "-")
    if os.access(folder, os.W_OK):
        return folder / "onnx" / name
    return Path(os.environ.get(CACHE_ENV_VAR, Path.home() / ".cache" / "weibo_senti" / "onnx")) / name


class _Logits(torch.nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask):
        return self.model(input_ids=input_ids, attention_mask=attention_mask).logits


def _export(model, tokenizer, path):
    example = tokenizer(["今天天气很好[哈哈]", "不开心"], padding=True, return_tensors="pt")
    dynamic = {0: "batch", 1: "length"}
    with warnings.catch_warnings(), torch.inference_mode(False), torch.no_grad():
        warnings.simplefilter("ignore")  # the tracer's notes on Python branches that hold for every input here
        torch.onnx.export(
            _Logits(model).eval(), (example["input_ids"], example["attention_mask"]), str(path), dynamo=False, opset_version=OPSET,
            input_names=["input_ids", "attention_mask"], output_names=["logits"],
            dynamic_axes={"input_ids": dynamic, "attention_mask": dynamic, "logits": {0: "batch"}},
        )


def _quantize(fp32_path, int8_path):
    from onnxruntime.quantization import QuantType, quantize_dynamic

    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)  # it logs advice to pre-process the model first, which is for static quantization
    try:
        quantize_dynamic(str(fp32_path), str(int8_path), per_channel=True, weight_type=QuantType.QInt8)
    finally:
        root.setLevel(level)


def probe_texts():
    """The texts int8 is checked on: the first PROBE_TEXTS validation texts of train.py's split, tags removed; [] when
    the data set is not there (then int8 is never chosen by itself)."""
    from . import REPO_ROOT
    from .data import DATA_ENV_VAR, load_labelled_csv, split_train_val, strip_emoticons

    path = Path(os.environ.get(DATA_ENV_VAR, REPO_ROOT / "dataset" / "weibo_senti_100k.csv"))
    if not path.is_file():
        return []
    try:
        _, val = split_train_val(load_labelled_csv(path)[0], 0.1, 42)
    except UserError:
        return []
    return [strip_emoticons(text) for text in val["review"][:PROBE_TEXTS]]


def fidelity(reference, other):
    """How far `other`'s [n, 2] probabilities are from `reference`'s: share of identical labels, largest change of
    P(positive)."""
    if not len(reference):
        return {"identical_labels": float("nan"), "max_change_prob_positive": float("nan")}
    return {
        "identical_labels": float((reference.argmax(axis=1) == other.argmax(axis=1)).mean()),
        "max_change_prob_positive": float(np.abs(reference[:, 1] - other[:, 1]).max()),
    }


def ensure_exported(classifier, checkpoint):
    """(cache folder, its export.json record) of `checkpoint`, exported and measured on first use (a minute or two for e5-small on 2 cores);
    a lock makes concurrent processes (Spark's workers, several servers) wait for one export instead of repeating it."""
    folder = cache_folder(checkpoint)
    if not (folder / RECORD_FILE).is_file():
        _export_once(classifier, checkpoint, folder)
    return folder, json.loads((folder / RECORD_FILE).read_text(encoding="utf-8"))


def _export_once(classifier, checkpoint, folder):
    try:
        folder.parent.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise CheckpointError(f"cannot write the ONNX export of {checkpoint} to {folder.parent}: {error.strerror or error}; "
                              f"set {CACHE_ENV_VAR} to a writable folder, or use --backend torch") from None
    with FileLock(str(folder) + ".lock"):
        if (folder / RECORD_FILE).is_file():
            return  # another process exported it while this one waited
        print(f"exporting {classifier.source} to ONNX (once; cached in {folder})", file=sys.stderr)
        with atomic_directory(folder) as tmp:
            _export(classifier.model, classifier.tokenizer, tmp / FP32_FILE)
            _quantize(tmp / FP32_FILE, tmp / INT8_FILE)
            texts = probe_texts()
            probabilities, speeds = {}, {}
            for backend, onnx_model in (("torch", None), ("onnx", OnnxModel(tmp / FP32_FILE)), ("onnx-int8", OnnxModel(tmp / INT8_FILE))):
                probabilities[backend], speeds[backend] = _timed(classifier, onnx_model, texts)
            record = {
                "model_id": model_name(checkpoint),
                "opset": OPSET,
                "versions": {"torch": torch.__version__, "onnxruntime": _onnxruntime().__version__},
                "int8_fidelity": {"texts": len(texts), "of": "validation texts without tags, against PyTorch fp32",
                                  **fidelity(probabilities["torch"], probabilities["onnx-int8"])},
                "texts_per_second": {"measured_on": "the probe texts, by the process that exported", **speeds},
            }
            (tmp / RECORD_FILE).write_text(json.dumps(record, indent=2), encoding="utf-8")


def _timed(classifier, onnx_model, texts):
    """(probabilities, texts/s) of `texts` in fp32 PyTorch (onnx_model None) or through `onnx_model`, after a warm-up."""
    if not texts:
        return np.zeros((0, 2)), float("nan")
    classifier.probabilities_with(onnx_model, texts[:64], precision="no")
    started = time.perf_counter()
    probabilities = classifier.probabilities_with(onnx_model, texts, precision="no")
    return probabilities, len(texts) / (time.perf_counter() - started)


def _onnxruntime():
    try:
        import onnxruntime
    except ImportError:
        raise UserError("the onnx backends need onnxruntime and onnx: pip install onnxruntime onnx (see requirements.txt), or use --backend torch") from None
    return onnxruntime


class OnnxModel:
    """An exported classifier in an InferenceSession on the CPU, as many threads as torch uses; with profile_prefix,
    ONNX Runtime's profiler records every operator to a file under that prefix (session.end_profiling() names it)."""

    def __init__(self, path, profile_prefix=None):
        ort = _onnxruntime()
        options = ort.SessionOptions()
        options.intra_op_num_threads = torch.get_num_threads()
        options.log_severity_level = 3
        if profile_prefix:
            options.enable_profiling = True
            options.profile_file_prefix = str(profile_prefix)
        self.path = Path(path)
        self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])

    def logits(self, input_ids, attention_mask):
        feed = {"input_ids": np.asarray(input_ids, dtype=np.int64), "attention_mask": np.asarray(attention_mask, dtype=np.int64)}
        return self.session.run(None, feed)[0]


def check_backend(choice):
    if choice not in BACKENDS:
        raise UserError(f"--backend {choice}: not one of {', '.join(BACKENDS)}")


def resolve_backend(choice, bf16, exported_record):
    """(backend, why) for --backend `choice` on the CPU; exported_record() exports when needed and returns export.json's
    record. auto: PyTorch where it computes in bf16 (natively, the fastest path there); on any other CPU the fastest of
    PyTorch fp32, ONNX Runtime fp32 and ONNX Runtime int8 as measured at export, int8 only when its labels matched
    fp32's on >= 99.5% of the probe texts."""
    check_backend(choice)
    if choice != "auto":
        return choice, "as asked"
    if bf16:
        return "torch", "auto: PyTorch in bf16, which this CPU computes natively"
    record = exported_record()
    agreement = record["int8_fidelity"]["identical_labels"]
    speeds = {backend: speed for backend, speed in record.get("texts_per_second", {}).items() if isinstance(speed, float) and not math.isnan(speed)}
    int8_ok = agreement >= FIDELITY_BAR
    candidates = {backend: speed for backend, speed in speeds.items() if backend != "onnx-int8" or int8_ok}
    best = max(candidates, key=candidates.get) if candidates else "onnx"
    measured = ", ".join(f"{NAMES[backend]} {speed:.0f}" for backend, speed in speeds.items())
    int8_note = "" if int8_ok else (
        "; int8 was not checked (no data set)" if math.isnan(agreement)
        else f"; int8 left out: it gave fp32's label on only {agreement:.1%} of them (the bar: {FIDELITY_BAR:.1%})")
    return best, f"auto: no native bf16 on this CPU; the fastest measured at export ({measured} texts/s on the probe texts){int8_note}"


NAMES = {"torch": "PyTorch fp32", "onnx": "ONNX Runtime fp32", "onnx-int8": "ONNX Runtime int8"}
