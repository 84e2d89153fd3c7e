"""Compare trained checkpoints on people's labels first (weibo2018's held-out validation posts), then on weibo_senti_100k's
seeded validation split (plain and without emoticons): accuracy and macro-F1, precision and recall per class, the
confusion matrix and the calibration error, trainable parameters, checkpoint size, training time, inference speed and
peak memory.

python compare.py                                 # every adapter_tuning|lora|bert_lora/output/best
python compare.py lora/output/best other/best --extra more.csv,other.csv
Writes results/comparison.md and results/comparison.png.
"""
import json
import multiprocessing
import os
import resource
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from weibo_senti import REPO_ROOT, UserError, cli  # noqa: E402
from weibo_senti.checkpoint import METHOD_MODULES  # noqa: E402

HUMAN_DATA = "dataset/weibo2018/train.txt"  # posts labelled by people: the 750 of its fixed validation posts that chose no epoch and fitted no calibration lead the report ("none": left out)
DATA = Path(os.environ.get("WEIBO_SENTI_DATA", "dataset/weibo_senti_100k.csv"))  # the labelled CSV the checkpoints were trained on
VAL_FRACTION = 0.1  # must match the training runs, so that no validation text was trained on
SEED = 42  # must match the training runs
MAX_SAMPLES = 0  # evaluate on the validation part of a subset of this many rows (0 = all), for quick looks
EXTRA = ""  # comma-separated extra label,review CSV files, each reported on its own (and without its tags, where it has any)
BATCH_SIZE = 64  # texts per batch for the batched measurements
SINGLE_TEXTS = 50  # texts predicted one at a time for the ms-per-text figure
MIXED_PRECISION = "auto"  # of prediction: auto (bf16 where the CPU or GPU computes it natively, else fp32), no, bf16, fp16
BACKEND = "auto"  # torch, onnx (ONNX Runtime fp32), onnx-int8, or auto: PyTorch on a GPU or a bf16 CPU, else ONNX Runtime (int8 only if it keeps fp32's labels)
RESULTS_DIR = Path("results")  # where comparison.md and comparison.png go


