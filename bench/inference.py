"""Prediction speed and fidelity of every path on the CPU it runs on, in one run: each classifier through PyTorch fp32,
PyTorch bf16 (where the CPU computes it natively), ONNX Runtime fp32 and int8, and what --backend auto picks; with
CTranslate2 int8 on the merged LoRA classifier as the outside reference (pip install ctranslate2; skipped without it).
Where PyTorch sees a GPU, it measures PyTorch fp32 and bf16 there instead (CUDA_VISIBLE_DEVICES="" measures that
machine's CPU).

python bench/inference.py                     # the shipped classifiers, 1,000 validation texts after the export's 1,000
python bench/inference.py --checkpoint models/classifiers/bert_lora --checkpoint bert_lora/output/best --texts 500

Speed: texts/s over the validation texts without tags (what crawlers send), length-sorted batches of BATCH_SIZE, after a
warm-up, with the machine otherwise idle. Fidelity: against PyTorch fp32 on the same texts with and without tags, the
share of identical labels and the largest change of P(positive). results/inference.json keeps one entry per CPU kind
(a rerun on the same kind replaces it); results/inference.md shows them all.
"""
import json
import os
import platform
import re
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from weibo_senti import cli, repo_relative  # noqa: E402
from weibo_senti.checkpoint import write_json_atomic  # noqa: E402

CHECKPOINT = []  # classifiers to measure, repeatable (none: every folder under models/classifiers/)
DATA = Path(os.environ.get("WEIBO_SENTI_DATA", "dataset/weibo_senti_100k.csv"))  # label,review CSV; its validation split is used
TEXTS = 1000  # validation texts measured: those after the ones the ONNX export fits and checks int8 on
BATCH_SIZE = 64  # texts per model call
CTRANSLATE2 = "models/classifiers/bert_lora"  # the LoRA classifier CTranslate2 runs merged, in int8 ("" = skip)
OUT = Path("results/inference")  # .json (one entry per CPU kind) and .md


def cpu():
    """The CPU's name, the flags that decide these paths' speed (as the kernels see them: CPUID), and its kind, which keys the results."""
    from weibo_senti.models import cpu_flags, cpu_kind

    text = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace") if Path("/proc/cpuinfo").is_file() else ""
    name = re.search(r"^model name\s*:\s*(.*)$", text, re.M)
    return {"kind": cpu_kind(), "name": name.group(1).strip() if name else platform.processor(), "flags": cpu_flags(), "cores": os.cpu_count()}


def timed(classifier, texts, batch_size):
    classifier.probabilities(texts[:batch_size], batch_size)  # warm-up
    started = time.perf_counter()
    probabilities = classifier.probabilities(texts, batch_size)
    return probabilities, len(texts) / (time.perf_counter() - started)


def compared(reference, probabilities, labels):
    """Accuracy, and against the reference (PyTorch fp32's probabilities, None for that path itself) its fidelity."""
    from weibo_senti.onnx_backend import fidelity

    return {**(fidelity(reference, probabilities) if reference is not None else {}), "accuracy": float((probabilities.argmax(axis=1) == labels).mean())}


def measure_path(checkpoint, backend, precision, text_sets, labels, reference, batch_size):
    from weibo_senti.predict import Classifier

    classifier = Classifier.load(checkpoint, backend=backend, mixed_precision=precision)
    row = {"path": classifier.runs_as, "backend": classifier.backend, "why": classifier.backend_reason}
    plain, row["texts_per_second"] = timed(classifier, text_sets["without_tags"], batch_size)
    tagged = classifier.probabilities(text_sets["with_tags"], batch_size)
    row["without_tags"] = compared(reference and reference["without_tags"], plain, labels)
    row["with_tags"] = compared(reference and reference["with_tags"], tagged, labels)
    return row, {"without_tags": plain, "with_tags": tagged}


