"""Tiny random models and a small synthetic Weibo-like dataset, made on the fly for wiring tests."""
import csv
import random

import torch
from transformers import BertConfig, BertForMaskedLM, BertTokenizer, GPT2Config, GPT2LMHeadModel

POSITIVE = "好开心喜欢赞棒美爱笑甜幸福"
NEGATIVE = "坏难过讨厌差烦累哭怒惨痛苦"
NEUTRAL = "今天我们他的了是在有去吃饭天气工作北京上海朋友电影"
EMOTICONS = {1: ["[哈哈]", "[爱你]", "[鼓掌]"], 0: ["[泪]", "[抓狂]", "[怒]"]}
SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def write_vocab(path):
    characters = sorted(set(POSITIVE + NEGATIVE + NEUTRAL + "".join("".join(e) for e in EMOTICONS.values())))
    path.write_text("\n".join(SPECIAL + characters) + "\n", encoding="utf-8")
    return path


def make_tokenizer(folder):
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer = BertTokenizer(str(write_vocab(folder / "vocab.txt")), do_lower_case=False)
    tokenizer.save_pretrained(folder)
    return tokenizer


def make_gpt2(folder, layers=2, hidden=64):
    tokenizer = make_tokenizer(folder)
    config = GPT2Config(
        vocab_size=len(tokenizer), n_positions=128, n_embd=hidden, n_layer=layers, n_head=2,
        pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.cls_token_id, eos_token_id=tokenizer.sep_token_id,
        tokenizer_class="BertTokenizer",
    )
    torch.manual_seed(0)  # the same random network on every run, so tests do not hang on a lucky draw
    GPT2LMHeadModel(config).save_pretrained(folder)
    return folder


def make_bert(folder, layers=2, hidden=64):
    """Saved as BertForMaskedLM, like bert-base-chinese: no pooler weights, which the classifier must then train and save."""
    tokenizer = make_tokenizer(folder)
    config = BertConfig(
        vocab_size=len(tokenizer), hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=2,
        intermediate_size=hidden * 2, max_position_embeddings=128,
    )
    torch.manual_seed(0)
    BertForMaskedLM(config).save_pretrained(folder)
    return folder


def synthetic_rows(count, seed=0):
    rng = random.Random(seed)
    rows = []
    for index in range(count):
        label = index % 2
        words = POSITIVE if label else NEGATIVE
        text = "".join(rng.choice(NEUTRAL) for _ in range(rng.randint(0, 4)))
        text += "".join(rng.choice(words) for _ in range(rng.randint(2, 4))) + rng.choice(EMOTICONS[label])
        rows.append((label, text + str(index)))  # the index keeps every text distinct
    return rows


def write_csv(path, rows, header=("label", "review")):
    with open(path, "w", encoding="utf-8", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        writer.writerows(rows)
    return path


def write_weibo2018(path, rows):
    """weibo2018's format: `mid,label,text` lines, no header (texts may hold commas)."""
    path.write_text("".join(f"{4231265311393455 + i},{label},{text}，好,吧\n" for i, (label, text) in enumerate(rows)), encoding="utf-8")
    return path
