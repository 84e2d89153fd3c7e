import shutil

import pytest
import torch

from weibo_senti import models
from weibo_senti.models import ModelNotFound, resolve_model


def test_a_save_pretrained_folder_is_used_as_is(tiny_models):
    assert resolve_model(str(tiny_models["gpt2"])) == tiny_models["gpt2"]


def test_a_hub_id_uses_its_copy_under_models(tiny_models, tmp_path, monkeypatch):
    monkeypatch.setattr(models, "MODELS_DIR", tmp_path)
    shutil.copytree(tiny_models["gpt2"], tmp_path / "gpt2-chinese-cluecorpussmall")
    assert resolve_model("uer/gpt2-chinese-cluecorpussmall") == tmp_path / "gpt2-chinese-cluecorpussmall"


def test_offline_without_a_copy_says_what_was_tried_and_how_to_provide_it(tmp_path, monkeypatch):
    monkeypatch.setattr(models, "MODELS_DIR", tmp_path)
    with pytest.raises(ModelNotFound) as error:
        resolve_model("uer/gpt2-chinese-cluecorpussmall")
    message = str(error.value)
    assert "the folder uer/gpt2-chinese-cluecorpussmall: does not exist" in message
    assert f"the folder {tmp_path / 'gpt2-chinese-cluecorpussmall'}: does not exist" in message
    assert "downloading 'uer/gpt2-chinese-cluecorpussmall' from the Hugging Face hub" in message
    assert "--model PATH for train.py" in message and "save_pretrained" in message
    assert not list(tmp_path.iterdir())  # no half-downloaded folder


def test_a_missing_local_path_is_not_sent_to_the_hub(tmp_path):
    with pytest.raises(ModelNotFound, match="does not exist") as error:
        resolve_model(str(tmp_path / "gpt2"))
    assert "hub" not in str(error.value).split("To provide it")[0]


def test_a_hub_id_is_downloaded_once_and_saved_under_models(tiny_models, tmp_path, monkeypatch):
    """The hub code path, served from a local hub cache laid out as huggingface_hub keeps it."""
    snapshot = tmp_path / "hub" / "models--someone--tiny-gpt2" / "snapshots" / ("0" * 40)
    shutil.copytree(tiny_models["gpt2"], snapshot)
    (snapshot.parents[1] / "refs").mkdir()
    (snapshot.parents[1] / "refs" / "main").write_text("0" * 40)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(models, "MODELS_DIR", tmp_path / "models")
    local = resolve_model("someone/tiny-gpt2")
    assert local == tmp_path / "models" / "tiny-gpt2"
    assert {"config.json", "model.safetensors", "tokenizer_config.json"} <= {p.name for p in local.iterdir()}
    assert models.load_tokenizer(local).pad_token == "[PAD]"