def measure_ctranslate2(checkpoint, text_sets, labels, reference, batch_size, workdir):
    """The merged LoRA classifier converted by CTranslate2 (int8 weights and activations), its pooled output through the
    classifier's own head; BERT-family bases only."""
    try:
        import ctranslate2
        from ctranslate2.converters import TransformersConverter
    except ImportError:
        return {"path": "CTranslate2 int8", "skipped": "ctranslate2 is not installed (pip install ctranslate2)"}
    import torch

    from weibo_senti.calibration import apply_calibration
    from weibo_senti.predict import Classifier

    classifier = Classifier.load(checkpoint, backend="torch", mixed_precision="no")
    merged, converted = workdir / "merged", workdir / "ctranslate2-int8"
    classifier.model.save_pretrained(merged)
    classifier.tokenizer.save_pretrained(merged)
    config = json.loads((merged / "config.json").read_text(encoding="utf-8"))
    config.setdefault("position_embedding_type", "absolute")  # CTranslate2 reads it; transformers 5 no longer writes it
    (merged / "config.json").write_text(json.dumps(config), encoding="utf-8")
    TransformersConverter(str(merged)).convert(str(converted), quantization="int8", force=True)
    encoder = ctranslate2.Encoder(str(converted), device="cpu", compute_type="int8", intra_threads=torch.get_num_threads())
    head = classifier.model.classifier
    weight, bias = head.weight.detach().numpy(), head.bias.detach().numpy()

    def probabilities(texts):
        order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
        result = np.zeros((len(texts), 2), dtype=np.float32)
        for start in range(0, len(order), batch_size):
            chunk = order[start:start + batch_size]
            ids = classifier.tokenizer([texts[i] for i in chunk], truncation=True, max_length=classifier.max_length)["input_ids"]
            logits = np.asarray(encoder.forward_batch(ids).pooler_output) @ weight.T + bias
            exp = np.exp(logits - logits.max(axis=1, keepdims=True))
            result[chunk] = exp / exp.sum(axis=1, keepdims=True)
        return apply_calibration(result, classifier.temperature, classifier.bias)  # as Classifier does

    plain_texts = text_sets["without_tags"]
    probabilities(plain_texts[:batch_size])
    started = time.perf_counter()
    plain = probabilities(plain_texts)
    row = {"path": "CTranslate2 int8", "texts_per_second": len(plain_texts) / (time.perf_counter() - started)}
    row["without_tags"] = compared(reference["without_tags"], plain, labels)
    row["with_tags"] = compared(reference["with_tags"], probabilities(text_sets["with_tags"]), labels)
    return row


