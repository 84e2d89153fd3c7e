"""ONNX Runtime for CPU prediction: a classifier exported once per checkpoint (fp32 by torch.onnx.export, int8 by
ONNX Runtime's dynamic quantization), cached beside it in onnx/<model id>/ with each path's measured speed and the int8
model's fidelity, and run through an InferenceSession. predict.Classifier chooses it with backend=...

The int8 path keeps fp32's labels by three means, each measured in docs/results/int8.md#int8-that-keeps-fp32s-labels:
- outlier channels: an input channel of a weight matrix whose peak over CALIBRATION_TEXTS training texts is over
  OUTLIER_FACTOR times the median channel's is multiplied in fp32 beside the int8 product (LLM.int8()'s decomposition),
  so that one scale per activation tensor no longer spends its 256 levels on a few channels;
- 7-bit weights (reduce_range), so that CPUs without VNNI cannot saturate their 16-bit sums of int8 products;
- a second look: texts whose int8 P(positive) lies within a margin of 0.5 are scored again in fp32. The margin is
  RECHECK_FACTOR times the largest change int8 made to P(positive) on the PROBE_TEXTS at export.

optimum's exporter is not used: its ONNX exporter (optimum-onnx) requires transformers < 4.58, and this toolkit runs on 5.x.
"""
import copy
import hashlib
import json
import logging
import math
import os
import sys
import time
import warnings
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
from filelock import FileLock

from . import UserError
from .checkpoint import (CheckpointError, atomic_directory, base_model_of, find_checkpoint, model_name, read_info,
                         write_json_atomic)
from .models import cpu_flags, cpu_kind

FIDELITY_BAR = 0.995  # the least share of check texts whose int8 label must equal fp32's for `auto` to choose int8
PROBE_TEXTS = 500  # the first validation texts, tags removed (the uncertain case), on which int8's second-look margin is fitted
CHECK_TEXTS = 500  # the validation texts after them, tags removed, on which every path's speed and int8's fidelity are measured
CALIBRATION_TEXTS = 256  # training texts, tags removed, whose activation peaks find the outlier channels
OUTLIER_FACTOR = 3.0  # an input channel peaking above this many times the median channel's peak stays in fp32
RECHECK_FACTOR = 1.5  # the second look's margin, in largest changes of P(positive) seen on the probe texts (1 kept every label on 1,000 others)
EXPORT_FORMAT = 3  # in the cache folder's name: 2 = outlier channels, 7-bit weights and the second look (1 had none); 3 = with the digests of its files and of the base's weights
OPSET = 17
BACKENDS = ("auto", "torch", "onnx", "onnx-int8")  # what --backend takes: auto chooses among the other three
FP32_FILE, INT8_FILE, RECORD_FILE = "model.onnx", "model.int8.onnx", "export.json"
CACHE_ENV_VAR = "WEIBO_SENTI_ONNX_CACHE"  # where exports go when the checkpoint's folder cannot be written


def cache_folder(checkpoint):
    """<checkpoint>/onnx/<method@digest>/, or under $WEIBO_SENTI_ONNX_CACHE (default ~/.cache/weibo_senti/onnx) when the
    checkpoint's folder is read-only and holds no sound export already. The name holds the digest of the weights, so a
    retrained checkpoint exports anew (a recalibrated one does not)."""
    folder = find_checkpoint(Path(checkpoint))
    name = model_name(folder, graph_only=True).replace("@", "-") + f"-export{EXPORT_FORMAT}"
    inside = folder / "onnx" / name
    if os.access(folder, os.W_OK) or export_problem(inside, folder) is None:
        return inside
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


class OutlierChannelsSplit(torch.nn.Module):
    """A Linear (or GPT-2's Conv1D) with the input channels `channels` taken out of it and multiplied in their own
    small Linear, `outlier_channels`, which the quantizer leaves in fp32. The same function in fp32."""

    def __init__(self, layer, channels):
        super().__init__()
        weight = layer.weight.data  # Linear: [out, in]; Conv1D: [in, out]
        conv1d = not isinstance(layer, torch.nn.Linear)
        self.outlier_channels = torch.nn.Linear(len(channels), weight.shape[1 if conv1d else 0], bias=False)
        self.outlier_channels.weight.data = (weight[channels, :].T if conv1d else weight[:, channels]).clone()
        (weight[channels, :] if conv1d else weight[:, channels]).zero_()
        keep = torch.ones(weight.shape[0 if conv1d else 1])
        keep[channels] = 0
        self.layer = layer
        self.register_buffer("keep", keep)
        self.register_buffer("channels", channels)

    def forward(self, x):
        return self.layer(x * self.keep) + self.outlier_channels(x.index_select(-1, self.channels))