def test_an_unreachable_hub_model_falls_back_to_the_embedded_mini_model(tiny_models, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(models, "MODELS_DIR", tmp_path)
    mini = shutil.copytree(tiny_models["gpt2"], tmp_path / "gpt2-chinese-mini")
    assert resolve_model("uer/gpt2-chinese-cluecorpussmall", fallback=mini) == mini
    assert "Using the embedded mini model" in capsys.readouterr().err
    with pytest.raises(ModelNotFound):  # a mistyped local path is an error, not a reason to fall back
        resolve_model(str(tmp_path / "typo"), fallback=mini)


@pytest.mark.parametrize("method", ["adapter_tuning", "lora"])
def test_training_records_the_mini_model_it_fell_back_to_relative_to_the_repository(method, tiny_models, weibo_csv, tmp_path, monkeypatch):
    import json

    import weibo_senti
    from conftest import train
    from weibo_senti import checkpoint, training

    repo = tmp_path / "repo"
    mini = shutil.copytree(tiny_models["gpt2"], repo / "models" / "gpt2-chinese-mini")
    monkeypatch.setattr(training, "MINI_MODELS", {"gpt2": mini, "bert": tmp_path / "none"})
    monkeypatch.setattr(models, "MODELS_DIR", repo / "models")
    for module in (weibo_senti, checkpoint):
        monkeypatch.setattr(module, "REPO_ROOT", repo)
    train(method, "uer/gpt2-chinese-cluecorpussmall", weibo_csv, tmp_path / "out", "--epochs", "1")
    best = tmp_path / "out" / "best"
    info = json.loads((best / "checkpoint.json").read_text())
    assert info["base_model"] == info["base_model_path"] == "models/gpt2-chinese-mini"
    assert info["requested_base_model"] == "uer/gpt2-chinese-cluecorpussmall"
    if method == "lora":  # PEFT's own record of the base, read by PeftModel / AutoPeftModel users
        assert json.loads((best / "adapter_config.json").read_text())["base_model_name_or_path"] == "models/gpt2-chinese-mini"
        assert "base_model: models/gpt2-chinese-mini\n" in (best / "README.md").read_text()
    assert checkpoint.base_model_of(info) == mini  # found through the repository, whatever the working directory


def test_mixed_precision_auto_takes_bf16_only_where_the_hardware_computes_it(monkeypatch):
    from weibo_senti import UserError

    monkeypatch.setattr(models, "_cpu_has_native_bf16", lambda: True)
    assert models.resolve_mixed_precision("auto", "cpu")[0] == "bf16"
    monkeypatch.setattr(models, "_cpu_has_native_bf16", lambda: False)
    precision, why = models.resolve_mixed_precision("auto", "cpu")
    assert precision == "no" and "fp32" in why
    assert models.resolve_mixed_precision("bf16", "cpu")[0] == "bf16"  # asked for: done, even where emulated
    with pytest.raises(UserError, match="fp16: needs a CUDA GPU"):
        models.resolve_mixed_precision("fp16", "cpu")
    with pytest.raises(UserError, match="not one of auto, no, bf16, fp16"):
        models.resolve_mixed_precision("fp8", "cpu")


def test_offline_the_hub_is_not_retried_and_its_local_cache_still_serves(tmp_path, monkeypatch):
    import time

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert not models.hub_reachable()
    monkeypatch.setattr(models, "MODELS_DIR", tmp_path)
    started = time.perf_counter()
    with pytest.raises(ModelNotFound, match="the hub is not reachable from here"):
        resolve_model("uer/gpt2-chinese-cluecorpussmall")
    assert time.perf_counter() - started < 5


@pytest.mark.parametrize("capabilities, kind", [
    ({"avx2": True, "avx512_f": True, "avx512_vnni": True, "avx512_bf16": True}, "bf16"),  # AMD Zen 4, Intel Cooper Lake
    ({"avx2": True, "avx512_f": True, "amx_bf16": True, "amx_int8": True}, "bf16"),
    ({"avx2": True, "avx512_f": True, "avx512_vnni": True}, "vnni"),  # Cascade Lake, Ice Lake
    ({"avx2": True, "avx_vnni": True}, "vnni"),  # Alder Lake
    ({"avx2": True, "avx512_f": False}, "avx2"),  # Zen 2 and 3, Haswell to Coffee Lake, or AVX-512 hidden by an emulator
    ({"asimd": True}, "other"),
])
def test_the_cpu_kind_is_what_the_cpu_reports_to_the_kernels(monkeypatch, capabilities, kind):
    monkeypatch.delenv("ONEDNN_MAX_CPU_ISA", raising=False)
    monkeypatch.setattr(torch.cpu, "get_capabilities", lambda: capabilities)
    assert models.cpu_kind() == kind and set(models.cpu_flags()) <= {flag for flag, present in capabilities.items() if present}
    assert models._cpu_has_native_bf16() == (kind == "bf16")


def test_a_onednn_isa_cap_below_bf16_counts_as_a_cpu_without_native_bf16(monkeypatch):
    # how the suite is run as on an AVX2-only CPU: ONEDNN_MAX_CPU_ISA=AVX2 python -m pytest
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX2")
    assert models.resolve_mixed_precision("auto", "cpu")[0] == "no"
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX512_CORE_VNNI")
    assert not models._cpu_has_native_bf16()
