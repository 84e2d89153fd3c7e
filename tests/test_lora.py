import subprocess
import sys

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from weibo_senti import lora
from weibo_senti.checkpoint import load_checkpoint
from weibo_senti.models import load_tokenizer
from weibo_senti.predict import Classifier

TEXTS = ["今天好开心[哈哈]", "讨厌难过[泪]", "北京天气", "好"]
SETTINGS = {
    "gpt2": {"r": 8, "lora_alpha": 32, "lora_dropout": 0.1, "target_modules": ["c_attn", "c_proj"]},
    "bert": {"r": 8, "lora_alpha": 32, "lora_dropout": 0.1, "target_modules": ["query", "value"]},
}


@pytest.mark.parametrize("family", ["gpt2", "bert"])
def test_only_lora_and_head_parameters_train(tiny_models, family):
    model = lora.build(tiny_models[family], load_tokenizer(tiny_models[family]), SETTINGS[family])
    trainable = [name for name, p in model.named_parameters() if p.requires_grad]
    head = "score" if family == "gpt2" else "classifier"
    # BERT's pooler is not in a BertForMaskedLM checkpoint (tiny.make_bert, bert-base-chinese): it is trained and saved too
    extra = () if family == "gpt2" else (".pooler.",)
    assert trainable and all("lora_" in name or f".{head}." in name or any(e in name for e in extra) for name in trainable)
    assert any(f".{head}." in name for name in trainable)
    if family == "gpt2":  # c_proj matches the attention output and the MLP output projection
        wrapped = {name.split(".lora_A")[0] for name in trainable if ".lora_A" in name}
        assert {"attn.c_attn", "attn.c_proj", "mlp.c_proj"} == {".".join(n.split(".")[-2:]) for n in wrapped}


def probabilities(model, tokenizer):
    batch = tokenizer(TEXTS, padding=True, return_tensors="pt")
    with torch.no_grad():
        return torch.softmax(model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits, -1)


@pytest.mark.parametrize("method", ["lora", "bert_lora"])
def test_plain_peft_reload_gives_the_saved_models_probabilities_head_included(trained, tiny_models, method):
    output_dir, _ = trained(method)
    ours, tokenizer, info = load_checkpoint(output_dir / "best")
    base = AutoModelForSequenceClassification.from_pretrained(info["base_model_path"], num_labels=2, pad_token_id=tokenizer.pad_token_id)
    reloaded = PeftModel.from_pretrained(base, output_dir / "best").eval()
    expected = probabilities(ours, tokenizer)
    torch.testing.assert_close(probabilities(reloaded, tokenizer), expected)
    fresh_head = AutoModelForSequenceClassification.from_pretrained(info["base_model_path"], num_labels=2, pad_token_id=tokenizer.pad_token_id)
    assert not torch.allclose(probabilities(fresh_head.eval(), tokenizer), expected, atol=1e-3)  # the trained head is what matters


@pytest.mark.parametrize("method", ["lora", "bert_lora"])
def test_merged_export_equals_the_adapter_model_and_loads_without_peft(trained, tmp_path, method):
    output_dir, _ = trained(method)
    model, tokenizer, _ = load_checkpoint(output_dir / "best")
    merged_dir = lora.export_merged(output_dir / "best", tmp_path / "merged")
    merged = AutoModelForSequenceClassification.from_pretrained(merged_dir).eval()
    torch.testing.assert_close(probabilities(merged, AutoTokenizer.from_pretrained(merged_dir)), probabilities(model, tokenizer), atol=1e-4, rtol=0)
    # a fresh interpreter in which importing peft fails still loads it, through pipeline()
    code = (
        "import sys; sys.modules['peft'] = None\n"
        "from transformers import pipeline\n"
        f"print(pipeline('text-classification', model={str(merged_dir)!r})('今天好开心[哈哈]')[0]['label'])"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines()[-1] in {"negative", "positive"}
    assert Classifier.load(merged_dir).predict(TEXTS)[0]["label"] == Classifier.load(output_dir / "best").predict(TEXTS)[0]["label"]


def test_pipeline_path_gives_the_direct_paths_label_and_confidence(trained):
    output_dir, _ = trained("bert_lora")
    direct = Classifier.load(output_dir / "best").predict(TEXTS)
    through_pipeline = Classifier.load(output_dir / "best", use_pipeline=True).predict(TEXTS)
    assert [r["label"] for r in through_pipeline] == [r["label"] for r in direct]
    assert [r["confidence"] for r in through_pipeline] == pytest.approx([r["confidence"] for r in direct], abs=1e-5)


def test_merging_never_deletes_a_users_files_and_takes_only_lora(trained, tmp_path):
    from weibo_senti import REPO_ROOT, UserError

    best = trained("lora")[0] / "best"
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("my own work")
    result = subprocess.run(
        [sys.executable, "-m", "weibo_senti.lora", str(best), str(mine)], capture_output=True, text=True, cwd=REPO_ROOT, timeout=300)
    assert result.returncode == 2 and "holds other files (notes.txt)" in result.stderr, result.stderr
    assert (mine / "notes.txt").read_text() == "my own work"
    merged = lora.export_merged(best, tmp_path / "merged")
    assert lora.export_merged(best, merged) == merged  # an earlier merged model is replaced
    with pytest.raises(UserError, match="lies inside the checkpoint"):
        lora.export_merged(best, best.parent)  # e.g. --merge-to . from inside the output folder
    with pytest.raises(UserError, match="only LoRA checkpoints"):
        lora.export_merged(trained("adapter_tuning")[0] / "best", tmp_path / "adapter_merged")
    assert not (tmp_path / "adapter_merged").exists()


def test_train_py_writes_the_merged_model_after_training_when_asked(tiny_models, weibo_csv, tmp_path):
    from conftest import FAST, TRAIN_SCRIPTS, run_script

    merged = tmp_path / "merged"
    result = run_script(TRAIN_SCRIPTS["bert_lora"], "--model", tiny_models["bert"], "--data", weibo_csv, "--human-data", "none",
                        "--output-dir", tmp_path / "run", "--merge-to", merged, *FAST)
    assert result.returncode == 0, result.stderr
    assert f"merged model written to {merged}" in result.stdout
    standalone = Classifier.load(merged, backend="torch")
    assert not isinstance(standalone.model, PeftModel)
    unmerged = Classifier.load(tmp_path / "run" / "best", backend="torch").predict(TEXTS)
    for alone, peft in zip(standalone.predict(TEXTS), unmerged):
        assert alone["label"] == peft["label"] and alone["prob_positive"] == pytest.approx(peft["prob_positive"], abs=1e-4)
