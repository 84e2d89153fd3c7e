"""Issue 46: one direction of dependence. How a checkpoint folder becomes probabilities reads bottom up: checkpoint I/O,
calibration as functions of probabilities and labels, the backends, then Classifier; fitting a checkpoint's calibration
and writing its card live above Classifier (training.py, card.py)."""
import ast
import subprocess
import sys

import pytest

from weibo_senti import REPO_ROOT

PACKAGE = REPO_ROOT / "weibo_senti"


def imports_within_the_package():
    graph = {}
    for path in PACKAGE.glob("*.py"):
        found = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):  # function-level imports count too
            if isinstance(node, ast.ImportFrom) and node.level == 1:
                found |= {node.module.split(".")[0]} if node.module else {alias.name for alias in node.names}
        graph[path.stem] = found - {path.stem}
    return graph


def test_the_package_has_no_import_circle():
    graph = imports_within_the_package()

    def reaches(start, target, seen=()):
        return any(step == target or (step not in seen and reaches(step, target, (*seen, step))) for step in graph.get(start, ()))

    circles = sorted(module for module in graph if reaches(module, module))
    assert not circles, f"modules on an import circle: {circles}"


@pytest.mark.parametrize("layer, above", [
    ("checkpoint", ["calibration", "card", "onnx_backend", "predict", "training"]),
    ("calibration", ["checkpoint", "card", "onnx_backend", "predict", "training"]),
    ("onnx_backend", ["predict", "card", "training"]),
    ("predict", ["card", "training", "serving", "scoring"]),
])
def test_each_layer_imports_without_what_lies_above_it(layer, above):
    loaded = subprocess.run([sys.executable, "-c", f"import sys, weibo_senti.{layer}; print(' '.join(sys.modules))"],
                            capture_output=True, text=True, cwd=REPO_ROOT, timeout=120)
    assert loaded.returncode == 0, loaded.stderr
    assert not [name for name in above if f"weibo_senti.{name}" in loaded.stdout.split()]


@pytest.mark.parametrize("method", ["adapter_tuning", "bert_lora"])
def test_loading_a_classifier_imports_nothing_of_training(trained, method):
    """The model knows nothing of training: a checkpoint becomes a Classifier without training.py, its card or LP-FT."""
    code = ("import sys; from weibo_senti.predict import Classifier; "
            f"Classifier.load({str(trained(method)[0] / 'best')!r}, backend='torch'); print(' '.join(sys.modules))")
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO_ROOT, timeout=300)
    assert loaded.returncode == 0, loaded.stderr
    assert not [name for name in ("training", "card", "lpft") if f"weibo_senti.{name}" in loaded.stdout.split()]
