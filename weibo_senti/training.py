"""The one training loop of all methods, on Hugging Face Accelerate (so `accelerate launch` and bf16 just work).

Each epoch: train with dynamic padding, AdamW, linear warmup and clipping at 1.0 on the human-labelled posts and texts
drawn from the distant (emoticon-labelled) data, in the share DISTANT_SHARE says; evaluate on the human-labelled
validation posts and on the distant validation texts, each as they are and with the emoticon tags removed; keep the best
checkpoint by SELECTION_METRIC in OUTPUT_DIR/best, the state to resume from in OUTPUT_DIR/last, and every epoch's metrics
in OUTPUT_DIR/training_log.json.
"""
import json
import math
import os
import platform
import shutil
import time
from pathlib import Path

import numpy as np
import pandas as pd
import peft
import torch
import torch.nn.functional as F
import transformers
from accelerate import Accelerator, DataLoaderConfiguration
from accelerate.state import AcceleratorState
from accelerate.utils import set_seed
from filelock import FileLock, Timeout
from torch.utils.data import DataLoader
from tqdm.auto import tqdm
from transformers import AutoConfig, AutoModelForSequenceClassification, get_linear_schedule_with_warmup

from . import REPO_ROOT, UserError, repo_relative
from .cli import as_flags, check_ranges, parse_config
from .calibration import (
    MIN_TEXTS, apply_calibration, bands_report, calibration_halves, describe, describe_bands, fit_bands, fit_temperature,
    recall_balancing_threshold, report,
)
from .card import model_card, write_info_and_card
from .checkpoint import (
    BASE_FAMILY,
    LOCK_FILE,
    LOG_FILE,
    CheckpointError,
    TRAINING_STATE_FILE,
    atomic_directory,
    find_checkpoint,
    method_module,
    read_info,
    write_checkpoint,
    write_json_atomic,
)
from .data import (
    HUMAN_SPLIT_SEED, LABEL_NAMES, EncodedTexts, LengthGroupedBatches, detailed_scores, load_labelled_csv, make_collate, split_human,
    split_train_val, strip_emoticons,
)
from .lpft import PROBE_FILE, choose_alpha, fit_linear_probe, interpolate, load_probe_state, parse_alphas, save_probe_state, trainable_tensors
from .models import MINI_MODELS, OFFLINE_IMPORTS, PAD_TO_MULTIPLE_OF, POOLINGS, fine_tuning_defaults, load_tokenizer, resolve_mixed_precision, resolve_model
from .predict import Classifier

# settings that must not change between a run and its --resume
RUN_IDENTITY = (
    "data", "model", "seed", "val_fraction", "max_samples", "batch_size", "max_length", "lr", "warmup_ratio", "epochs", "emoticon_drop",
    "group_by_length",
)
# the same, recorded only when set, so that the runs of earlier versions, which had none of them, still resume
DISTILLATION_IDENTITY = ("teacher", "distill_weight", "distill_temperature")
RECIPE_IDENTITY = ("text_prefix", "linear_probe", "human_data", "distant_share", "human_samples", "init_from")

# best/ is the epoch with the highest macro-F1 without emoticon tags (the texts users score have none), on the half of
# the validation texts the confidence is later fitted on; the other half stays unseen by both, for an honest report.
# With the tags, macro-F1 stops moving after an epoch or two (7,307 of 7,380 right for both e5 students) and then picks
# between epochs on a text or none. A run started under the earlier rule keeps it when resumed.
# With human-labelled posts (weibo2018), best/ is chosen, and calibrated, on them instead: the labels people give are what
# the classifier is for, and the distant labels were made from the tags.
HUMAN_SELECTION_METRIC = "human_val_fit_macro_f1"
SELECTION_METRIC = "val_no_emoticons_fit_macro_f1"
SELECTION_RULES = {
    HUMAN_SELECTION_METRIC: "macro-F1 on the human-labelled validation posts the confidence is fitted on, as they are",
    SELECTION_METRIC: "macro-F1 without emoticon tags on the validation texts the confidence is fitted on",
    "val_macro_f1": "validation macro-F1 with the emoticon tags, the rule of runs started by earlier versions",
}


def count_parameters(model):
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return total, trainable


def describe_parameters(model):
    total, trainable = count_parameters(model)
    return f"parameters: {total:,} total, {trainable:,} trainable ({100 * trainable / total:.3f}%)"


def _scores(log_probabilities, labels):
    probabilities = log_probabilities.exp().numpy()
    detail = detailed_scores(labels.numpy(), probabilities.argmax(axis=1), probabilities)
    recalls = {f"recall_{name}": values["recall"] for name, values in detail["per_class"].items()}
    return {"loss": F.nll_loss(log_probabilities, labels).item(), "accuracy": detail["accuracy"], "macro_f1": detail["macro_f1"],
            **recalls, "calibration_error": detail["calibration_error"]}


@torch.no_grad()
def evaluate(model, loader, accelerator, fit_positions=None):
    """Loss, accuracy, macro-F1, the recall of each class and the expected calibration error; with fit_positions (of
    texts in the loader's order), the same of those texts too, as fit_<name>."""
    model.eval()
    log_probabilities, labels = [], []
    for batch in loader:
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        logits, batch_labels = accelerator.gather_for_metrics((logits, batch["labels"]))
        log_probabilities.append(torch.log_softmax(logits.float(), dim=-1).cpu())
        labels.append(batch_labels.cpu())
    log_probabilities, labels = torch.cat(log_probabilities), torch.cat(labels)
    metrics = _scores(log_probabilities, labels)
    if fit_positions is not None:
        fit = torch.as_tensor(fit_positions)
        metrics.update({f"fit_{key}": value for key, value in _scores(log_probabilities[fit], labels[fit]).items()})
    return metrics


