"""Checkpoint folders: only the trained weights, the tokenizer, and checkpoint.json to rebuild the model from.

A folder is written under a temporary name and swapped in by rename, so a crash while writing
never damages the checkpoint that was there before.
"""
import hashlib
import importlib
import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors import SafetensorError

from . import REPO_ROOT, UserError
from .models import load_tokenizer, resolve_model

_UMASK = os.umask(0)
os.umask(_UMASK)
INFO_FILE = "checkpoint.json"
CARD_FILE = "README.md"  # the model card, written from checkpoint.json
TRAINING_STATE_FILE = "training_state.pt"
LOG_FILE = "training_log.json"  # every epoch's metrics, beside best/ and last/
LOCK_FILE = ".train.lock"  # held in OUTPUT_DIR while a training run writes there
# method name in checkpoint.json -> the module with its settings(), build() and save()
METHOD_MODULES = {
    "adapter_tuning": "adapter_tuning.adapter",
    "lora": "weibo_senti.lora",
    "bert_lora": "weibo_senti.lora",
    "full_finetune": "studies.full_finetune.full_finetune",  # the reference every weight of which trains, for comparisons only
}
BASE_FAMILY = {"adapter_tuning": "gpt2", "lora": "gpt2", "bert_lora": "bert", "full_finetune": "bert"}


class CheckpointError(UserError):
    """A checkpoint folder that is missing, of another method, or damaged; the message names the file."""


def method_module(name):
    try:
        return importlib.import_module(METHOD_MODULES[name])
    except ModuleNotFoundError as error:  # an installed copy carries adapter_tuning/ under weibo_senti.repo
        if error.name != METHOD_MODULES[name].split(".")[0]:
            raise
        return importlib.import_module(f"weibo_senti.repo.{METHOD_MODULES[name]}")


def _previous(path):
    return path.with_name(path.name + ".previous")


def _remove_stale_writes(final):
    """Temporary folders of earlier writes of `final` whose process is gone (killed while saving)."""
    for folder in final.parent.glob(f".{final.name}.writing-*"):
        pid = folder.name.rsplit(".writing-", 1)[1].split("-", 1)[0]
        try:
            os.kill(int(pid), 0)
            continue  # its writer is still running
        except (ValueError, ProcessLookupError):
            shutil.rmtree(folder, ignore_errors=True)
        except PermissionError:
            continue  # another user's live process


@contextmanager
def atomic_directory(final):
    """Yield an empty temporary folder; once the block succeeds it replaces `final` in one rename. If writing fails
    (a full disk, say), `final` is left as it was and a CheckpointError says what failed."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_writes(final)
    tmp = Path(tempfile.mkdtemp(dir=final.parent, prefix=f".{final.name}.writing-{os.getpid()}-"))
    os.chmod(tmp, 0o777 & ~_UMASK)  # mkdtemp makes it private; a checkpoint is an ordinary folder
    try:
        yield tmp
        for file in (f for f in tmp.iterdir() if f.is_file()):
            with open(file, "rb") as handle:
                os.fsync(handle.fileno())
            os.chmod(file, 0o666 & ~_UMASK)  # safetensors writes its files private (0600); others on the server read them too
    except (OSError, SafetensorError) as error:
        shutil.rmtree(tmp, ignore_errors=True)
        reason = os.strerror(error.errno) if getattr(error, "errno", None) else str(error).strip().splitlines()[0]
        kept = f"the previous {final} is unchanged" if final.exists() else f"nothing was written to {final}"
        raise CheckpointError(f"could not write {final} (in {final.parent}): {reason}; {kept}") from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if final.exists():
        shutil.rmtree(_previous(final), ignore_errors=True)
        final.rename(_previous(final))
    tmp.rename(final)
    shutil.rmtree(_previous(final), ignore_errors=True)


@contextmanager
def atomic_file(path, **options):
    """A text file opened for writing beside `path`; once the block succeeds it replaces `path` in one rename, with the
    permissions of any file the user creates (their umask), not the temporary file's private ones."""
    path = Path(path)
    with tempfile.NamedTemporaryFile("w", encoding="utf-8", dir=path.parent, delete=False, suffix=".tmp", **options) as tmp:
        try:
            yield tmp
            tmp.flush()
            os.fsync(tmp.fileno())
        except BaseException:
            try:
                tmp.close()  # on a full disk, closing flushes and fails again: the file goes all the same
            except OSError:
                pass
            finally:
                os.unlink(tmp.name)
            raise
    os.chmod(tmp.name, 0o666 & ~_UMASK)
    os.replace(tmp.name, path)


