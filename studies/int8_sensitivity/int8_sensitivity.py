"""Where ONNX Runtime's dynamic int8 loses fp32's labels: each kind of weight matrix quantized alone, then all together,
then all after SmoothQuant's migration of activation outliers into the weights, then as --backend onnx-int8 runs it
(outlier channels split off in fp32, 7-bit weights, and the second look in fp32 at the near-even texts).

python studies/int8_sensitivity/int8_sensitivity.py                                   # the shipped default, 1,000 validation texts
python studies/int8_sensitivity/int8_sensitivity.py --checkpoint models/classifiers/bert_lora --texts 2000

A kind is a weight MatMul / Gemm of the exported graph named without its layer number (attention/self/query, intermediate/
dense, ...). For each, only the matrices of that kind are quantized (per-channel QInt8 weights, activations per tensor
at run time, as onnx_backend does for all of them), and the labels and P(positive) of the validation texts without tags
are compared with PyTorch fp32's. The texts without tags are the near-even ones where a small change flips a label.
SmoothQuant (Xiao et al., ICML 2023): each matrix's input channel j is divided by s_j = max|x_j|^a / max|W_j|^(1-a)
(x's peak over CALIBRATION_TEXTS training texts) and its weights multiplied by it, so the product is unchanged in fp32.
The texts are the validation texts after the 1,000 the ONNX export fits and checks int8 on. Writes
studies/int8_sensitivity/results.{json,md}.
"""
import copy
import logging
import os
import re
import sys
import tempfile
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from weibo_senti import cli, repo_relative  # noqa: E402
from weibo_senti.checkpoint import write_json_atomic  # noqa: E402

import torch  # noqa: E402

CHECKPOINT = Path("models/classifiers/adapter_tuning")  # a trained checkpoint folder
DATA = Path(os.environ.get("WEIBO_SENTI_DATA", "dataset/weibo_senti_100k.csv"))  # label,review CSV; its validation split is used
TEXTS = 1000  # validation texts (after the export's 1,000), tags removed
SMOOTH_ALPHAS = "0.5,0.75"  # SmoothQuant's migration strengths a to try ("" = none)
CALIBRATION_TEXTS = 256  # training texts, tags removed, whose activation peaks SmoothQuant divides by
OUT = Path("studies/int8_sensitivity/results")  # .json and .md


def weight_kinds(onnx_path):
    """{kind: [node names]} of the MatMul / Gemm nodes whose second input is a stored weight."""
    import onnx

    graph = onnx.load(str(onnx_path), load_external_data=False).graph
    weights = {initializer.name for initializer in graph.initializer}
    kinds = defaultdict(list)
    for node in graph.node:
        if node.op_type in ("MatMul", "Gemm") and node.input[1] in weights:
            kind = re.sub(r"^/model/|/(MatMul|Gemm)(_\d+)?$", "", re.sub(r"(layers?|h)\.\d+/", "", node.name))
            kinds[kind].append(node.name)
    return dict(kinds)


class _Smoothed(torch.nn.Module):
    def __init__(self, inner, inverse_scale):
        super().__init__()
        self.inner = inner
        self.register_buffer("inverse_scale", inverse_scale)

    def forward(self, x):
        return self.inner(x * self.inverse_scale)


def smoothed_copy(classifier, texts, alpha):
    """A copy of the classifier's model with SmoothQuant's scales at strength `alpha` on every Linear / Conv1D."""
    from weibo_senti.onnx_backend import input_peaks

    model = copy.deepcopy(classifier.model)
    for name, peak in input_peaks(classifier, model, texts).items():
        module = model.get_submodule(name)
        input_axis = 1 if isinstance(module, torch.nn.Linear) else 0  # Conv1D keeps its weight as [in, out]
        weight_peak = module.weight.data.abs().amax(1 - input_axis)
        scale = peak.clamp(min=1e-5) ** alpha / weight_peak.clamp(min=1e-5) ** (1 - alpha)
        module.weight.data *= scale[None, :] if input_axis == 1 else scale[:, None]
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, _Smoothed(module, 1 / scale))
    return model


def rechecked(row):
    return f"; {row['rechecked']:.1%} of the texts scored again" if "rechecked" in row else ""


