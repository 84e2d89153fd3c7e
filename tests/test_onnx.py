"""The ONNX Runtime backends against PyTorch on the tiny trained checkpoints, the export cache, and `auto`'s choice."""
import json
import math
import shutil

import numpy as np
import pytest

from conftest import read_only, run_script
from weibo_senti import REPO_ROOT, UserError, onnx_backend
from weibo_senti.predict import Classifier

# lengths from 1 to 60 characters, so that every batch pads some texts
TEXTS = ["好", "今天好开心[哈哈]", "讨厌难过[泪]", "天气" * 30, "我们去吃饭了，工作好累烦", "[怒]", "北京上海朋友电影"] * 5


@pytest.fixture(scope="module")
def checkpoints(trained, tmp_path_factory):
    """Copies of the tiny checkpoints without the exports earlier tests made of them (compare.py's and serve.py's auto),
    so that the first export happens here."""
    root = tmp_path_factory.mktemp("onnx")
    return {method: shutil.copytree(trained(method)[0] / "best", root / method, ignore=shutil.ignore_patterns("onnx"))
            for method in ("adapter_tuning", "lora", "bert_lora")}


@pytest.mark.parametrize("method", ["adapter_tuning", "lora", "bert_lora"])
def test_the_onnx_export_scores_as_pytorch_does(checkpoints, method, capsys):
    torch_fp32 = Classifier.load(checkpoints[method], mixed_precision="no").probabilities(TEXTS, batch_size=8)
    onnx_fp32 = Classifier.load(checkpoints[method], backend="onnx")
    assert onnx_fp32.runs_as == "ONNX Runtime fp32"
    assert "exporting" in capsys.readouterr().err
    np.testing.assert_allclose(onnx_fp32.probabilities(TEXTS, batch_size=8), torch_fp32, atol=1e-5)

    int8 = Classifier.load(checkpoints[method], backend="onnx-int8")
    assert int8.runs_as == "ONNX Runtime int8" and "exporting" not in capsys.readouterr().err  # exported once
    probabilities = int8.probabilities(TEXTS, batch_size=8)
    assert probabilities.shape == (len(TEXTS), 2) and np.allclose(probabilities.sum(axis=1), 1, atol=1e-5)

    folder = onnx_backend.cache_folder(checkpoints[method])
    assert folder.parent == checkpoints[method] / "onnx" and folder.name.startswith(method + "-")
    record = json.loads((folder / onnx_backend.RECORD_FILE).read_text(encoding="utf-8"))
    measured = record["measured"][onnx_backend.cpu_kind()]
    fidelity = measured["int8_fidelity"]
    assert fidelity["texts"] == onnx_backend.CHECK_TEXTS and 0 <= fidelity["identical_labels"] <= 1
    assert 0 <= fidelity["max_change_prob_positive"] <= 1
    assert all(measured["texts_per_second"][backend] > 0 for backend in ("torch", "onnx", "onnx-int8"))
    alone = record["int8"]["without_recheck_on_probe_texts"]
    assert alone["texts"] == onnx_backend.PROBE_TEXTS
    assert record["int8"]["recheck_margin"] == pytest.approx(min(0.5, onnx_backend.RECHECK_FACTOR * alone["max_change_prob_positive"]))

    # the second look: with a margin of 0.5 every text is scored again in fp32, with none int8 alone scores it
    int8.onnx.recheck_margin = 0.5
    np.testing.assert_allclose(int8.probabilities(TEXTS, batch_size=8), torch_fp32, atol=1e-5)
    int8.onnx.recheck_margin = 0.0
    alone = int8.probabilities(TEXTS, batch_size=8)
    np.testing.assert_allclose(alone, Classifier.probabilities_with(int8, onnx_backend.OnnxModel(folder / onnx_backend.INT8_FILE), TEXTS, 8))
    margin = record["int8"]["recheck_margin"]
    near = np.abs(alone[:, 1] - 0.5) < margin
    np.testing.assert_allclose(probabilities[near], torch_fp32[near], atol=1e-5)
    np.testing.assert_allclose(probabilities[~near], alone[~near], atol=1e-6)


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # the TorchScript exporter's, as in onnx_backend._export
@pytest.mark.parametrize("conv1d", [False, True], ids=["Linear", "GPT-2 Conv1D"])
def test_splitting_off_outlier_channels_keeps_the_layers_function_and_leaves_them_out_of_int8(conv1d, tmp_path):
    import onnx
    import torch
    from transformers.pytorch_utils import Conv1D

    torch.manual_seed(0)
    layer = Conv1D(6, 8) if conv1d else torch.nn.Linear(8, 6)
    torch.nn.init.normal_(layer.weight)
    torch.nn.init.normal_(layer.bias)
    x = torch.randn(3, 5, 8)
    x[..., 2] *= 40  # an outlier channel
    expected = layer(x)
    split = onnx_backend.OutlierChannelsSplit(layer, torch.tensor([2, 5]))
    torch.testing.assert_close(split(x), expected)

    path = tmp_path / "split.onnx"
    with torch.no_grad():
        torch.onnx.export(split, (x,), str(path), dynamo=False, opset_version=onnx_backend.OPSET, input_names=["x"])
    onnx_backend._quantize(path, tmp_path / "int8.onnx")
    nodes = onnx.load(str(tmp_path / "int8.onnx")).graph.node
    assert [node.op_type for node in nodes if "/outlier_channels/" in node.name] == ["MatMul"]  # fp32
    assert any(node.op_type == "MatMulInteger" for node in nodes)  # the rest in int8