def input_peaks(classifier, model, texts):
    """{name: largest |input| per input channel over `texts`} of every Linear / Conv1D of `model` (the classifier's
    model or a copy of it), run in fp32."""
    from transformers.pytorch_utils import Conv1D

    layers = {name: module for name, module in model.named_modules() if isinstance(module, (torch.nn.Linear, Conv1D))}
    peaks = {}

    def recorder(name):
        def record(module, args):
            x = args[0].detach().float()
            peak = x.reshape(-1, x.shape[-1]).abs().amax(0)
            peaks[name] = torch.maximum(peaks[name], peak) if name in peaks else peak
        return record

    handles = [module.register_forward_pre_hook(recorder(name)) for name, module in layers.items()]
    calibrating = copy.copy(classifier)
    calibrating.model = model
    calibrating.probabilities_with(None, texts, precision="no")
    for handle in handles:
        handle.remove()
    return peaks


def outlier_split_copy(classifier, texts):
    """(a copy of the classifier's model with every weight matrix's outlier input channels split off, how many)."""
    model = copy.deepcopy(classifier.model)
    count = 0
    for name, peak in input_peaks(classifier, model, texts).items():
        channels = (peak > OUTLIER_FACTOR * peak.median()).nonzero().flatten()
        if len(channels):
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, OutlierChannelsSplit(model.get_submodule(name), channels))
            count += len(channels)
    return model, count


def _quantize(fp32_path, int8_path, reduce_range=True):
    """Dynamic int8: per-channel 7-bit weights (8-bit with reduce_range False), activations per tensor at run time;
    the outlier_channels products stay fp32."""
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    graph = onnx.load(str(fp32_path), load_external_data=False).graph
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)  # it logs advice to pre-process the model first, which is for static quantization
    try:
        quantize_dynamic(str(fp32_path), str(int8_path), per_channel=True, reduce_range=reduce_range, weight_type=QuantType.QInt8,
                         nodes_to_exclude=[node.name for node in graph.node if "/outlier_channels/" in node.name])
    finally:
        root.setLevel(level)


def export_texts():
    """(calibration, probe, check) texts, tags removed: the first CALIBRATION_TEXTS training texts of train.py's split,
    the first PROBE_TEXTS validation texts and the CHECK_TEXTS after them; all [] when the data set is not there (then
    int8 is never chosen by itself)."""
    from . import REPO_ROOT
    from .data import DATA_ENV_VAR, load_labelled_csv, split_train_val, strip_emoticons

    path = Path(os.environ.get(DATA_ENV_VAR, REPO_ROOT / "dataset" / "weibo_senti_100k.csv"))
    if not path.is_file():
        return [], [], []
    try:
        train, val = split_train_val(load_labelled_csv(path)[0], 0.1, 42)
    except UserError:
        return [], [], []
    val = [strip_emoticons(text) for text in val["review"][:PROBE_TEXTS + CHECK_TEXTS]]
    return [strip_emoticons(text) for text in train["review"][:CALIBRATION_TEXTS]], val[:PROBE_TEXTS], val[PROBE_TEXTS:]


def fidelity(reference, other):
    """How far `other`'s [n, 2] probabilities are from `reference`'s: share of identical labels, largest change of
    P(positive)."""
    if not len(reference):
        return {"identical_labels": float("nan"), "max_change_prob_positive": float("nan")}
    return {
        "identical_labels": float((reference.argmax(axis=1) == other.argmax(axis=1)).mean()),
        "max_change_prob_positive": float(np.abs(reference[:, 1] - other[:, 1]).max()),
    }


def recheck_margin(int8_alone):
    """The second look's margin from int8's fidelity() without it on the probe texts; 0 (no second look) without them."""
    change = int8_alone["max_change_prob_positive"]
    return 0.0 if math.isnan(change) else min(0.5, RECHECK_FACTOR * change)


def ensure_exported(classifier, checkpoint):
    """(cache folder, its export.json record) of `checkpoint`, exported and measured on this CPU on first use (a minute
    or two for e5-small on 2 cores); a lock makes concurrent processes (Spark's workers, several servers) wait for one
    export instead of repeating it. An export that no longer matches what it records (its graph files changed, damaged
    or missing, the base model's weights changed in place, export.json unreadable) is treated as absent: made again."""
    folder = cache_folder(checkpoint)
    problem = export_problem(folder, checkpoint)
    if problem:
        if folder.exists():
            print(f"note: the ONNX export in {folder} {problem}: exporting it again", file=sys.stderr)
        _export_once(classifier, checkpoint, folder)
    return folder, json.loads((folder / RECORD_FILE).read_text(encoding="utf-8"))