def selection_positions(val_rows, seed):
    """Where in val_rows the texts lie that choose best/: the calibration's fit half, or all of them when there are too
    few to halve (then nothing is held out anyway)."""
    fit, _ = calibration_halves(val_rows, seed)
    return np.sort(fit.index.to_numpy()) if len(fit) else np.arange(len(val_rows))


def human_data_path(cfg):
    """HUMAN_DATA as a path ("" or "none": no human-labelled data): relative to the repository as a constant, to the
    working folder as a flag, like the Path constants."""
    value = str(getattr(cfg, "human_data", "") or "")
    if value.lower() in ("", "none"):
        return None
    path = Path(value)
    return path if path.is_absolute() or "human_data" in cfg.given else REPO_ROOT / path


def adopt_init_checkpoint(cfg, method_name):
    """--init-from: the checkpoint to start from, with its base, method settings and text prefix taken over (they are
    what its weights fit); a flag that contradicts them is refused. Returns its folder, or None."""
    if not getattr(cfg, "init_from", ""):
        return None
    folder = find_checkpoint(Path(cfg.init_from))
    if not (folder / "checkpoint.json").is_file():
        raise UserError(f"--init-from {cfg.init_from}: no checkpoint of this toolkit there (no checkpoint.json); give a trained "
                        f"{method_name} checkpoint folder, such as models/classifiers/{method_name}")
    info = read_info(folder)
    if info["method"] != method_name:
        raise UserError(f"--init-from {cfg.init_from}: a {info['method']} checkpoint; {method_name}/train.py starts only from "
                        f"{method_name} ones (use {info['method']}/train.py)")
    adopted = {"model": info["requested_base_model"], **info["method_settings"], "text_prefix": info.get("text_prefix", "")}
    if isinstance(adopted.get("target_modules"), list):
        adopted["target_modules"] = ",".join(adopted["target_modules"])
    clashes = [f"--{key.replace('_', '-')} {getattr(cfg, key)} (the checkpoint has {value})" for key, value in adopted.items()
               if key in cfg.given and str(getattr(cfg, key)) != str(value)]
    if clashes:
        raise UserError(f"--init-from {cfg.init_from}: its weights were trained with other settings: {'; '.join(clashes)}")
    for key, value in adopted.items():
        setattr(cfg, key, value)
        cfg.given = cfg.given | {key}
    return folder


class Sources:
    """The training texts of one run: the human-labelled posts and the distant (emoticon-labelled) texts, and how many of
    the latter each epoch draws (all of them when DISTANT_SHARE is 1; none when 0)."""

    def __init__(self, human, distant, share):
        self.human = human if share < 1 else human.iloc[:0]
        self.distant = distant if share > 0 else distant.iloc[:0]
        if 0 < share < 1:
            self.distant_per_epoch = min(len(self.distant), round(len(self.human) * share / (1 - share)))
        else:
            self.distant_per_epoch = len(self.distant)
        self.rows = pd.concat([self.human, self.distant], ignore_index=True)

    def pools(self):
        """[(positions in self.rows, how many to draw each epoch or None for all)]"""
        human = (list(range(len(self.human))), None)
        distant = (list(range(len(self.human), len(self.rows))), self.distant_per_epoch)
        return [pool for pool in (human, distant) if pool[0]]

    def describe(self):
        return (f"{len(self.human):,} human-labelled posts and {self.distant_per_epoch:,} distant-labelled texts an epoch "
                f"(drawn from {len(self.distant):,})")


def _run_identity(cfg):
    # a path inside the repository is recorded relative to it, so the record names no folder of this machine
    human = human_data_path(cfg) is not None  # then the share is recorded even at 0 (human labels only)
    keys = [*RUN_IDENTITY, *(DISTILLATION_IDENTITY if getattr(cfg, "teacher", "") else ()),
            *(key for key in RECIPE_IDENTITY if getattr(cfg, key, None) or (human and key == "distant_share"))]
    return {key: repo_relative(value) if isinstance(value := getattr(cfg, key), Path) else str(value) for key in keys}


def method_settings(cfg, method):
    """The method's own settings, base_layers when the base is cut to its first layers (a student), and pooling when
    the head reads the mean of the token vectors."""
    layers, pooling = getattr(cfg, "base_layers", 0), getattr(cfg, "pooling", "cls")
    return {**method.settings(cfg), **({"base_layers": layers} if layers else {}), **({"pooling": pooling} if pooling != "cls" else {})}


def load_teacher(cfg, device):
    """The classifier whose softened probabilities a student learns besides the labels (--teacher), or None."""
    if not getattr(cfg, "teacher", ""):
        return None
    if not Path(cfg.teacher).is_dir():
        raise UserError(f"--teacher {cfg.teacher}: no folder there; give a trained classifier's folder, such as "
                        "models/classifiers/adapter_tuning")
    teacher = Classifier.load(cfg.teacher, mixed_precision="no")  # any classifier folder predict.py reads; LoRA merged, for speed
    teacher.model.to(device).requires_grad_(False)
    return teacher


def distillation_loss(student_logits, teacher_logits, labels, weight, temperature):
    """(1 - weight) * cross-entropy on the labels + weight * T^2 * KL(teacher || student) at temperature T (Hinton et al.,
    2015; T^2 keeps the gradient's scale as T changes)."""
    hard = F.cross_entropy(student_logits.float(), labels)
    soft = F.kl_div(
        F.log_softmax(student_logits.float() / temperature, dim=-1), F.log_softmax(teacher_logits.float() / temperature, dim=-1),
        reduction="batchmean", log_target=True,
    )
    return (1 - weight) * hard + weight * temperature**2 * soft