def main():
    from onnxruntime.quantization import QuantType, quantize_dynamic

    from weibo_senti.data import load_labelled_csv, split_train_val, strip_emoticons
    from weibo_senti.onnx_backend import (CHECK_TEXTS, PROBE_TEXTS, OnnxModel, _export, _quantize, fidelity, outlier_split_copy,
                                          recheck_margin)
    from weibo_senti.predict import Classifier

    cfg = cli.parse_config(globals())
    train, val = split_train_val(load_labelled_csv(cfg.data)[0], 0.1, 42)
    texts = [strip_emoticons(text) for text in val["review"][PROBE_TEXTS + CHECK_TEXTS:][: cfg.texts]]
    probe = [strip_emoticons(text) for text in val["review"][:PROBE_TEXTS]]  # what the export fits the second look's margin on
    calibration = [strip_emoticons(text) for text in train["review"][: cfg.calibration_texts]]
    classifier = Classifier.load(cfg.checkpoint, mixed_precision="no")
    reference = classifier.probabilities_with(None, texts, precision="no")
    logging.getLogger().setLevel(logging.ERROR)  # the quantizer's advice to pre-process, which is for static quantization
    rows = []
    with tempfile.TemporaryDirectory() as workdir:
        fp32, int8 = Path(workdir) / "model.onnx", Path(workdir) / "int8.onnx"

        def measure(what, matrices, nodes=None, quantize=True, recheck=(None, 0.0)):
            if quantize:
                quantize_dynamic(str(fp32), str(int8), per_channel=True, weight_type=QuantType.QInt8,
                                 **({"nodes_to_quantize": nodes} if nodes else {}))
            probabilities = classifier.probabilities_with(OnnxModel(int8, recheck=recheck), texts, precision="no")
            changed = reference.argmax(axis=1) != probabilities.argmax(axis=1)
            rows.append({"quantized": what, "matrices": matrices, **fidelity(reference, probabilities),
                         "largest_fp32_confidence_of_a_changed_label": float(reference[changed].max()) if changed.any() else None})
            print(f"{what}: {rows[-1]['identical_labels']:.1%} identical labels", file=sys.stderr)
            return probabilities

        _export(classifier.model, classifier.tokenizer, fp32)
        kinds = weight_kinds(fp32)
        for kind, nodes in kinds.items():
            measure(kind, len(nodes), nodes)
        everything = sum(map(len, kinds.values()))
        measure("all of them (what --backend onnx-int8 ran before outlier channels)", everything)
        for alpha in [float(a) for a in cfg.smooth_alphas.split(",") if a.strip()]:
            _export(smoothed_copy(classifier, calibration, alpha), classifier.tokenizer, fp32)
            measure(f"all of them, after SmoothQuant at a = {alpha}", everything)
        _export(classifier.model, classifier.tokenizer, fp32)
        split_path = Path(workdir) / "split.onnx"
        split, channels = outlier_split_copy(classifier, calibration)
        _export(split, classifier.tokenizer, split_path)
        _quantize(split_path, int8, reduce_range=False)
        measure(f"all of them, {channels} outlier input channels split off in fp32", everything, quantize=False)
        _quantize(split_path, int8)
        alone = measure("the same with 7-bit weights (no saturation without VNNI)", everything, quantize=False)
        margin = recheck_margin(fidelity(classifier.probabilities_with(None, probe, precision="no"),
                                         classifier.probabilities_with(OnnxModel(int8), probe, precision="no")))
        measure(f"the same with the second look in fp32 within {margin:.3f} of 0.5 (what --backend onnx-int8 runs)", everything,
                quantize=False, recheck=(OnnxModel(fp32), margin))
        rows[-1]["rechecked"] = float((abs(alone[:, 1] - 0.5) < margin).mean())
    result = {"command": "python studies/int8_sensitivity/int8_sensitivity.py " + " ".join(sys.argv[1:]), "checkpoint": repo_relative(cfg.checkpoint),
              "texts": len(texts), "of": "validation texts without tags, against PyTorch fp32", "rows": rows}
    write_json_atomic(cfg.out.with_suffix(".json"), result)
    lines = [f"`{result['command'].strip()}` (checkpoint `{result['checkpoint']}`, {len(texts):,} validation texts without tags)", "",
             "| int8 on | matrices | identical labels | largest change of P(positive) | fp32's highest confidence on a changed label |",
             "|---|---:|---:|---:|---:|"]
    lines += [f"| {row['quantized']}{rechecked(row)} | {row['matrices']} | {row['identical_labels']:.1%} | {row['max_change_prob_positive']:.3f} | "
              f"{'' if row['largest_fp32_confidence_of_a_changed_label'] is None else format(row['largest_fp32_confidence_of_a_changed_label'], '.3f')} |"
              for row in rows]
    cfg.out.with_suffix(".md").write_text("\n".join(lines) + "\n", encoding="utf-8")
    print("\n".join(lines))


if __name__ == "__main__":
    cli.main(main)
