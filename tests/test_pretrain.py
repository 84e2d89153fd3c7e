import runpy
from types import SimpleNamespace

import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer

import tiny
from conftest import run_script
from weibo_senti import REPO_ROOT
from weibo_senti.data import load_labelled_csv, split_train_val

SCRIPT = REPO_ROOT / "models" / "pretrain.py"
TINY = ["--steps", "10", "--layers", "2", "--hidden", "64", "--heads", "2", "--batch-size", "8", "--block-length", "32"]


def test_corpus_is_the_training_part_of_train_pys_split_only(weibo_csv):
    pretrain = runpy.run_path(str(SCRIPT), run_name="imported_by_tests")
    cfg = SimpleNamespace(data=weibo_csv, val_fraction=0.1, seed=42, extra_text="", held_out_fraction=0.02)
    corpus, held_out = pretrain["read_corpus"](cfg)
    train, val = split_train_val(load_labelled_csv(weibo_csv)[0], 0.1, 42)
    assert sorted(corpus + held_out) == sorted(train["review"])
    assert not set(corpus + held_out) & set(val["review"])


def test_pretrained_models_load_with_auto_classes_and_keep_emoticons_whole(tmp_path):
    data = tiny.write_csv(tmp_path / "data.csv", tiny.synthetic_rows(300))
    for family in ("gpt2", "bert"):
        folder = tmp_path / f"{family}-mini"
        result = run_script(SCRIPT, "--family", family, "--data", data, "--output-dir", folder, *TINY)
        assert result.returncode == 0, result.stderr[-2000:]
        card = (folder / "README.md").read_text(encoding="utf-8")
        assert card.startswith(f"# {family}-mini") and "perplexity" in card and "python models/pretrain.py" in card
        tokenizer = AutoTokenizer.from_pretrained(folder)
        assert len(tokenizer("[哈哈]", add_special_tokens=False)["input_ids"]) == 1
        model = AutoModelForSequenceClassification.from_pretrained(folder, num_labels=2)
        assert model.config.dtype == torch.float16  # stored in half precision; the methods train in float32