def _resume_state(cfg, last_dir, method_name, settings):
    last_dir = find_checkpoint(last_dir)
    if not (last_dir / TRAINING_STATE_FILE).is_file():
        raise UserError(f"--resume: no run to resume in {last_dir} (it is written at the end of each epoch)")
    info = read_info(last_dir)
    if not isinstance(info.get("run"), dict):
        raise CheckpointError(f"--resume: {last_dir / 'checkpoint.json'} has no record of its run ('run'), so it cannot be "
                              "checked against these settings. Start again with --overwrite.")
    recorded = {**info["run"], "method": info["method"], "method_settings": info["method_settings"]}
    current = {**_run_identity(cfg), "method": method_name, "method_settings": settings}
    if int(current["epochs"]) > int(recorded["epochs"]):  # more epochs extend the run; fewer would leave its schedule unfinished
        recorded["epochs"] = current["epochs"]
    keys = [*current, *(key for key in (*DISTILLATION_IDENTITY, *RECIPE_IDENTITY) if key in recorded and key not in current)]
    changed = [f"{key}: {recorded.get(key)} -> {current.get(key)}" for key in keys if recorded.get(key) != current.get(key)]
    if changed:
        raise UserError(f"--resume: these settings differ from the run in {last_dir}: " + "; ".join(changed))
    try:
        state = torch.load(last_dir / TRAINING_STATE_FILE, weights_only=True)
    except Exception as error:
        raise CheckpointError(
            f"--resume: {last_dir / TRAINING_STATE_FILE} is damaged ({type(error).__name__}: {str(error).splitlines()[0][:200]}), "
            "so the run cannot continue from it. Start again with --overwrite (best/ is kept until the new run saves a better one)."
        ) from None
    return last_dir, state, info


def _mixed_precision(cfg):
    """The precision to train in: --mixed-precision when given, else `accelerate launch --mixed_precision`, else the
    script's constant (auto)."""
    choice = cfg.mixed_precision
    if "mixed_precision" not in cfg.given and os.environ.get("ACCELERATE_MIXED_PRECISION"):
        choice = os.environ["ACCELERATE_MIXED_PRECISION"]
    use_cpu = os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true")
    return resolve_mixed_precision(choice, "cuda" if torch.cuda.is_available() and not use_cpu else "cpu")


def predict_max_length(base_path, max_length):
    """Where prediction cuts texts: the training cut, or the longer one measured better on this base (its
    fine_tuning.json's "predict": {"max_length"}; for e5, studies/length/results.md), within the base's positions."""
    measured = fine_tuning_defaults(base_path, "predict").get("max_length", max_length)
    config = AutoConfig.from_pretrained(base_path)
    positions = getattr(config, "n_positions", None) or getattr(config, "max_position_embeddings", None) or measured
    return max(max_length, min(measured, positions))


def apply_base_defaults(cfg, base_path, method_name):
    """Settings not given on the command line come from what was measured best on this base (its fine_tuning.json):
    the script's constants were chosen for the configured hub model. Returns a line saying what changed."""
    defaults = {key: value for key, value in fine_tuning_defaults(base_path, method_name).items() if key not in cfg.given}
    changed = {key: value for key, value in defaults.items() if getattr(cfg, key) != value}
    for key, value in changed.items():
        setattr(cfg, key, value)
    if not changed:
        return None
    return f"settings measured best on {repo_relative(base_path)}, used where not given on the command line: {as_flags(changed)}"


# flag -> (test, what is allowed); checked before any work, for flags and for constants edited at the top of a script
SETTING_RANGES = {
    "epochs": (lambda v: v >= 1, "an integer >= 1"),
    "seed": (lambda v: 0 <= v < 2**32, "an integer from 0 to 2**32 - 1"),
    "batch_size": (lambda v: v >= 1, "an integer >= 1"),
    "lr": (lambda v: math.isfinite(v) and v > 0, "a finite number > 0"),
    "warmup_ratio": (lambda v: 0 <= v <= 1, "between 0 and 1"),
    "max_length": (lambda v: v >= 2, "an integer >= 2"),
    "val_fraction": (lambda v: 0 < v < 1, "between 0 and 1, both excluded"),
    "max_samples": (lambda v: v >= 0, "an integer >= 0 (0: all rows)"),
    "emoticon_drop": (lambda v: 0 <= v <= 1, "between 0 and 1"),
    "base_layers": (lambda v: v >= 0, "an integer >= 0 (0: all of the base's layers)"),
    "distill_weight": (lambda v: 0 <= v <= 1, "between 0 and 1"),
    "distill_temperature": (lambda v: math.isfinite(v) and v > 0, "a finite number > 0"),
    "pooling": (lambda v: v in POOLINGS, " or ".join(POOLINGS)),
    "linear_probe": (lambda v: v >= 0, "an integer >= 0 (0: off)"),
    "wise_tolerance": (lambda v: 0 <= v < 1, "at least 0 and below 1"),
    "distant_share": (lambda v: 0 <= v <= 1, "between 0 and 1 (0: human labels only, 1: distant labels only)"),
    "human_samples": (lambda v: v >= 0, "an integer >= 0 (0: all)"),
    "adapter_size": (lambda v: v >= 1, "an integer >= 1"),
    "lora_r": (lambda v: v >= 1, "an integer >= 1"),
    "lora_alpha": (lambda v: math.isfinite(v) and v > 0, "a finite number > 0"),
    "lora_dropout": (lambda v: 0 <= v < 1, "at least 0 and below 1"),
}


def check_settings(cfg):
    check_ranges(cfg, SETTING_RANGES)