def measure(checkpoint, text_sets, batch_size, single_texts, runtime):
    """Runs in a child process, so that its peak memory is this model's alone."""
    import torch

    from weibo_senti.calibration import calibration_error
    from weibo_senti.data import detailed_scores
    from weibo_senti.predict import Classifier

    classifier = Classifier.load(checkpoint, **runtime)
    first = text_sets["val"]  # the texts the speed figures have always been measured on
    classifier.probabilities(first["texts"][:batch_size], batch_size)  # warm-up
    result = {"scores": {}}
    for name, data in text_sets.items():
        started = time.perf_counter()
        probabilities = classifier.probabilities(data["texts"], batch_size)
        seconds = time.perf_counter() - started
        result["scores"][name] = detailed_scores(data["labels"], probabilities.argmax(axis=1), probabilities)
        if "held_out" in data:
            held_out = data["held_out"]
            result["scores"][name]["calibration_error"] = calibration_error(probabilities[held_out], data["labels"][held_out])
        if name == "val":
            result["batched_texts_per_second"] = len(data["texts"]) / seconds
    singles = []
    for text in first["texts"][:single_texts]:
        started = time.perf_counter()
        classifier.probabilities([text])
        singles.append(time.perf_counter() - started)
    result["ms_per_single_text"] = 1000 * statistics.median(singles)
    result["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    result["precision"] = classifier.precision
    result["runs_as"] = classifier.runs_as
    if torch.cuda.is_available():
        result["peak_gpu_mb"] = torch.cuda.max_memory_allocated() / 2**20
    return result


def _measure_in_child(args):
    return measure(*args)


def find_checkpoints(given):
    if given:
        return given
    found = [REPO_ROOT / method / "output" / "best" for method in METHOD_MODULES if (REPO_ROOT / method / "output" / "best").is_dir()]
    if not found:
        raise UserError("no trained checkpoints found in */output/best: train one first, or name checkpoint folders as arguments")
    return found


def checkpoint_facts(checkpoint, cfg):
    from weibo_senti.checkpoint import LOG_FILE, find_checkpoint, read_info

    checkpoint = find_checkpoint(checkpoint)
    info = read_info(checkpoint)
    weights = sum(f.stat().st_size for f in checkpoint.glob("*.safetensors"))
    # beside best/ in a training run's output; inside the folder for the classifiers shipped in models/classifiers/
    log_path = next((folder / LOG_FILE for folder in (checkpoint.parent, checkpoint) if (folder / LOG_FILE).is_file()), None)
    log = json.loads(log_path.read_text(encoding="utf-8")) if log_path else []
    run = info.get("run", {})
    parameters = info.get("parameters") if isinstance(info.get("parameters"), dict) else {}
    warning = None
    if (run.get("seed"), run.get("val_fraction")) != (str(cfg.seed), str(cfg.val_fraction)):
        warning = f"{checkpoint} was trained with seed {run.get('seed')} and validation fraction {run.get('val_fraction')}: it may have trained on some of these validation texts"
    # what tells the rows apart: the folder's name (with its parent's for a run's best/ or last/), and the method
    name = f"{checkpoint.parent.name}/{checkpoint.name}" if checkpoint.name in ("best", "last") else checkpoint.name
    return {
        "checkpoint": str(checkpoint),
        "name": name if name == info["method"] else f"{name} ({info['method']})",
        "method": info["method"],
        "base_model": info["base_model"],
        "trainable": parameters.get("trainable"),
        "trainable_percent": 100 * parameters["trainable"] / parameters["total"] if {"trainable", "total"} <= parameters.keys() else None,
        "weights_bytes": weights,
        "seconds_per_epoch": statistics.mean(e["train_seconds"] for e in log) if log else None,
        "epochs": len(log),
        "warning": warning,
    }


HUMAN_SET = "weibo2018 held-out"  # the name of the human-labelled posts in the report


def load_text_sets(cfg):
    from weibo_senti.calibration import calibration_halves
    from weibo_senti.data import EMOTICON_TAG, load_labelled_csv, split_train_val, strip_emoticons

    extras = [Path(e.strip()) for e in cfg.extra.split(",") if e.strip()]
    names = [path.name for path in extras]
    repeated = next((name for name in names if names.count(name) > 1), None)
    if repeated:
        raise UserError(f"--extra: two files named {repeated}; the report names each set by its file name, so rename one")
    extra_sets = {}  # read first: a file of one's own is the likeliest to be refused, before 75,000 rows are read
    for path in extras:
        extra_table, extra_report = load_labelled_csv(path, hint=None)
        print(extra_report)
        texts, labels = extra_table["review"].tolist(), extra_table["label"].to_numpy()
        extra_sets[path.name] = {"texts": texts, "labels": labels}
        if any(EMOTICON_TAG.search(text) for text in texts):  # crawled text comes without them: that score is the one to read
            extra_sets[f"{path.name}, no tags"] = {"texts": [strip_emoticons(text) for text in texts], "labels": labels}
    sets = {}
    if cfg.human_data.lower() != "none":
        from weibo_senti.data import HUMAN_SPLIT_SEED, split_human

        path = Path(cfg.human_data)
        human, human_report = load_labelled_csv(path if path.is_absolute() or "human_data" in cfg.given else REPO_ROOT / path)
        print(human_report)
        _, held_out = calibration_halves(split_human(human)[1], HUMAN_SPLIT_SEED)
        texts, labels = held_out["review"].tolist(), held_out["label"].to_numpy()
        sets[HUMAN_SET] = {"texts": texts, "labels": labels}
        sets[f"{HUMAN_SET}, no tags"] = {"texts": [strip_emoticons(text) for text in texts], "labels": labels}
    table, report = load_labelled_csv(cfg.data)
    print(report)
    _, val = split_train_val(table, cfg.val_fraction, cfg.seed, cfg.max_samples)
    # the calibration error is reported on the half of the validation texts that train.py did not fit temperatures on
    held_out = val.index.isin(calibration_halves(val, cfg.seed)[1].index)
    sets |= {
        "val": {"texts": val["review"].tolist(), "labels": val["label"].to_numpy(), "held_out": held_out},
        "val_no_emoticons": {"texts": val["review"].map(strip_emoticons).tolist(), "labels": val["label"].to_numpy(), "held_out": held_out},
    }
    return sets | extra_sets


def _fmt(value, pattern):
    return "n/a" if value is None else format(value, pattern)


def _on_cpu(machine):
    return f" on {machine['name']}, {machine['cores']} cores ({', '.join(machine['flags']) or 'no AVX2'})" if machine else ""


def write_markdown(rows, text_sets, cfg, command, path):
    extras = [name for name in text_sets if name not in ("val", "val_no_emoticons")]
    lines = [
        "# Comparison of the trained checkpoints",
        "",
        f"Command: `{command}`",
        "",
        f"Validation: {len(text_sets['val']['texts']):,} rows of `{cfg.data.name}` (seed {cfg.seed}, fraction {cfg.val_fraction}), "
        "the same split as `train.py`. *No emoticons*: the same texts with every `[...]` tag removed; the labels of "
        "weibo_senti_100k were derived from those tags, so this column shows what a model learned beyond them.",
        "",
        (f"{HUMAN_SET}: the 750 of weibo2018's 1,500 fixed validation posts (labelled by people) on which train.py neither chose "
         "the epoch nor fitted the calibration, as they are and without tags; they lead the table, since people's reading "
         "is what counts." if HUMAN_SET in text_sets else ""),
        "",
        "| classifier | base model | trainable params | checkpoint | "
        + "".join(f"acc {name} | " for name in extras)
        + "acc | macro-F1 | acc, no emoticons | macro-F1, no emoticons | train s/epoch | batched texts/s | ms per single text | peak RSS MB |",
        "|" + "---|" * (12 + len(extras)),
    ]
    for row in rows:
        scores = row["scores"]
        lines.append(
            f"| {row['name']} | {row['base_model']} | {_fmt(row['trainable'], ',')} ({_fmt(row['trainable_percent'], '.2f')}%) | "
            f"{row['weights_bytes'] / 2**20:.2f} MB | "
            + "".join(f"{scores[name]['accuracy']:.4f} | " for name in extras)
            + f"{scores['val']['accuracy']:.4f} | {scores['val']['macro_f1']:.4f} | "
            f"{scores['val_no_emoticons']['accuracy']:.4f} | {scores['val_no_emoticons']['macro_f1']:.4f} | "
            f"{_fmt(row['seconds_per_epoch'], '.0f')} | {row['batched_texts_per_second']:.0f} | "
            f"{row['ms_per_single_text']:.1f} | {row['peak_rss_mb']:.0f} |"
        )
    lines += [
        "",
        "Per class (precision / recall), the confusion matrix `[[true neg -> neg, neg -> pos], [pos -> neg, pos -> pos]]`, and the "
        "expected calibration error (the mean gap between confidence and accuracy over 10 bins; of the validation texts, on the half "
        "that train.py does not fit the confidence temperature on; of an `--extra` set, on all of it):",
        "",
        "| classifier | base model | texts | negative P / R | positive P / R | confusion matrix | calibration error |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        for name in text_sets:
            detail = row["scores"][name]
            classes = detail["per_class"]
            texts = {"val": "as they are", "val_no_emoticons": "no emoticons"}.get(name, name)
            lines.append(
                f"| {row['name']} | {row['base_model']} | {texts} | "
                f"{classes['negative']['precision']:.4f} / {classes['negative']['recall']:.4f} | "
                f"{classes['positive']['precision']:.4f} / {classes['positive']['recall']:.4f} | {detail['confusion_matrix']} | "
                f"{_fmt(detail.get('calibration_error'), '.4f')} |"
            )
    warnings = [row["warning"] for row in rows if row["warning"]]
    lines += [""] + [f"- warning: {w}" for w in warnings]
    lines += [
        "",
        "Checkpoint: the trained weights only (`*.safetensors`). Train s/epoch: mean over the epochs in `training_log.json`. "
        f"Prediction ran in {', '.join(sorted({row.get('runs_as', 'PyTorch ' + ('fp32' if row['precision'] == 'no' else row['precision'])) for row in rows}))}"
        f"{_on_cpu(rows[0].get('cpu'))}. Batched: the whole validation set in length-sorted batches of {cfg.batch_size}. Single: median of {cfg.single_texts} "
        "one-text calls. Peak RSS: the measuring process, Python and libraries included.",
    ]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


def write_chart(rows, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [row["name"] for row in rows]
    figure, axes = plt.subplots(1, 3, figsize=(14, 4.8))
    width = 0.2
    for offset, (key, label) in enumerate([("val", "plain"), ("val_no_emoticons", "no emoticons")]):
        for shift, metric in enumerate(("accuracy", "macro_f1")):
            position = [i + (2 * offset + shift - 1.5) * width for i in range(len(rows))]
            axes[0].bar(position, [row["scores"][key][metric] for row in rows], width, label=f"{metric} ({label})")
    axes[0].set_title("validation scores")
    axes[0].set_ylim(0.4, 1.0)
    axes[0].legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.1), ncol=2)
    axes[1].bar(names, [row["weights_bytes"] / 2**20 for row in rows])
    axes[1].set_title("checkpoint size (MB)")
    axes[2].bar(names, [row["batched_texts_per_second"] for row in rows])
    axes[2].set_title("batched prediction (texts/s)")
    axes[0].set_xticks(range(len(rows)), names)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def main(argv=None):
    from tqdm.auto import tqdm

    cfg = cli.parse_config(globals(), argv, positional=("checkpoints", "checkpoint folders (default: every */output/best)"))
    from weibo_senti.checkpoint import read_info
    from weibo_senti.predict import runtime_options
    from weibo_senti.training import SETTING_RANGES

    cli.check_ranges(cfg, {**SETTING_RANGES, "single_texts": (lambda v: v >= 1, "an integer >= 1")})
    runtime_options(cfg)  # an unknown --backend is refused before 75,000 rows are read
    checkpoints = find_checkpoints(cfg.checkpoints)
    for checkpoint in checkpoints:  # a damaged one is named before any work
        read_info(checkpoint)
    text_sets = load_text_sets(cfg)
    from bench.inference import cpu

    machine, rows = cpu(), []
    context = multiprocessing.get_context("spawn")
    for checkpoint in tqdm(checkpoints, desc="evaluating checkpoints"):
        row = {**checkpoint_facts(checkpoint, cfg), "cpu": machine}
        with context.Pool(1) as pool:
            row.update(pool.apply(_measure_in_child, ((checkpoint, text_sets, cfg.batch_size, cfg.single_texts, runtime_options(cfg)),)))
        rows.append(row)
        if row["warning"]:
            print(f"warning: {row['warning']}", file=sys.stderr)
    results_dir = cfg.results_dir
    results_dir.mkdir(parents=True, exist_ok=True)
    command = "python compare.py " + " ".join(argv if argv is not None else sys.argv[1:])
    write_markdown(rows, text_sets, cfg, command.strip(), results_dir / "comparison.md")
    write_chart(rows, results_dir / "comparison.png")
    (results_dir / "comparison.json").write_text(json.dumps(rows, ensure_ascii=False, indent=2), encoding="utf-8")
    print((results_dir / "comparison.md").read_text(encoding="utf-8"))
    return rows


if __name__ == "__main__":
    cli.main(main)