def write_json_atomic(path, data):
    with atomic_file(path) as handle:
        json.dump(data, handle, ensure_ascii=False, indent=2)


def write_checkpoint(directory, model, tokenizer, info, training_state=None, card=None):
    """A checkpoint folder, written atomically; card: the README.md to put beside checkpoint.json (card.py writes it)."""
    with atomic_directory(directory) as tmp:
        method_module(info["method"]).save(model, tmp)
        tokenizer.save_pretrained(tmp)
        if training_state is not None:
            torch.save(training_state, tmp / TRAINING_STATE_FILE)
        write_info(tmp, info, card)


def write_info(folder, info, card=None):
    """checkpoint.json, and README.md when `card` is given (card.model_card(info): the two always agree)."""
    write_json_atomic(Path(folder) / INFO_FILE, info)
    if card is not None:
        with atomic_file(Path(folder) / CARD_FILE) as handle:
            handle.write(card)


def require_files(folder, *names):
    """Stop with a message naming the first of `names` that `folder`, a checkpoint to load, lacks."""
    for name in names:
        if not (Path(folder) / name).is_file():
            raise CheckpointError(
                f"{folder} is missing {name}, part of every checkpoint of its kind: it was copied incompletely or damaged. "
                "Copy the whole folder again, or train anew."
            )


def find_checkpoint(directory):
    """`directory`, or the copy a crash between the two renames of atomic_directory left beside it."""
    directory = Path(directory)
    if not directory.exists() and _previous(directory).is_dir():
        return _previous(directory)
    return directory