def check_against_model(cfg, base_path, method, settings):
    """What depends on the base: positions for --max-length, and what the method needs of the model (its blocks,
    its target modules), checked on a skeleton of the model with no weights, before any data is read."""
    config = AutoConfig.from_pretrained(base_path, num_labels=len(LABEL_NAMES))
    layers = settings.get("base_layers", 0)
    if layers > config.num_hidden_layers:
        raise UserError(f"--base-layers {layers} (BASE_LAYERS): out of range, {base_path.name} has {config.num_hidden_layers} layers")
    if layers:
        config.num_hidden_layers = layers
    positions = getattr(config, "n_positions", None) or getattr(config, "max_position_embeddings", None)
    if positions and cfg.max_length > positions:
        raise UserError(f"--max-length {cfg.max_length} (MAX_LENGTH): out of range, {base_path.name} has {positions} positions, so at most {positions}")
    with torch.device("meta"):
        skeleton = AutoModelForSequenceClassification.from_config(config)
    if settings.get("pooling") == "mean" and not hasattr(skeleton.base_model, "pooler"):
        raise UserError(f"--pooling mean (POOLING): for BERT-family bases, whose head reads a pooled vector; a {config.model_type} "
                        "model's head reads its last token. Use --pooling cls")
    if getattr(cfg, "wise_alphas", ""):
        parse_alphas(cfg.wise_alphas)
    if getattr(cfg, "wise_alphas", "") and not getattr(cfg, "linear_probe", 0) and not getattr(cfg, "init_from", ""):
        raise UserError("--wise-alphas (WISE_ALPHAS): WiSE-FT interpolates toward the model fine-tuning starts from, so it needs "
                        "--linear-probe N (the linear-probe model) or --init-from CHECKPOINT (a trained classifier)")
    if hasattr(method, "check"):
        method.check(skeleton, settings)


def _refuse_to_replace(cfg):
    """A finished or interrupted run in OUTPUT_DIR is kept unless --resume or --overwrite says what to do with it."""
    best, last = find_checkpoint(cfg.output_dir / "best"), find_checkpoint(cfg.output_dir / "last")
    if cfg.resume or cfg.overwrite or not (best.is_dir() or last.is_dir()):
        return
    try:
        held = f" (its best/ is epoch {read_info(best)['epoch']})"
    except Exception:
        held = ""
    raise UserError(
        f"{cfg.output_dir} already holds a training run{held}. --resume continues it, --overwrite replaces it, "
        "or choose another --output-dir"
    )


def _lock(output_dir):
    """Hold OUTPUT_DIR for this run: a second run into the same folder stops at once instead of mixing checkpoints."""
    if output_dir.exists() and not output_dir.is_dir():
        raise UserError(f"--output-dir {output_dir}: a file is there; give a folder")
    lock = FileLock(output_dir / LOCK_FILE)
    try:
        output_dir.mkdir(parents=True, exist_ok=True)
        lock.acquire(timeout=0)
    except Timeout:
        raise UserError(f"another training run is writing to {output_dir} (it holds {output_dir / LOCK_FILE}); "
                        "wait for it to finish, or choose another --output-dir") from None
    except OSError as error:  # a read-only place (after Timeout, which is an OSError too)
        raise UserError(f"--output-dir {output_dir}: cannot be written ({error.strerror or error}); choose another") from None
    return lock


def wise_ft(cfg, method, base_path, tokenizer, settings, val_loaders, chosen_on, fit_positions, accelerator, say):
    """Score best/ at each WiSE-FT alpha on the texts that chose it (val_loaders[chosen_on]: the human-labelled posts,
    else the distant validation texts without tags), keep the alpha lpft.choose_alpha picks by their fit half, and save
    best/ with it applied (the fine-tuned weights, alpha 1, stay in best_finetuned/)."""
    what = "on the human-labelled posts" if chosen_on == "human_val" else "without emoticons"
    best_dir = cfg.output_dir / "best"
    info = read_info(best_dir)
    model = method.build(base_path, tokenizer, settings, weights_from=best_dir).to(accelerator.device)
    finetuned = {name: tensor.detach().clone() for name, tensor in trainable_tensors(model).items()}
    probe = load_probe_state(cfg.output_dir / PROBE_FILE)
    scale_updates = "init_from" not in info  # from a trained classifier: its adapters or LoRA layers are interpolated too
    candidates = []
    for alpha in parse_alphas(cfg.wise_alphas):
        if alpha == 1 and f"{chosen_on}_fit_accuracy" in info["metrics"]:  # as its epoch scored it (else, an earlier version's: again)
            metrics = {key.removeprefix(f"{chosen_on}_"): value for key, value in info["metrics"].items()
                       if key.startswith(f"{chosen_on}_") and not key.startswith(f"{chosen_on}_no_emoticons")}
        else:
            interpolate(model, finetuned, probe, alpha, scale_updates)
            with accelerator.autocast():  # the precision the epochs were scored in, as alpha 1 was
                metrics = evaluate(model, val_loaders[chosen_on], accelerator, fit_positions)
        candidates.append({"alpha": alpha, **{key: round(value, 4) for key, value in metrics.items()}})
        say(f"WiSE-FT alpha {alpha:g}: {what} acc {metrics['accuracy']:.4f} recall neg/pos "
            f"{metrics['recall_negative']:.3f}/{metrics['recall_positive']:.3f}")
    alpha = choose_alpha(candidates, cfg.wise_tolerance, key="fit_accuracy")
    texts = "human-labelled posts" if chosen_on == "human_val" else "validation texts without tags"
    rule = f"the smallest alpha whose accuracy on the {texts} the confidence is fitted on is within {cfg.wise_tolerance:g} of the best"
    toward = f"the --init-from classifier {info['init_from']}" if not scale_updates else "the linear-probe model"
    info["wise_ft"] = {"alpha": alpha, "toward": toward, "rule": rule, "candidates": candidates}
    say(f"WiSE-FT toward {toward}: alpha {alpha:g} ({rule})")
    if alpha < 1:
        interpolate(model, finetuned, probe, alpha, scale_updates)
        chosen = next(row for row in candidates if row["alpha"] == alpha)
        updated = {f"{chosen_on}_{key}": value for key, value in chosen.items() if key != "alpha"}
        with accelerator.autocast():
            for name, loader in val_loaders.items():
                if name != chosen_on:
                    updated.update({f"{name}_{key}": value for key, value in evaluate(model, loader, accelerator).items()})
        info["metrics"] = {**info["metrics"], **updated}
    if accelerator.is_main_process:
        if alpha < 1:
            with atomic_directory(cfg.output_dir / "best_finetuned") as tmp:
                for file in best_dir.iterdir():
                    shutil.copy2(file, tmp / file.name)
            write_checkpoint(best_dir, model, tokenizer, info, card=model_card(info))
        else:
            write_info_and_card(best_dir, info)
    accelerator.wait_for_everyone()