def export_problem(folder, checkpoint):
    """Why the export in `folder` cannot be used for `checkpoint`, or None. Each file's digest is computed once per
    process (again only if its size or modification time changes)."""
    try:
        record = json.loads((folder / RECORD_FILE).read_text(encoding="utf-8"))
        files, margin = record["files"], record["int8"]["recheck_margin"]
        if not isinstance(margin, (int, float)) or not 0 <= margin <= 0.5:
            return f"records a second-look margin of {margin!r}"
    except FileNotFoundError:
        return "is not there" if folder.exists() else "is missing"
    except (OSError, ValueError, KeyError, TypeError) as error:
        return f"has a damaged {RECORD_FILE} ({type(error).__name__}: {str(error)[:80]})"
    for name in (FP32_FILE, INT8_FILE):
        if not (folder / name).is_file():
            return f"lacks {name}"
        if file_digest(folder / name) != files.get(name):
            return f"has a {name} other than the one exported (changed or damaged)"
    if base_weights_digest(checkpoint) != record.get("base_weights"):
        return "was made from other base-model weights than the ones now in the base model's folder"
    return None


_DIGESTS = {}


def file_digest(path):
    """sha256 of a file, remembered for this process while its size and modification time stay the same."""
    stat = path.stat()
    key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
    if key not in _DIGESTS:
        digest = hashlib.sha256()
        with open(path, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 22), b""):
                digest.update(block)
        _DIGESTS[key] = digest.hexdigest()
    return _DIGESTS[key]


def base_weights_digest(checkpoint):
    """One digest of the weight files of the base model `checkpoint` is loaded on: an export holds those weights too."""
    folder = base_model_of(read_info(find_checkpoint(Path(checkpoint))))
    files = sorted([*folder.glob("*.safetensors"), *folder.glob("*.bin")])
    return hashlib.sha256("".join(f"{path.name}:{file_digest(path)}\n" for path in files).encode()).hexdigest()


def measured_here(classifier, checkpoint):
    """export.json's measurement of the paths on this CPU's kind (models.cpu_kind), exported first when needed. A CPU of
    a kind not measured before, as where the folder is shared by machines of several kinds, measures them again for
    itself, once (half a minute): which path is fastest, and int8's kernels, differ between kinds."""
    folder, record = ensure_exported(classifier, checkpoint)
    kind = cpu_kind()
    if kind in record.get("measured", {}):
        return record["measured"][kind]
    record = None
    try:
        with FileLock(str(folder) + ".lock"):
            record = _with_measurement(classifier, folder, kind)
            write_json_atomic(folder / RECORD_FILE, record)
    except OSError as error:  # a folder this process may read but not write: measured for this process alone
        print(f"note: the measurement is not kept ({error.strerror or error}), so the next process measures again", file=sys.stderr)
    return (record or _with_measurement(classifier, folder, kind))["measured"][kind]


def _with_measurement(classifier, folder, kind):
    """export.json's record with this CPU kind's measurement in it, measured unless another process has just done so."""
    record = json.loads((folder / RECORD_FILE).read_text(encoding="utf-8"))
    if kind not in record.get("measured", {}):
        print(f"measuring the ONNX paths of {classifier.source} on this kind of CPU ({kind}; once)", file=sys.stderr)
        # an export made before measurements were kept per CPU kind has one, of a CPU it did not name: measured anew
        record = {key: value for key, value in record.items() if key not in ("int8_fidelity", "texts_per_second")}
        record.setdefault("measured", {})[kind] = _measured(classifier, folder, record["int8"]["recheck_margin"], export_texts()[2])
    return record


@contextmanager
def _export_lock(checkpoint, folder):
    """The lock on `folder`'s export; a place where it cannot be made is one line naming the way out."""
    lock = FileLock(str(folder) + ".lock")
    try:
        folder.parent.mkdir(parents=True, exist_ok=True)
        lock.acquire()
    except OSError as error:
        raise CheckpointError(f"cannot write the ONNX export of {checkpoint} to {folder.parent}: {error.strerror or error}; "
                              f"set {CACHE_ENV_VAR} to a writable folder, or use --backend torch") from None
    try:
        yield
    finally:
        lock.release()


