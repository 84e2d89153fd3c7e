"""The model card: README.md of a checkpoint folder, the page a user opening it reads first (in place of PEFT's empty
template), written from its checkpoint.json so the two always agree."""
from .calibration import describe as describe_calibration
from .checkpoint import INFO_FILE, LOG_FILE, METHOD_MODULES, write_info


def write_info_and_card(folder, info):
    write_info(folder, info, model_card(info))


def _figure(value, digits):
    return "" if value is None else f"{value:.{digits}f}"


def model_card(info):
    """What the checkpoint is, how it scores with and without emoticon tags, how its confidence was fitted, how to use it."""
    method, metrics, run = info["method"], info.get("metrics", {}), info.get("run", {})
    rows, parameters, calibration = info.get("data_rows", {}), info.get("parameters", {}), info.get("calibration")
    reference = method == "full_finetune"  # trained by a bench script, scored by compare.py: no <method>/ folder of its own
    peft_folder = METHOD_MODULES[method] == "weibo_senti.lora"
    lines = ["---", f"base_model: {info['base_model']}", *(["library_name: peft"] if peft_folder else []),
             "pipeline_tag: text-classification", "language: zh", f"tags: [weibo-sentiment, {method}]", "---", "",
             f"# Weibo sentiment: {method} on {info['base_model']}", ""]
    script = "studies/full_finetune/full_finetune.py" if reference else f"{method}/train.py"
    about = f"A checkpoint of this toolkit, trained by `{script}`"
    if rows.get("human_train") or rows.get("human_val"):
        about += (f" on {rows['human_train']:,} posts labelled by people (`{run.get('human_data')}`; {rows['human_val']:,} more held out)"
                  + (f" and {rows['distant_per_epoch']:,} texts an epoch drawn from `{run.get('data')}`" if rows.get("distant_per_epoch") else ""))
    elif rows:
        about += f" on `{run.get('data', 'its data')}` ({rows['train']:,} training rows, {rows['val']:,} validation)"
    if info.get("init_from"):
        about += f", starting from the trained `{info['init_from']}`"
    if run.get("teacher"):
        about += (f", distilled from `{run['teacher']}` ({run.get('distill_weight')} of the loss on its probabilities at "
                  f"temperature {run.get('distill_temperature')}, the rest on the labels)")
    if "epoch" in info:
        selected = info.get("selected_by") or {}
        about += f", the best epoch by {selected.get('rule', 'validation macro-F1')} (epoch {info['epoch']} of {run.get('epochs', info['epoch'])}"
        about += f"; planned as {info['extended_from_epochs']}, extended with --resume" if "extended_from_epochs" in info else ""
        about += f"; chosen {selected['applied']})" if "applied" in selected else ")"
    if parameters.get("total"):
        about += (f"; {parameters['trainable']:,} of its {parameters['total']:,} weights trained "
                  f"({100 * parameters['trainable'] / parameters['total']:.2f}%)")
        about += ", the base stayed frozen" if parameters["trainable"] < parameters["total"] else ""
    settings = [f"{key} {','.join(value) if isinstance(value, list) else value}" for key, value in info["method_settings"].items()]
    if info.get("text_prefix"):
        settings.append(f"every text prefixed with {info['text_prefix']!r}")
    lines += [about + ".", "", *([f"Settings: {', '.join(settings)}.", ""] if settings else [])]
    texts = f"{rows['val']:,} validation texts" if rows and "human_val_accuracy" not in metrics else "validation texts"
    texts += ", before the confidence fit" if calibration else ""
    lines += [f"| {texts} | accuracy | macro-F1 | recall negative / positive | calibration error |", "|---|---:|---:|---:|---:|"]
    sets = [("as they are", "val_"), ("emoticon tags removed", "val_no_emoticons_")]
    if "human_val_accuracy" in metrics:
        sets = [(f"{rows.get('human_val', 0):,} posts labelled by people, as they are", "human_val_"),
                ("the same, tags removed", "human_val_no_emoticons_"),
                *((f"weibo_senti_100k, {label}", prefix) for label, prefix in sets)]
    for label, prefix in sets:
        recalls = [metrics.get(prefix + "recall_negative"), metrics.get(prefix + "recall_positive")]
        lines.append(f"| {label} | {_figure(metrics.get(prefix + 'accuracy'), 4)} | {_figure(metrics.get(prefix + 'macro_f1'), 4)} | "
                     f"{' / '.join(_figure(r, 3) for r in recalls) if None not in recalls else ''} | "
                     f"{_figure(metrics.get(prefix + 'calibration_error'), 3)} |")
    lines += ["", "weibo_senti_100k was labelled from the emoticon tags left in its texts, so the row without them says what the "
              "model reads in the words; crawled posts usually arrive without them."]
    if calibration:
        lines += ["", f"Confidence: {describe_calibration(calibration)}. Every prediction uses them."]
    example = "又加班到半夜，心好累"
    command = ("python compare.py FOLDER   # the full fine-tuning reference has no predict.py; compare.py scores it" if reference
               else f'python {method}/predict.py --checkpoint FOLDER --text "{example}"')
    lines += ["", "## Use", "", "FOLDER is this folder.", "", "```bash", command, "```", "", "```python",
              "from weibo_senti.predict import Classifier", "", f'Classifier.load(FOLDER).predict(["{example}"])', "```", "",
              f"`{INFO_FILE}` holds what rebuilds the model and every setting of the run (`run`); `{LOG_FILE}`, in the "
              "run's folder, every epoch's figures."]
    return "\n".join(lines) + "\n"