def main():
    import tempfile

    import torch

    from weibo_senti.data import load_labelled_csv, split_train_val, strip_emoticons
    from weibo_senti.models import resolve_mixed_precision
    from weibo_senti.onnx_backend import CHECK_TEXTS, EXPORT_FORMAT, PROBE_TEXTS
    from weibo_senti.predict import SHIPPED_CLASSIFIERS, prediction_device

    cfg = cli.parse_config(globals())
    checkpoints = [Path(path) for path in cfg.checkpoint] or sorted(path for path in SHIPPED_CLASSIFIERS.iterdir() if path.is_dir())
    _, val = split_train_val(load_labelled_csv(cfg.data)[0], 0.1, 42)
    val = val[PROBE_TEXTS + CHECK_TEXTS:][: cfg.texts]
    text_sets = {"without_tags": [strip_emoticons(text) for text in val["review"]], "with_tags": list(val["review"])}
    labels = val["label"].to_numpy()
    machine = {**cpu(), "torch_threads": torch.get_num_threads(), "torch": torch.__version__}
    print(f"CPU: {machine['name']} ({machine['kind']}: {', '.join(machine['flags'])}), {machine['cores']} cores", file=sys.stderr)
    device = prediction_device("torch")
    paths = [("torch", "no"), *([("torch", "bf16")] if resolve_mixed_precision("auto", device.type)[0] == "bf16" else [])]
    if device.type == "cuda":
        machine.update(kind="gpu", gpu=torch.cuda.get_device_name())
        print(f"GPU: {machine['gpu']}: PyTorch's paths there; the CPU's with CUDA_VISIBLE_DEVICES=\"\"", file=sys.stderr)
    else:
        paths += [("onnx", "no"), ("onnx-int8", "no")]
    results = []
    with tempfile.TemporaryDirectory() as workdir:
        for checkpoint in checkpoints:
            rows, reference = [], None
            for backend, precision in paths:
                row, probabilities = measure_path(checkpoint, backend, precision, text_sets, labels, reference, cfg.batch_size)
                reference = reference or probabilities  # the first path is PyTorch fp32
                rows.append(row)
                print(f"{repo_relative(checkpoint)}: {row['path']}: {row['texts_per_second']:.1f} texts/s", file=sys.stderr)
            from weibo_senti.predict import Classifier

            auto = Classifier.load(checkpoint, backend="auto", mixed_precision="auto")
            entry = {"checkpoint": repo_relative(checkpoint), "paths": rows, "auto": {"path": auto.runs_as, "why": auto.backend_reason}}
            if cfg.ctranslate2 and Path(cfg.ctranslate2).resolve() == checkpoint.resolve() and "gpu" not in machine:
                entry["paths"].append(measure_ctranslate2(checkpoint, text_sets, labels, reference, cfg.batch_size, Path(workdir)))
            results.append(entry)
    out = cfg.out.with_suffix(".json")
    runs = json.loads(out.read_text(encoding="utf-8")) if out.is_file() else {}
    runs[machine["kind"]] = {"machine": machine, "texts": len(labels), "batch_size": cfg.batch_size, "onnx_export_format": EXPORT_FORMAT,
                             "command": "python bench/inference.py " + " ".join(sys.argv[1:]), "classifiers": results}
    write_json_atomic(out, runs)
    cfg.out.with_suffix(".md").write_text(markdown(runs), encoding="utf-8")
    print(markdown(runs))


def markdown(runs):
    from weibo_senti.onnx_backend import EXPORT_FORMAT

    lines = ["# Prediction paths, per CPU kind", "", "Written by `bench/inference.py`; ratios against PyTorch fp32 on the same CPU (or GPU), in the same run.", ""]
    for kind, run in runs.items():
        machine = run["machine"]
        lines += [
            f"## {kind}: {machine['gpu'] + ', with ' if 'gpu' in machine else ''}{machine['name']}, {machine['cores']} cores ({', '.join(machine['flags'])})", "",
            f"`{run['command'].strip()}`: {run['texts']} validation texts, batches of {run['batch_size']}, torch {machine['torch']} on {machine['torch_threads']} threads.", "",
            *([] if run.get("onnx_export_format", 1) >= EXPORT_FORMAT else [
                "Measured with the first int8 export (plain dynamic quantization: no outlier channels, 8-bit weights, no second "
                "look), on the first 1,000 validation texts.", ""]),
            "| classifier | path | texts/s | × PyTorch fp32 | identical labels, without / with tags | largest change of P(positive) | accuracy without tags |",
            "|---|---|---|---|---|---|---|",
        ]
        for entry in run["classifiers"]:
            base = entry["paths"][0]["texts_per_second"]
            for row in entry["paths"]:
                if "skipped" in row:
                    lines.append(f"| {entry['checkpoint']} | {row['path']} | skipped: {row['skipped']} | | | | |")
                    continue
                plain, tagged = row["without_tags"], row["with_tags"]
                measured = "identical_labels" in plain
                same = f"{plain['identical_labels']:.1%} / {tagged['identical_labels']:.1%}" if measured else "(the reference)"
                change = f"{max(plain['max_change_prob_positive'], tagged['max_change_prob_positive']):.3f}" if measured else ""
                lines.append(f"| {entry['checkpoint']} | {row['path']} | {row['texts_per_second']:.1f} | {row['texts_per_second'] / base:.2f} | {same} | {change} | "
                             f"{plain['accuracy']:.4f} |")
            lines.append(f"| {entry['checkpoint']} | **auto picks:** {entry['auto']['path']} | | | | | |")
        lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    cli.main(main)