def run(cfg, method_name):
    check_settings(cfg)
    precision, why = _mixed_precision(cfg)
    # Accelerate keeps one process-wide state and refuses a second Accelerator of another precision; each run (a second
    # one in a notebook, or in a test after one that resolved 'auto' otherwise) gets the precision it asks for. The
    # distributed setup (PartialState) is kept.
    AcceleratorState._reset_state()
    accelerator = Accelerator(
        mixed_precision=precision, dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, data_seed=cfg.seed)
    )
    created = not cfg.output_dir.exists()
    lock = _lock(cfg.output_dir) if accelerator.is_main_process else None
    try:
        _refuse_to_replace(cfg)
        return _run(cfg, method_name, accelerator, why)
    finally:
        if lock is not None:
            lock.release()
            # a run refused before it wrote anything (bad data, nothing to resume) leaves no folder behind it
            if created and {path.name for path in cfg.output_dir.iterdir()} <= {LOCK_FILE}:
                shutil.rmtree(cfg.output_dir, ignore_errors=True)


def _run(cfg, method_name, accelerator, why):
    say = accelerator.print
    method = method_module(method_name)
    best_dir, last_dir, log_path = cfg.output_dir / "best", cfg.output_dir / "last", cfg.output_dir / LOG_FILE

    init_dir = adopt_init_checkpoint(cfg, method_name)
    mini_model = MINI_MODELS[BASE_FAMILY[method_name]]
    base_path = resolve_model(cfg.model, fallback=mini_model)
    note = apply_base_defaults(cfg, base_path, method_name)
    check_settings(cfg)
    settings = method_settings(cfg, method)
    check_against_model(cfg, base_path, method, settings)
    # record the base actually used: a stand-in for the hub model (the embedded mini model, the e5 import) by its
    # place in the repository, so that a checkpoint never claims a base it was not trained on, and is found anywhere
    stand_in = base_path == mini_model or base_path in OFFLINE_IMPORTS.values()
    base_model = repo_relative(base_path) if stand_in else str(cfg.model)
    resume_dir, state, resumed = _resume_state(cfg, last_dir, method_name, settings) if cfg.resume else (None, None, {})
    if resumed.get("mixed_precision", accelerator.mixed_precision) != accelerator.mixed_precision:
        if "mixed_precision" not in cfg.given:
            raise UserError(f"--resume: the run in {resume_dir} trained in {resumed['mixed_precision']}, and here it would go on in "
                            f"{accelerator.mixed_precision} ({why}): pass --mixed-precision {resumed['mixed_precision']} to go on "
                            f"as it began, or --mixed-precision {accelerator.mixed_precision} to change")
        say(f"note: the run trained in {resumed['mixed_precision']} so far; it goes on in {accelerator.mixed_precision}, as asked")

    human_path = human_data_path(cfg)
    share = getattr(cfg, "distant_share", 1.0) if human_path else 1.0
    if human_path:
        human_table, human_report = load_labelled_csv(human_path)
        say(human_report)
        human_train, human_val = split_human(human_table, samples=getattr(cfg, "human_samples", 0))
        say(f"human-labelled: train {len(human_train):,} posts, validation {len(human_val):,} (fixed split, seed {HUMAN_SPLIT_SEED})")
    table, report = load_labelled_csv(cfg.data)
    say(report)
    train_rows, val_rows = split_train_val(table, cfg.val_fraction, cfg.seed, cfg.max_samples)
    say(f"distant-labelled: train {len(train_rows):,} rows, validation {len(val_rows):,} rows (seed {cfg.seed})")
    sources = Sources(human_train if human_path else train_rows.iloc[:0], train_rows, share)
    selected_metric = HUMAN_SELECTION_METRIC if human_path else SELECTION_METRIC
    say(f"training on {sources.describe()}; best/ by {SELECTION_RULES[selected_metric]}")
    if init_dir is not None:
        say(f"starting from {repo_relative(init_dir)} (--init-from)")
    if note:
        say(note)
    tokenizer = load_tokenizer(base_path)
    teacher = load_teacher(cfg, accelerator.device)
    if teacher is not None:
        say(f"teacher: {teacher.source}; loss: {1 - cfg.distill_weight:g} x cross-entropy + {cfg.distill_weight:g} x KL to its "
            f"probabilities at temperature {cfg.distill_temperature:g}")
    set_seed(cfg.seed)
    try:
        model = method.build(base_path, tokenizer, settings, weights_from=resume_dir or init_dir)
    except CheckpointError:
        raise
    except Exception as error:
        if resume_dir is None:
            raise
        raise CheckpointError(f"--resume: cannot load the weights in {resume_dir} ({type(error).__name__}: "
                              f"{str(error).splitlines()[0][:200]}). Start again with --overwrite.") from None
    say(f"base model: {base_model} ({base_path})")
    say(f"device: {accelerator.device}, processes: {accelerator.num_processes}, mixed precision: {accelerator.mixed_precision} ({why})")
    say(describe_parameters(model))
    if hasattr(method, "describe"):
        say(method.describe(model))

    collate = make_collate(tokenizer.pad_token_id, PAD_TO_MULTIPLE_OF[accelerator.mixed_precision], teacher and teacher.tokenizer.pad_token_id)
    text_prefix = getattr(cfg, "text_prefix", "")
    train_rows = sources.rows
    train_set = EncodedTexts(
        train_rows["review"], train_rows["label"], tokenizer, cfg.max_length, cfg.emoticon_drop, teacher and teacher.tokenizer,
        text_prefix, teacher and teacher.text_prefix,
    )
    if cfg.group_by_length or len(sources.pools()) > 1:
        batches = LengthGroupedBatches([len(ids) for ids in train_set.input_ids], cfg.batch_size, 50 if cfg.group_by_length else 1,
                                       sources.pools())
        train_loader = DataLoader(train_set, batch_sampler=batches, collate_fn=collate)
    else:
        train_loader = DataLoader(train_set, batch_size=cfg.batch_size, shuffle=True, collate_fn=collate)
    val_sets = {"val": (val_rows, False), "val_no_emoticons": (val_rows, True)}
    fit_positions = {"val_no_emoticons": selection_positions(val_rows, cfg.seed)}
    if human_path:  # first, so that each log line leads with them
        val_sets = {"human_val": (human_val, False), "human_val_no_emoticons": (human_val, True), **val_sets}
        fit_positions["human_val"] = selection_positions(human_val, HUMAN_SPLIT_SEED)
    val_loaders = {
        name: DataLoader(EncodedTexts(rows["review"].map(strip_emoticons) if strip else rows["review"], rows["label"], tokenizer,
                                      cfg.max_length, text_prefix=text_prefix),
                         batch_size=cfg.batch_size * 2, collate_fn=collate)
        for name, (rows, strip) in val_sets.items()
    }
    probe = None
    if getattr(cfg, "linear_probe", 0) and resume_dir is None:
        started = time.perf_counter()
        fit = fit_linear_probe(model.to(accelerator.device), train_set, collate, cfg.linear_probe, cfg.seed, cfg.batch_size * 2, accelerator.device)
        probe = {"texts": min(cfg.linear_probe, len(train_set)), "train_accuracy": round(fit, 4), "seconds": round(time.perf_counter() - started, 1)}
        say(f"linear probe (LP-FT): head fitted on the frozen model's features of {probe['texts']:,} training texts, "
            f"accuracy on them {fit:.4f} ({probe['seconds']:.0f}s)")
    if resume_dir is None and accelerator.is_main_process and (probe or (init_dir is not None and getattr(cfg, "wise_alphas", ""))):
        save_probe_state(model, cfg.output_dir / PROBE_FILE)  # where WiSE-FT goes back to
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=cfg.lr)
    model, optimizer, train_loader, *prepared_val = accelerator.prepare(model, optimizer, train_loader, *val_loaders.values())
    val_loaders = dict(zip(val_loaders, prepared_val))
    total_steps = len(train_loader) * cfg.epochs
    scheduler = get_linear_schedule_with_warmup(optimizer, int(cfg.warmup_ratio * total_steps), total_steps)

    start_epoch, selected_by, best_score, log = 0, selected_metric, -1.0, []
    extended_from = resumed.get("extended_from_epochs")
    if state is not None:
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        start_epoch = state["epoch"] + 1
        # the runs of earlier versions recorded only "best_f1", their validation macro-F1 with the tags
        selected_by, best_score = state.get("selected_by", "val_macro_f1"), state.get("best_score", state.get("best_f1"))
        log = json.loads(log_path.read_text(encoding="utf-8"))[:start_epoch] if log_path.is_file() else []
        say(f"resuming after epoch {start_epoch} of {cfg.epochs} (best {SELECTION_RULES[selected_by]} so far {best_score:.4f})")
        planned = int(resumed["run"]["epochs"])
        if cfg.epochs > planned:
            extended_from = extended_from or planned
            say(f"extending the run from {planned} to {cfg.epochs} epochs: the learning rate's linear decay now spans {cfg.epochs} "
                f"epochs, so it restarts at {cfg.lr * scheduler.lr_lambdas[0](scheduler.last_epoch):.2e}")
    if probe is None:
        probe = resumed.get("linear_probe")
    if start_epoch >= cfg.epochs:
        say(f"nothing to do: the run in {cfg.output_dir} already finished its {cfg.epochs} epochs")
        return log

    info = {
        "method": method_name,
        "method_settings": settings,
        "base_model": base_model,
        "requested_base_model": str(cfg.model),
        "base_model_path": repo_relative(base_path),
        "max_length": cfg.max_length,
        **({"predict_max_length": cut} if (cut := predict_max_length(base_path, cfg.max_length)) > cfg.max_length else {}),
        "mixed_precision": accelerator.mixed_precision,  # what it trained in; the saved weights stay fp32
        "labels": list(LABEL_NAMES),
        **({"text_prefix": text_prefix} if text_prefix else {}),
        "run": _run_identity(cfg),
        "selected_by": {"metric": selected_by, "rule": SELECTION_RULES[selected_by]},
        **({"extended_from_epochs": extended_from} if extended_from else {}),
        **({"linear_probe": probe} if probe else {}),
        **({"init_from": repo_relative(init_dir)} if init_dir is not None else {}),
        "data_rows": {"train": len(train_rows), "val": len(val_rows),
                      **({"human_train": len(sources.human), "human_val": len(human_val), "distant_per_epoch": sources.distant_per_epoch}
                         if human_path else {})},
        "parameters": dict(zip(("total", "trainable"), count_parameters(accelerator.unwrap_model(model)))),
        "versions": {
            "python": platform.python_version(), "torch": torch.__version__,
            "transformers": transformers.__version__, "peft": peft.__version__,
        },
    }
    for epoch in range(start_epoch, cfg.epochs):
        set_seed(cfg.seed + epoch)  # dropout and batch order depend on the epoch alone, so --resume repeats them
        train_loader.set_epoch(epoch)
        model.train()
        started, loss_sum, steps = time.perf_counter(), 0.0, 0
        progress = tqdm(train_loader, desc=f"epoch {epoch + 1}/{cfg.epochs}", disable=not accelerator.is_local_main_process)
        for batch in progress:
            if teacher is None:
                loss = model(**batch).loss
            else:
                with torch.no_grad(), accelerator.autocast():
                    teacher_logits = teacher.model(input_ids=batch.pop("teacher_input_ids"), attention_mask=batch.pop("teacher_attention_mask")).logits
                logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
                loss = distillation_loss(logits, teacher_logits, batch["labels"], cfg.distill_weight, cfg.distill_temperature)
            if not torch.isfinite(loss):
                raise UserError(
                    f"epoch {epoch + 1}, step {steps + 1}: the training loss is {loss.item()}, so the run stopped; nothing of this "
                    f"epoch was saved. The learning rate ({cfg.lr}) is likely too high: try a smaller --lr"
                )
            accelerator.backward(loss)
            accelerator.clip_grad_norm_(trainable, 1.0)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad()
            loss_sum, steps = loss_sum + loss.item(), steps + 1
            progress.set_postfix(loss=f"{loss_sum / steps:.4f}")
        train_seconds = time.perf_counter() - started

        entry = {
            "epoch": epoch + 1,
            "train_loss": loss_sum / steps,
            "train_seconds": round(train_seconds, 1),
            "train_samples_per_second": round(steps * cfg.batch_size / train_seconds, 1),
        }
        for name, loader in val_loaders.items():
            metrics = evaluate(model, loader, accelerator, fit_positions.get(name))
            entry.update({f"{name}_{key}": value for key, value in metrics.items()})
        log.append(entry)
        improved = entry[selected_by] > best_score
        best_score = max(best_score, entry[selected_by])
        human = (f"human-labelled acc {entry['human_val_accuracy']:.4f} macro-F1 {entry['human_val_macro_f1']:.4f} recall neg/pos "
                 f"{entry['human_val_recall_negative']:.3f}/{entry['human_val_recall_positive']:.3f} calibration error "
                 f"{entry['human_val_calibration_error']:.3f}, without tags acc {entry['human_val_no_emoticons_accuracy']:.4f} | "
                 if "human_val_accuracy" in entry else "")
        say(
            f"epoch {epoch + 1}: train loss {entry['train_loss']:.4f} | {human}distant validation acc {entry['val_accuracy']:.4f} "
            f"macro-F1 {entry['val_macro_f1']:.4f} | without emoticons acc {entry['val_no_emoticons_accuracy']:.4f} "
            f"macro-F1 {entry['val_no_emoticons_macro_f1']:.4f} recall neg/pos {entry['val_no_emoticons_recall_negative']:.3f}/"
            f"{entry['val_no_emoticons_recall_positive']:.3f} calibration error {entry['val_no_emoticons_calibration_error']:.3f} | "
            f"{selected_by}: {entry[selected_by]:.4f} | {train_seconds:.0f}s"
        )
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            unwrapped = accelerator.unwrap_model(model)
            epoch_info = {**info, "epoch": epoch + 1, "metrics": entry}
            if improved:
                write_checkpoint(best_dir, unwrapped, tokenizer, epoch_info, card=model_card(epoch_info))
            training_state = {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "epoch": epoch,
                              "selected_by": selected_by, "best_score": best_score}
            write_checkpoint(last_dir, unwrapped, tokenizer, epoch_info, training_state=training_state, card=model_card(epoch_info))
            write_json_atomic(log_path, log)
            if improved:
                say(f"new best, saved to {best_dir}")
        accelerator.wait_for_everyone()
    say(f"best {SELECTION_RULES[selected_by]}: {best_score:.4f}; checkpoint: {best_dir}")
    if getattr(cfg, "wise_alphas", ""):
        chosen_on = "human_val" if selected_by == HUMAN_SELECTION_METRIC else "val_no_emoticons"
        wise_ft(cfg, method, base_path, tokenizer, settings, val_loaders, chosen_on, fit_positions[chosen_on], accelerator, say)
    if accelerator.is_main_process:
        if selected_by == HUMAN_SELECTION_METRIC:
            calibrate_checkpoint(best_dir, human_val, HUMAN_SPLIT_SEED, cfg.batch_size * 2, say, as_they_are=True)
        else:
            calibrate_checkpoint(best_dir, val_rows, cfg.seed, cfg.batch_size * 2, say)
    return log