def read_info(directory):
    directory = find_checkpoint(directory)
    if not directory.is_dir():
        raise CheckpointError(f"no checkpoint at {directory}: train one first (python <method>/train.py) or pass --checkpoint PATH")
    info_path = directory / INFO_FILE
    if not info_path.is_file():
        raise CheckpointError(f"{directory} is not a checkpoint of this toolkit: it has no {INFO_FILE}")
    try:
        info = json.loads(info_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise CheckpointError(f"{info_path} is damaged: {error}") from None
    if not isinstance(info, dict):
        raise CheckpointError(f"{info_path} is damaged: a JSON object is expected, it holds a {type(info).__name__}")
    if info.get("method") not in METHOD_MODULES:
        raise CheckpointError(f"{info_path}: unknown method {info.get('method')!r}; known: {', '.join(METHOD_MODULES)}")
    for key, (kind, allowed, description) in REQUIRED_INFO.items():
        value = info.get(key)
        if key not in info or not isinstance(value, kind) or isinstance(value, bool) or not allowed(value):
            found = "missing" if key not in info else f"{value!r}"[:80]
            raise CheckpointError(f"{info_path} is damaged: '{key}' must be {description}, it is {found}. Copy the checkpoint again, or train anew.")
    _check_calibration(info, info_path)
    return info


# the calibration a checkpoint.json may hold (missing or null: none). Fitting keeps T in (0.05, 20) and the bias near 0;
# outside these, a value can only come from a damaged or edited file, and it would flip labels or give NaN confidences
CALIBRATION_LIMITS = {"temperature": (1e-3, 1e3), "bias": (-100.0, 100.0)}


def _check_calibration(info, info_path):
    record = info.get("calibration")
    if record is None:
        return
    if not isinstance(record, dict):
        raise CheckpointError(f"{info_path} is damaged: 'calibration' must be an object or null, it is {record!r:.80}. "
                              "Copy the checkpoint again, or fit it anew with calibrate.py.")
    for key, (low, high) in CALIBRATION_LIMITS.items():
        value = record.get(key, 1.0 if key == "temperature" else 0.0)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not low <= value <= high:  # NaN fails too
            raise CheckpointError(f"{info_path} is damaged: 'calibration.{key}' must be a number from {low:g} to {high:g}, "
                                  f"it is {value!r:.80}. Copy the checkpoint again, or fit it anew with calibrate.py.")
    bands = record.get("bands")
    if bands is not None:
        edges = [bands.get(key) if isinstance(bands, dict) else None for key in ("neutral_below", "very_from")]
        if not all(isinstance(e, (int, float)) and not isinstance(e, bool) for e in edges) or not 0.5 <= edges[0] <= edges[1] <= 1:
            raise CheckpointError(f"{info_path} is damaged: 'calibration.bands' must hold 0.5 <= neutral_below <= very_from <= 1, "
                                  f"it is {bands!r:.120}. Copy the checkpoint again, or fit it anew with calibrate.py.")


# what every checkpoint.json holds, checked on reading, so a damaged file is named at once and not met as a KeyError
REQUIRED_INFO = {
    "method_settings": (dict, lambda v: True, "an object"),
    "base_model": (str, bool, "the base model's name"),
    "base_model_path": (str, bool, "the base model's folder"),
    "max_length": (int, lambda v: v >= 2, "an integer >= 2"),
}


def base_model_of(info):
    """The base model folder recorded at training time, or the same model found again (e.g. on another machine)."""
    for folder in (REPO_ROOT / info["base_model_path"], REPO_ROOT / info["base_model"]):  # absolute paths stay as they are
        if (folder / "config.json").is_file():
            return folder
    return resolve_model(info["base_model"])


def load_checkpoint(directory, expected_method=None):
    """Rebuild (model, tokenizer, info) from a checkpoint folder alone."""
    directory = find_checkpoint(directory)
    info = read_info(directory)
    if expected_method and info["method"] != expected_method:
        raise CheckpointError(f"{directory} holds a {info['method']} checkpoint; use {info['method']}/predict.py for it")
    base = base_model_of(info)
    # the tokenizer is always the base's own; a shipped checkpoint may leave it out (e5's tokenizer.json is 17 MB)
    tokenizer = load_tokenizer(directory if (directory / "tokenizer_config.json").is_file() else base)
    method = method_module(info["method"])
    try:
        model = method.build(base, tokenizer, info["method_settings"], weights_from=directory)
    except CheckpointError:
        raise
    except Exception as error:
        raise CheckpointError(f"{directory}: cannot load the trained weights ({type(error).__name__}: {error})") from None
    return model.eval(), tokenizer, info


def model_name(checkpoint, graph_only=False):
    """What the sink's `model` column records: the checkpoint's method and a digest of its weights and settings, so a
    retrained (or recalibrated) checkpoint scores everything again while a rerun of the same one skips what it did.
    graph_only: leave out the calibration, which is applied after the network, and the prediction cut (an ONNX export
    stays valid)."""
    folder = find_checkpoint(Path(checkpoint))
    if not folder.is_dir():
        return str(checkpoint)  # a hub id
    digest = hashlib.sha256()
    for path in sorted(folder.iterdir()):
        if path.suffix in (".safetensors", ".bin") or path.name in (INFO_FILE, "config.json", "adapter_config.json"):
            content = path.read_bytes()
            if graph_only and path.name == INFO_FILE:
                info = json.loads(content)
                info.pop("calibration", None)
                info.pop("predict_max_length", None)  # the export takes any length
                content = json.dumps(info, sort_keys=True).encode()
            digest.update(path.name.encode())
            digest.update(content)
    method = read_info(folder)["method"] if (folder / "checkpoint.json").is_file() else folder.name
    return f"{method}@{digest.hexdigest()[:12]}"
