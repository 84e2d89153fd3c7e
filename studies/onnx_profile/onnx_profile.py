"""Where ONNX Runtime spends its time on a classifier, fp32 against int8: the share of each operator, from ONNX
Runtime's own profiler, on the CPU it runs on. It explains an int8 speed-up short of its target.

python studies/onnx_profile/onnx_profile.py                     # the shipped default, 500 validation texts without tags
python studies/onnx_profile/onnx_profile.py --checkpoint models/classifiers/bert_lora

Writes studies/onnx_profile/results.{json,md}, one entry per CPU kind and checkpoint (a rerun replaces it).
"""
import json
import os
import sys
import tempfile
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from weibo_senti import cli, repo_relative  # noqa: E402
from weibo_senti.checkpoint import write_json_atomic  # noqa: E402

CHECKPOINT = Path("models/classifiers/adapter_tuning")  # a trained checkpoint folder
DATA = Path(os.environ.get("WEIBO_SENTI_DATA", "dataset/weibo_senti_100k.csv"))  # label,review CSV; its validation split is used
TEXTS = 500  # validation texts (the first of train.py's split), tags removed
SHOWN = 8  # operators listed by name, the rest summed
OUT = Path("studies/onnx_profile/results")  # .json and .md


def operator_seconds(session_path, classifier, texts, workdir):
    """{operator type: seconds} over `texts` through the ONNX model at session_path, after a warm-up batch."""
    from weibo_senti.onnx_backend import OnnxModel

    classifier.probabilities_with(OnnxModel(session_path), texts[:64], precision="no")
    model = OnnxModel(session_path, profile_prefix=Path(workdir) / Path(session_path).stem)
    classifier.probabilities_with(model, texts, precision="no")
    trace = json.loads(Path(model.session.end_profiling()).read_text(encoding="utf-8"))
    seconds = Counter()
    for event in trace:
        if event.get("cat") == "Node" and event.get("name", "").endswith("_kernel_time"):
            seconds[event["args"]["op_name"]] += event["dur"] / 1e6
    return seconds


def main():
    from bench.inference import cpu
    from weibo_senti.data import load_labelled_csv, split_train_val, strip_emoticons
    from weibo_senti.onnx_backend import FP32_FILE, INT8_FILE, ensure_exported
    from weibo_senti.predict import Classifier

    cfg = cli.parse_config(globals())
    _, val = split_train_val(load_labelled_csv(cfg.data)[0], 0.1, 42)
    texts = [strip_emoticons(text) for text in val["review"][: cfg.texts]]
    classifier = Classifier.load(cfg.checkpoint, mixed_precision="no")
    folder, _ = ensure_exported(classifier, cfg.checkpoint)
    with tempfile.TemporaryDirectory() as workdir:
        profiles = {name: operator_seconds(folder / file, classifier, texts, workdir) for name, file in (("fp32", FP32_FILE), ("int8", INT8_FILE))}
    machine = cpu()
    out = cfg.out.with_suffix(".json")
    runs = json.loads(out.read_text(encoding="utf-8")) if out.is_file() else {}
    runs[f"{machine['kind']} {repo_relative(cfg.checkpoint)}"] = {
        "command": "python studies/onnx_profile/onnx_profile.py " + " ".join(sys.argv[1:]), "machine": machine, "checkpoint": repo_relative(cfg.checkpoint),
        "texts": len(texts), "operator_seconds": {name: dict(seconds.most_common()) for name, seconds in profiles.items()},
    }
    write_json_atomic(out, runs)
    cfg.out.with_suffix(".md").write_text(markdown(runs, cfg.shown), encoding="utf-8")
    print(markdown(runs, cfg.shown))


def markdown(runs, shown):
    lines = ["# Where ONNX Runtime spends its time", "", "Written by `studies/onnx_profile/onnx_profile.py`: seconds in each operator (ONNX Runtime's profiler), fp32 and int8.", ""]
    for key, run in runs.items():
        fp32, int8 = (Counter(run["operator_seconds"][name]) for name in ("fp32", "int8"))
        machine = run["machine"]
        lines += [f"## {key}", "", f"`{run['command'].strip()}` on {machine['name']}, {machine['cores']} cores ({', '.join(machine['flags'])}); "
                  f"{run['texts']} validation texts without tags.", "", "| operator | fp32 s | share | int8 s | share |", "|---|---:|---:|---:|---:|"]
        named = [name for name, _ in (fp32 + int8).most_common(shown)]
        rest = {name: sum(seconds for op, seconds in profile.items() if op not in named) for name, profile in (("fp32", fp32), ("int8", int8))}
        for name, a, b in [*((op, fp32[op], int8[op]) for op in named), ("(the rest)", rest["fp32"], rest["int8"])]:
            lines.append(f"| {name} | {a:.2f} | {a / sum(fp32.values()):.0%} | {b:.2f} | {b / sum(int8.values()):.0%} |")
        lines += [f"| **all** | {sum(fp32.values()):.2f} | | {sum(int8.values()):.2f} | |", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    cli.main(main)