# ---- the calibration of a trained checkpoint (calibration.py's functions, run on its classifier) ----

SPLIT_KEYS = ("data", "seed", "val_fraction", "max_samples")  # what of a run's record fixes its validation rows


def run_validation_rows(checkpoint, info, data=""):
    """The validation rows of the run that trained `checkpoint`: its data (or `data`), seed, fraction and subset, as its
    checkpoint.json (`info`) records them."""
    run = info.get("run", {})
    if not set(SPLIT_KEYS) <= run.keys():
        raise UserError(f"{checkpoint}: its checkpoint.json does not record the run's data and split, so its validation "
                        "texts are unknown; retrain it with train.py (which calibrates by itself)")
    path = Path(data or run["data"])
    table, _ = load_labelled_csv(path if path.is_absolute() or data else REPO_ROOT / path)
    _, val = split_train_val(table, float(run["val_fraction"]), int(run["seed"]), int(run["max_samples"]))
    return val


def calibrate(classifier, val_rows, seed, batch_size=64, as_they_are=False):
    """Fit the classifier's bias and temperature on half of `val_rows` without tags (as_they_are: and as they are, both
    together: for labels that people gave, which the tags did not decide); returns checkpoint.json's "calibration"
    record, or None when there are too few texts to fit them."""
    fit, held_out = calibration_halves(val_rows, seed)
    if fit.empty:
        return None
    kept, (classifier.temperature, classifier.bias) = (classifier.temperature, classifier.bias), (1.0, 0.0)
    try:
        texts, labels = fit["review"].map(strip_emoticons).tolist(), fit["label"].tolist()
        if as_they_are:
            texts, labels = texts + fit["review"].tolist(), labels + fit["label"].tolist()
        fitted = classifier.probabilities(texts, batch_size)
        threshold = recall_balancing_threshold(fitted, labels)
        temperature = fit_temperature(fitted, labels, threshold)
        bias = -threshold / temperature
        held_out_report, held_out_probabilities = {}, {}
        for name, texts in (("without_tags", held_out["review"].map(strip_emoticons)), ("with_tags", held_out["review"])):
            probabilities = classifier.probabilities(texts.tolist(), batch_size)
            held_out_probabilities[name] = apply_calibration(probabilities, temperature, bias)
            held_out_report[name] = {"before": report(probabilities, held_out["label"]),
                                     "after": report(held_out_probabilities[name], held_out["label"])}
    finally:
        classifier.temperature, classifier.bias = kept
    record = {
        "temperature": round(temperature, 4),
        "bias": round(bias, 4),
        "fitted_on": (f"{len(fit):,} human-labelled validation posts, as they are and without emoticon tags (seed {seed})" if as_they_are
                      else f"{len(fit):,} validation texts without emoticon tags (seed {seed})"),
        "held_out": held_out_report,
        "held_out_texts": len(held_out),
    }
    if as_they_are:  # people's labels: the five levels' edges too, on the same posts, reported on the other half
        bands = fit_bands(apply_calibration(fitted, temperature, bias), labels)
        both = np.concatenate([held_out_probabilities["with_tags"], held_out_probabilities["without_tags"]])
        record["bands"] = {**bands, "fitted_on": record["fitted_on"],
                           "held_out": bands_report(both, np.concatenate([held_out["label"]] * 2), bands)}
    return record