def _export_once(classifier, checkpoint, folder):
    with _export_lock(checkpoint, folder):
        if not export_problem(folder, checkpoint):
            return  # another process exported it while this one waited
        print(f"exporting {classifier.source} to ONNX (once; cached in {folder})", file=sys.stderr)
        with atomic_directory(folder) as tmp:
            _export(classifier.model, classifier.tokenizer, tmp / FP32_FILE)
            calibration, probe, check = export_texts()
            split, outlier_channels = outlier_split_copy(classifier, calibration) if calibration else (None, 0)
            if outlier_channels:
                _export(split, classifier.tokenizer, tmp / "split.onnx")
                _quantize(tmp / "split.onnx", tmp / INT8_FILE)
                (tmp / "split.onnx").unlink()
            else:  # nothing split off: the fp32 export is the graph to quantize
                _quantize(tmp / FP32_FILE, tmp / INT8_FILE)
            int8_alone = fidelity(classifier.probabilities_with(None, probe, precision="no"), classifier.probabilities_with(OnnxModel(tmp / INT8_FILE), probe))
            margin = recheck_margin(int8_alone)
            record = {
                "model_id": model_name(checkpoint),
                "opset": OPSET,
                "versions": {"torch": torch.__version__, "onnxruntime": _onnxruntime().__version__},
                "int8": {"outlier_channels": outlier_channels, "outlier_factor": OUTLIER_FACTOR, "weights": "7-bit, per channel",
                         "recheck_margin": margin, "without_recheck_on_probe_texts": {"texts": len(probe), **int8_alone}},
                "measured": {cpu_kind(): _measured(classifier, tmp, margin, check)},
                "files": {name: file_digest(tmp / name) for name in (FP32_FILE, INT8_FILE)},
                "base_weights": base_weights_digest(checkpoint),
            }
            (tmp / RECORD_FILE).write_text(json.dumps(record, indent=2), encoding="utf-8")


def _measured(classifier, folder, margin, check):
    """Each path's speed and int8's fidelity to PyTorch fp32 on the check texts, on this CPU, of the export in `folder`."""
    probabilities, speeds = {}, {}
    fp32 = OnnxModel(folder / FP32_FILE)
    for backend, onnx_model in (("torch", None), ("onnx", fp32), ("onnx-int8", OnnxModel(folder / INT8_FILE, recheck=(fp32, margin)))):
        probabilities[backend], speeds[backend] = _timed(classifier, onnx_model, check)
    return {
        "cpu": {"flags": cpu_flags(), "threads": torch.get_num_threads()},
        "int8_fidelity": {"texts": len(check), "of": "validation texts without tags after the probe texts, against PyTorch fp32",
                          **fidelity(probabilities["torch"], probabilities["onnx-int8"])},
        "texts_per_second": {"measured_on": "the check texts", **speeds},
    }


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


def load_exported(folder, record, backend):
    """The OnnxModel `backend` (onnx or onnx-int8) runs from an export folder; int8 with its fp32 second look."""
    fp32 = OnnxModel(folder / FP32_FILE)
    if backend == "onnx":
        return fp32
    return OnnxModel(folder / INT8_FILE, recheck=(fp32, record["int8"]["recheck_margin"]))


class OnnxModel:
    """An exported classifier in an InferenceSession on the CPU, as many threads as torch uses. recheck: (an fp32
    OnnxModel, margin): Classifier scores again through it the texts whose P(positive) here is within margin of 0.5.
    With profile_prefix, ONNX Runtime's profiler records every operator to a file under that prefix
    (session.end_profiling() names it)."""

    def __init__(self, path, recheck=(None, 0.0), profile_prefix=None):
        self.recheck_model, self.recheck_margin = recheck
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


def resolve_backend(choice, bf16, measured_here):
    """(backend, why) for --backend `choice` on the CPU; measured_here() exports and measures when needed and returns
    export.json's measurement on this CPU's kind. auto: PyTorch where it computes in bf16 (natively, the fastest path
    there); on any other CPU the fastest of PyTorch fp32, ONNX Runtime fp32 and ONNX Runtime int8 as measured on this
    kind of CPU, int8 only when its labels matched fp32's on >= 99.5% of the check texts."""
    check_backend(choice)
    if choice != "auto":
        return choice, "as asked"
    if bf16:
        return "torch", "auto: PyTorch in bf16, which this CPU computes natively"
    record = measured_here()
    agreement = record["int8_fidelity"]["identical_labels"]
    speeds = {backend: speed for backend, speed in record.get("texts_per_second", {}).items() if isinstance(speed, float) and not math.isnan(speed)}
    int8_ok = agreement >= FIDELITY_BAR
    candidates = {backend: speed for backend, speed in speeds.items() if backend != "onnx-int8" or int8_ok}
    best = max(candidates, key=candidates.get) if candidates else "onnx"
    measured = ", ".join(f"{NAMES[backend]} {speed:.0f}" for backend, speed in speeds.items())
    int8_note = "" if int8_ok else (
        "; int8 was not checked (no data set)" if math.isnan(agreement)
        else f"; int8 left out: it gave fp32's label on only {agreement:.1%} of them (the bar: {FIDELITY_BAR:.1%})")
    return best, f"auto: PyTorch would run in fp32 here; the fastest measured on this kind of CPU, {cpu_kind()} ({measured} texts/s on the check texts){int8_note}"


NAMES = {"torch": "PyTorch fp32", "onnx": "ONNX Runtime fp32", "onnx-int8": "ONNX Runtime int8"}
