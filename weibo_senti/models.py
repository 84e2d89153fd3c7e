"""Find a base model: a save_pretrained folder, its copy under models/, or a download from the Hugging Face hub."""
import shutil
import sys
import tempfile
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModel, AutoModelForSequenceClassification, AutoTokenizer

from . import REPO_ROOT, UserError, repo_relative
from .data import LABEL_NAMES

MODELS_DIR = REPO_ROOT / "models"
# the embedded defaults, pretrained by models/pretrain.py, used when a hub model cannot be had
MINI_MODELS = {"gpt2": MODELS_DIR / "gpt2-chinese-mini", "bert": MODELS_DIR / "bert-chinese-mini"}


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
    tried = [f"the folder {given}: " + ("has no config.json" if given.is_dir() else "does not exist")]
    if given.is_absolute() or str(name_or_path).startswith("."):
        raise ModelNotFound(_not_found_message(name_or_path, tried))
    local = local_copy_of(str(name_or_path))
    if _is_model_folder(local):
        return local
    tried.append(f"the folder {local}: " + ("has no config.json" if local.is_dir() else "does not exist"))
    try:
        _download(str(name_or_path), local)
    except Exception as error:  # offline, unknown id, gated repo: all end the same way for the user
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        tried.append(f"downloading '{name_or_path}' from the Hugging Face hub: {first_line}")
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


def _download(hub_id, destination):
    """Save config, tokenizer and weights with save_pretrained; the folder appears only once complete."""
    destination.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=destination.parent, prefix=f".{destination.name}-"))
    try:
        architectures = AutoConfig.from_pretrained(hub_id).architectures or []
        # a fine-tuned classifier keeps its head; any other model is saved as its base model, which keeps BERT's
        # pooler (BertForMaskedLM, the class bert-base-chinese is published as, would drop it)
        is_classifier = any(name.endswith("ForSequenceClassification") for name in architectures)
        (AutoModelForSequenceClassification if is_classifier else AutoModel).from_pretrained(hub_id).save_pretrained(tmp)
        AutoTokenizer.from_pretrained(hub_id).save_pretrained(tmp)
        tmp.rename(destination)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


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


def load_base_classifier(base_path, tokenizer):
    """The base model with a fresh two-class head, in float32, and the names of the modules whose weights the base
    checkpoint lacks besides the head (BERT's pooler when the base was saved as BertForMaskedLM). Those start random
    at every load, so the methods train and save them with the head; otherwise a reload would not match."""
    model, loading = AutoModelForSequenceClassification.from_pretrained(
        base_path,
        num_labels=len(LABEL_NAMES),
        id2label=dict(enumerate(LABEL_NAMES)),
        label2id={name: i for i, name in enumerate(LABEL_NAMES)},
        pad_token_id=tokenizer.pad_token_id,
        dtype=torch.float32,  # transformers 5 would keep a half-precision checkpoint in half precision
        output_loading_info=True,
    )
    # PEFT records these as the base (adapter_config.json, README.md): inside the repository, relative, so any clone finds it
    model.name_or_path = model.config.name_or_path = repo_relative(base_path)
    missing = {key.rsplit(".", 1)[0] for key in loading["missing_keys"]}
    return model, sorted(name for name in missing if name.split(".")[0] not in HEAD_MODULES)


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