def fit_bands_only(classifier, val_rows, seed, batch_size=64):
    """checkpoint.json's "bands" for a classifier already calibrated on human-labelled posts: fitted on the same half of
    `val_rows` as its calibration was, with that calibration applied."""
    fit, held_out = calibration_halves(val_rows, seed)
    texts = fit["review"].map(strip_emoticons).tolist() + fit["review"].tolist()
    bands = fit_bands(classifier.probabilities(texts, batch_size), fit["label"].tolist() * 2)
    held_texts = held_out["review"].tolist() + held_out["review"].map(strip_emoticons).tolist()
    report = bands_report(classifier.probabilities(held_texts, batch_size), held_out["label"].tolist() * 2, bands)
    return {**bands, "fitted_on": f"{len(fit):,} human-labelled validation posts, as they are and without emoticon tags "
                                  f"(seed {seed})", "held_out": report}


def calibrate_checkpoint(folder, val_rows, seed, batch_size=64, say=print, as_they_are=False):
    """Fit `folder`'s bias and temperature on `val_rows` (the validation rows of the run that trained it) and write it into its
    checkpoint.json (atomically). Returns the record, or None when there were too few texts."""
    folder = find_checkpoint(folder)
    classifier = Classifier.load(folder, mixed_precision="auto")
    record = calibrate(classifier, val_rows, seed, batch_size, as_they_are)
    if record is None:
        say(f"{folder}: not calibrated (fewer than {MIN_TEXTS} validation texts); confidences are the softmax as it is")
        return None
    write_info_and_card(folder, {**read_info(folder), "calibration": record})
    say(f"{folder}: {describe(record)}")
    return record


def fit_bands_of_checkpoint(folder, val_rows, seed, batch_size=64, say=print):
    """fit_bands_only() for `folder`, written into its checkpoint.json's calibration (atomically)."""
    from . import UserError
    folder = find_checkpoint(folder)
    info = read_info(folder)
    if not info.get("calibration"):
        raise UserError(f"{folder} is not calibrated: run calibrate.py without --bands-only first")
    bands = fit_bands_only(Classifier.load(folder, mixed_precision="auto"), val_rows, seed, batch_size)
    write_info_and_card(folder, {**info, "calibration": {**info["calibration"], "bands": bands}})
    say(f"{folder}: {describe_bands(bands)}")
    return bands


def main(script_globals, method_name):
    """What each train.py runs: its constants and flags, the training, and for LoRA --merge-to the merged model."""
    cfg = parse_config(script_globals)
    merge_to = getattr(cfg, "merge_to", "")
    if merge_to:  # refused before training, not after
        from .lora import check_merge_destination, export_merged
        check_merge_destination(Path(cfg.output_dir) / "best", Path(merge_to))
    run(cfg, method_name)
    if merge_to:
        print(f"merged model written to {export_merged(cfg.output_dir / 'best', Path(merge_to))}")