def test_auto_takes_the_fastest_path_measured_at_export_and_int8_only_where_it_keeps_fp32s_labels():
    def record(agreement, **speeds):
        return lambda: {"int8_fidelity": {"identical_labels": agreement}, "texts_per_second": {"measured_on": "probe", **speeds}}

    assert onnx_backend.resolve_backend("auto", True, record(1.0, torch=1.0, onnx=9.0))[0] == "torch"  # PyTorch's native bf16
    assert onnx_backend.resolve_backend("auto", False, record(0.999, torch=30.0, onnx=35.0, **{"onnx-int8": 50.0}))[0] == "onnx-int8"
    backend, why = onnx_backend.resolve_backend("auto", False, record(0.98, torch=30.0, onnx=35.0, **{"onnx-int8": 50.0}))
    assert backend == "onnx" and "98.0%" in why and "99.5%" in why and "ONNX Runtime fp32 35" in why
    assert onnx_backend.resolve_backend("auto", False, record(0.98, torch=40.0, onnx=35.0, **{"onnx-int8": 50.0}))[0] == "torch"
    backend, why = onnx_backend.resolve_backend("auto", False, record(math.nan, torch=math.nan, onnx=math.nan, **{"onnx-int8": math.nan}))
    assert backend == "onnx" and "not checked (no data set)" in why
    assert onnx_backend.resolve_backend("onnx-int8", True, record(0.5)) == ("onnx-int8", "as asked")
    with pytest.raises(UserError, match="--backend fast: not one of auto, torch, onnx, onnx-int8"):
        onnx_backend.resolve_backend("fast", False, record(1.0))


def test_each_kind_of_cpu_measures_the_paths_for_itself_once(checkpoints, tmp_path, monkeypatch, capsys):
    # as where an export folder is shared by machines of several kinds (a Spark cluster, an image built on another CPU)
    copy = shutil.copytree(checkpoints["bert_lora"], tmp_path / "bert_lora", ignore=shutil.ignore_patterns("onnx"))
    record_file = onnx_backend.cache_folder(copy) / onnx_backend.RECORD_FILE

    def load_on(kind):
        monkeypatch.setattr(onnx_backend, "cpu_kind", lambda: kind)
        classifier = Classifier.load(copy, backend="auto", mixed_precision="no")
        return classifier, capsys.readouterr().err, json.loads(record_file.read_text(encoding="utf-8"))

    _, said, record = load_on("vnni")
    assert "exporting" in said and list(record["measured"]) == ["vnni"]
    classifier, said, record = load_on("avx2")
    assert "exporting" not in said and "measuring the ONNX paths" in said and "(avx2; once)" in said
    assert list(record["measured"]) == ["vnni", "avx2"] and record["measured"]["avx2"]["int8_fidelity"]["texts"] == onnx_backend.CHECK_TEXTS
    assert "measured on this kind of CPU" in classifier.backend_reason
    _, said, _ = load_on("avx2")
    assert "measuring" not in said  # kept

    # an export made before the measurements were kept per kind: its one measurement, of an unnamed CPU, is made again
    legacy = {key: value for key, value in record.items() if key != "measured"}
    record_file.write_text(json.dumps({**legacy, **record["measured"]["vnni"]}), encoding="utf-8")
    _, said, record = load_on("avx2")
    assert "measuring" in said and list(record["measured"]) == ["avx2"] and "int8_fidelity" not in record

    # a folder that cannot be written: measured for the process alone, and said so
    with read_only(record_file.parent):
        classifier, said, record = load_on("other")
        assert "not kept" in said and "other" not in record["measured"] and classifier.backend in onnx_backend.NAMES


def test_a_retrained_checkpoint_is_exported_anew_and_a_read_only_one_exports_elsewhere(checkpoints, tmp_path, monkeypatch):
    copy = shutil.copytree(checkpoints["lora"], tmp_path / "lora", ignore=shutil.ignore_patterns("onnx"))
    before = onnx_backend.cache_folder(copy)
    info = json.loads((copy / "checkpoint.json").read_text(encoding="utf-8"))
    (copy / "checkpoint.json").write_text(json.dumps({**info, "epoch": 99}), encoding="utf-8")
    assert onnx_backend.cache_folder(copy) != before

    monkeypatch.setenv(onnx_backend.CACHE_ENV_VAR, str(tmp_path / "cache"))
    with read_only(copy):
        classifier = Classifier.load(copy, backend="onnx")
        assert classifier.onnx.path.is_relative_to(tmp_path / "cache") and not (copy / "onnx").exists()


def test_predict_py_says_what_it_runs_as_and_warns_of_int8_below_the_bar(checkpoints):
    done = run_script(REPO_ROOT / "lora" / "predict.py", "--checkpoint", checkpoints["lora"], "--backend", "onnx-int8", "--text", "今天好开心")
    assert done.returncode == 0, done.stderr
    assert "runs as: ONNX Runtime int8 (as asked)" in done.stderr
    record = json.loads((onnx_backend.cache_folder(checkpoints["lora"]) / onnx_backend.RECORD_FILE).read_text(encoding="utf-8"))
    assert ("below the 99.5%" in done.stderr) == (record["measured"][onnx_backend.cpu_kind()]["int8_fidelity"]["identical_labels"] < 0.995)
    assert "置信度" in done.stdout


def test_adapters_sharing_a_base_run_pytorch(checkpoints):
    from weibo_senti.serving import load_models

    pair = [("a", checkpoints["bert_lora"]), ("b", checkpoints["bert_lora"])]
    served = load_models(pair, {"mixed_precision": "no", "backend": "auto"})
    assert served["a"].classifier.runs_as == "PyTorch fp32" and "share its base" in served["a"].classifier.backend_reason
    with pytest.raises(UserError, match="--backend onnx: a LoRA model kept unmerged, to share its base with other adapters, runs PyTorch"):
        load_models(pair, {"mixed_precision": "no", "backend": "onnx"})
