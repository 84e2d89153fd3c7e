"""LoRA through PEFT, for GPT-2 (lora/) and BERT (bert_lora/).

Merge an existing checkpoint into a standalone model: python -m weibo_senti.lora CHECKPOINT_DIR OUTPUT_DIR

The checkpoint is a plain PEFT adapter folder: PeftModel.from_pretrained(base_model, folder) loads it, and the
classification head travels with it because the task type SEQ_CLS marks the head as a module to save.
"""
import sys
from pathlib import Path

from peft import LoraConfig, PeftModel, TaskType, get_peft_model
from torch import nn
from transformers.pytorch_utils import Conv1D

from . import UserError, cli
from .calibration import calibration_of
from .checkpoint import atomic_directory, load_checkpoint, require_files
from .models import BASE_SETTINGS, HEAD_MODULES, load_base_classifier, quiet_loading


def settings(cfg):
    return {
        "r": cfg.lora_r,
        "lora_alpha": cfg.lora_alpha,
        "lora_dropout": cfg.lora_dropout,
        "target_modules": [name.strip() for name in cfg.target_modules.split(",") if name.strip()],
    }


def check(model, settings):
    """Before any work: every --target-modules name is a linear layer of the model; else the names that are."""
    linear = sorted({name.rsplit(".", 1)[-1] for name, module in model.named_modules() if isinstance(module, (nn.Linear, Conv1D))})
    missing = [name for name in settings["target_modules"] if name not in linear]
    if missing or not settings["target_modules"]:
        raise UserError(
            f"--target-modules {','.join(settings['target_modules']) or '(empty)'} (TARGET_MODULES): "
            f"{', '.join(missing) or 'no module named'} is not a linear layer of this {model.config.model_type} model; "
            f"its linear layers are named {', '.join(name for name in linear if name not in HEAD_MODULES)}"
        )


def build(base_path, tokenizer, settings, weights_from=None):
    base, not_in_base = load_base_classifier(base_path, tokenizer, settings)
    if weights_from is not None:
        require_files(weights_from, "adapter_config.json", "adapter_model.safetensors")  # PEFT's names
        with quiet_loading():
            return PeftModel.from_pretrained(base, weights_from, is_trainable=True)
    config = LoraConfig(
        task_type=TaskType.SEQ_CLS,
        fan_in_fan_out=base.config.model_type == "gpt2",  # GPT-2's c_attn / c_proj are Conv1D (weights stored transposed)
        modules_to_save=[*HEAD_MODULES, *not_in_base],
        **{key: value for key, value in settings.items() if key not in BASE_SETTINGS},
    )
    with quiet_loading():
        return get_peft_model(base, config)


def save(model, directory):
    config = model.peft_config["default"]
    # PEFT adds the SEQ_CLS head's names to modules_to_save again each time a checkpoint is loaded (--init-from)
    config.modules_to_save = list(dict.fromkeys(config.modules_to_save or []))
    # the vocabulary is always the base's own; saying so spares PEFT a look for the base's config (cwd or hub)
    model.save_pretrained(directory, save_embedding_layers=False)


def describe(model):
    """Which modules got LoRA, so that 'c_proj' hitting both attention and MLP projections is visible."""
    wrapped = sorted({name.rsplit(".lora_A", 1)[0] for name, _ in model.named_parameters() if ".lora_A" in name})
    kinds = sorted({name.split(".")[-1] + (" (MLP)" if ".mlp." in name else " (attention)" if ".attn" in name or ".attention" in name else "") for name in wrapped})
    lora = sum(p.numel() for name, p in model.named_parameters() if "lora_" in name)
    saved = sum(p.numel() for name, p in model.named_parameters() if p.requires_grad and "lora_" not in name)
    also = [name for name in model.peft_config["default"].modules_to_save or [] if name not in HEAD_MODULES]
    return (
        f"LoRA on {len(wrapped)} modules ({', '.join(kinds)}): {lora:,} LoRA parameters + {saved:,} head parameters"
        + (f" (head includes {', '.join(also)}: not in the base checkpoint, so trained and saved)" if also else "")
    )


def check_merge_destination(checkpoint_dir, destination):
    """A merged model replaces only an earlier merged model or an empty folder: never a user's files, and never the
    checkpoint itself or a folder that holds it."""
    destination, checkpoint_dir = Path(destination).resolve(), Path(checkpoint_dir).resolve()
    if checkpoint_dir.is_relative_to(destination) or destination.is_relative_to(checkpoint_dir):
        raise UserError(f"--merge-to {destination}: it holds or lies inside the checkpoint {checkpoint_dir}; choose a folder of its own")
    if destination.exists() and not destination.is_dir():
        raise UserError(f"--merge-to {destination}: a file is there; give a folder")
    held = sorted(path.name for path in destination.iterdir()) if destination.is_dir() else []
    if held and (not (destination / "config.json").is_file() or set(held) - MERGED_MODEL_FILES):
        raise UserError(f"--merge-to {destination}: the folder holds other files ({', '.join(held[:5])}{', ...' if len(held) > 5 else ''}), "
                        "which merging would delete; give an empty or new folder, or an earlier merged model to replace")
    return destination


# what save_pretrained of a classifier and its tokenizer writes: the files a merged-model folder may hold
MERGED_MODEL_FILES = {"config.json", "generation_config.json", "model.safetensors", "model.safetensors.index.json", "tokenizer.json",
                      "tokenizer_config.json", "special_tokens_map.json", "vocab.txt", "vocab.json", "merges.txt", "added_tokens.json",
                      "sentencepiece.bpe.model", "spiece.model", "chat_template.jinja"}


def export_merged(checkpoint_dir, destination):
    """Fold LoRA into the base weights (in fp32) and save a standalone model that needs no PEFT to load."""
    destination = check_merge_destination(checkpoint_dir, destination)
    model, tokenizer, info = load_checkpoint(checkpoint_dir)
    if not hasattr(model, "merge_and_unload"):
        raise UserError(f"{checkpoint_dir} is a {info['method']} checkpoint: only LoRA checkpoints (lora, bert_lora) merge into their base")
    merged = model.float().merge_and_unload()
    # config.json keeps the checkpoint's calibration and mean pooling (classifier_pooling), which Classifier.load reads and applies
    # (transformers alone ignores them)
    merged.config.calibration_temperature, merged.config.calibration_bias = calibration_of(info)
    merged.config.text_prefix = info.get("text_prefix", "")  # and the prefix the texts were trained with
    with atomic_directory(destination) as tmp:
        merged.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    return destination


if __name__ == "__main__":
    if len(sys.argv) != 3:
        raise SystemExit("usage: python -m weibo_senti.lora CHECKPOINT_DIR OUTPUT_DIR")
    cli.main(lambda: print(f"merged model written to {export_merged(Path(sys.argv[1]), Path(sys.argv[2]))}"))
