"""Pretrain the embedded default models from scratch: a small Chinese GPT-2 (causal LM) or BERT (masked LM).

Corpus: the review texts of the training part of DATA, split exactly as train.py splits it (same seed and
validation fraction), so no validation text is ever seen; EXTRA_TEXT adds plain-text files, one text per line.
The tokenizer is BERT-style with one token per Chinese character, its vocabulary built from the corpus, and every
Weibo emoticon tag such as [哈哈] kept as one token.

python models/pretrain.py --family gpt2          # -> models/gpt2-chinese-mini/
python models/pretrain.py --family bert          # -> models/bert-chinese-mini/
"""
import math
import os
import random
import sys
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from weibo_senti import cli, repo_relative  # noqa: E402

FAMILY = "gpt2"  # gpt2 (causal language model) or bert (masked language model)
DATA = Path(os.environ.get("WEIBO_SENTI_DATA", "dataset/weibo_senti_100k.csv"))  # labelled CSV; only its training part is read
EXTRA_TEXT = ""  # comma-separated plain-text files to add to the corpus, one text per line
OUTPUT_DIR = ""  # where the model goes; empty: models/<family>-chinese-mini
VAL_FRACTION = 0.1  # as in train.py: the validation part is never read
SEED = 42  # as in train.py
MIN_CHAR_COUNT = 3  # characters seen fewer times become [UNK]
MIN_EMOTICON_COUNT = 3  # emoticon tags seen at least this often become single tokens
HELD_OUT_FRACTION = 0.02  # share of the corpus kept back for the final loss and perplexity
LAYERS = 4  # transformer blocks
HIDDEN = 256  # hidden size
HEADS = 4  # attention heads
BLOCK_LENGTH = 128  # tokens per training sequence (texts are packed one after another)
STEPS = 3000  # optimizer steps
BATCH_SIZE = 32  # sequences per step
LR = 1e-3  # AdamW peak learning rate, linear warm-up and decay
WARMUP_RATIO = 0.05  # share of steps with linear warm-up
MASK_PROBABILITY = 0.15  # bert: share of tokens to predict

SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def read_corpus(cfg):
    from weibo_senti.data import load_labelled_csv, split_train_val

    table, report = load_labelled_csv(cfg.data)
    print(report)
    train, _ = split_train_val(table, cfg.val_fraction, cfg.seed)
    texts = train["review"].tolist()
    for extra in filter(None, (e.strip() for e in cfg.extra_text.split(","))):
        texts += [line.strip() for line in Path(extra).read_text(encoding="utf-8").splitlines() if line.strip()]
    random.Random(cfg.seed).shuffle(texts)
    held_out = max(1, int(len(texts) * cfg.held_out_fraction))
    return texts[held_out:], texts[:held_out]


def build_tokenizer(texts, cfg, folder):
    """Vocabulary from the corpus: one token per character, ##-pieces for the characters of Latin words and numbers."""
    from transformers import BertTokenizer

    from weibo_senti.data import EMOTICON_TAG

    emoticons = Counter(tag for text in texts for tag in EMOTICON_TAG.findall(text))
    characters = Counter(ch for text in texts for ch in EMOTICON_TAG.sub(" ", text) if not ch.isspace())
    kept = [ch for ch, count in characters.most_common() if count >= cfg.min_char_count]
    pieces = [f"##{ch}" for ch in kept if ch.isascii() and ch.isalnum()]
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.txt").write_text("\n".join(SPECIAL_TOKENS + kept + pieces) + "\n", encoding="utf-8")
    tokenizer = BertTokenizer(str(folder / "vocab.txt"), do_lower_case=False)
    tokenizer.add_tokens([tag for tag, count in emoticons.most_common() if count >= cfg.min_emoticon_count])
    return tokenizer


def pack(tokenizer, texts, block_length):
    """[CLS] text [SEP] text [SEP] ... cut into blocks of block_length tokens."""
    import torch

    from weibo_senti.data import encode_compactly

    ids = []
    for encoded in encode_compactly(tokenizer, texts, max_length=None, add_special_tokens=False):
        ids += encoded.tolist() + [tokenizer.sep_token_id]
    usable = (len(ids) // (block_length - 1)) * (block_length - 1)
    blocks = torch.tensor(ids[:usable]).view(-1, block_length - 1)
    return torch.cat([torch.full((len(blocks), 1), tokenizer.cls_token_id), blocks], dim=1)


def new_model(family, tokenizer, cfg):
    from transformers import BertConfig, BertForMaskedLM, GPT2Config, GPT2LMHeadModel

    if family == "gpt2":
        return GPT2LMHeadModel(GPT2Config(
            vocab_size=len(tokenizer), n_positions=512, n_embd=cfg.hidden, n_layer=cfg.layers, n_head=cfg.heads,
            pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.cls_token_id, eos_token_id=tokenizer.sep_token_id,
            tokenizer_class="BertTokenizer",
        ))
    return BertForMaskedLM(BertConfig(
        vocab_size=len(tokenizer), hidden_size=cfg.hidden, num_hidden_layers=cfg.layers, num_attention_heads=cfg.heads,
        intermediate_size=4 * cfg.hidden, max_position_embeddings=512, pad_token_id=tokenizer.pad_token_id,
    ))


def lm_batch(family, blocks, tokenizer, mask_probability, generator):
    """Inputs and labels: next-token prediction for GPT-2, 80/10/10 masking for BERT (-100 = not predicted)."""
    import torch

    if family == "gpt2":
        return {"input_ids": blocks, "labels": blocks}
    inputs, labels = blocks.clone(), blocks.clone()
    special = (blocks == tokenizer.cls_token_id) | (blocks == tokenizer.sep_token_id)
    chosen = (torch.rand(blocks.shape, generator=generator) < mask_probability) & ~special
    labels[~chosen] = -100
    draw = torch.rand(blocks.shape, generator=generator)
    inputs[chosen & (draw < 0.8)] = tokenizer.mask_token_id
    random_tokens = chosen & (draw >= 0.8) & (draw < 0.9)
    inputs[random_tokens] = torch.randint(len(tokenizer), blocks.shape, generator=generator)[random_tokens]
    return {"input_ids": inputs, "labels": labels}


def held_out_loss(model, family, blocks, tokenizer, cfg):
    import torch

    model.eval()
    generator = torch.Generator().manual_seed(cfg.seed)
    losses = []
    with torch.inference_mode():
        for start in range(0, len(blocks), cfg.batch_size):
            losses.append(model(**lm_batch(family, blocks[start:start + cfg.batch_size], tokenizer, cfg.mask_probability, generator)).loss.item())
    model.train()
    return sum(losses) / len(losses)


def write_card(folder, name, cfg, facts):
    # paths as the repository sees them, so the card names no folder of the machine it was made on
    command = "python models/pretrain.py " + " ".join(
        repo_relative(arg) if Path(arg).exists() else arg for arg in sys.argv[1:]
    )
    objective = "causal language modelling (next character)" if cfg.family == "gpt2" else "masked language modelling (15%, 80/10/10)"
    (folder / "README.md").write_text(f"""# {name}

A small Chinese {'GPT-2' if cfg.family == 'gpt2' else 'BERT'} pretrained from scratch by this repository, the embedded
default base model when the hub model cannot be had. Made by:

    {command}

- Corpus: the review texts of the training part of `{cfg.data.name}` (seed {cfg.seed}, validation fraction
  {cfg.val_fraction}, the split of `train.py`: no validation text was seen){', plus ' + cfg.extra_text if cfg.extra_text else ''};
  {facts['train_texts']:,} texts, {facts['train_tokens']:,} tokens for training, {facts['held_out_texts']:,} texts held back.
- Tokenizer: BERT-style, one token per character; {facts['vocab']:,} tokens, of them {facts['emoticons']:,} Weibo emoticon tags
  kept whole (`[哈哈]`); characters seen fewer than {cfg.min_char_count} times are `[UNK]`.
- Architecture: {cfg.layers} layers, hidden size {cfg.hidden}, {cfg.heads} heads; {facts['parameters']:,} parameters, stored in fp16.
- Objective: {objective}; {cfg.steps:,} steps of {cfg.batch_size} packed sequences of {cfg.block_length} tokens, AdamW,
  peak learning rate {cfg.lr}, {facts['minutes']:.0f} minutes on {facts['device']}.
- Held-back text: loss {facts['held_out_loss']:.3f}, perplexity {math.exp(facts['held_out_loss']):.1f}
  (loss {facts['initial_loss']:.3f} before training).
""", encoding="utf-8")


def main():
    import torch
    from tqdm.auto import tqdm
    from transformers import get_linear_schedule_with_warmup

    from weibo_senti.checkpoint import atomic_directory
    from weibo_senti.models import MINI_MODELS

    cfg = cli.parse_config(globals())
    if cfg.family not in MINI_MODELS:
        raise SystemExit(f"--family must be {' or '.join(MINI_MODELS)}, not {cfg.family}")
    output_dir = Path(cfg.output_dir) if cfg.output_dir else MINI_MODELS[cfg.family]
    torch.manual_seed(cfg.seed)
    train_texts, held_out_texts = read_corpus(cfg)
    with atomic_directory(output_dir) as folder:
        tokenizer = build_tokenizer(train_texts, cfg, folder)
        train_blocks = pack(tokenizer, train_texts, cfg.block_length)
        held_out_blocks = pack(tokenizer, held_out_texts, cfg.block_length)
        model = new_model(cfg.family, tokenizer, cfg)
        print(f"{cfg.family}: {sum(p.numel() for p in model.parameters()):,} parameters, vocabulary {len(tokenizer):,}, "
              f"{len(train_blocks):,} training blocks of {cfg.block_length} tokens")
        initial_loss = held_out_loss(model, cfg.family, held_out_blocks, tokenizer, cfg)
        optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=0.01)
        scheduler = get_linear_schedule_with_warmup(optimizer, int(cfg.warmup_ratio * cfg.steps), cfg.steps)
        generator = torch.Generator().manual_seed(cfg.seed)
        started = time.perf_counter()
        progress = tqdm(range(cfg.steps), desc=f"pretraining {cfg.family}")
        for step in progress:
            rows = torch.randint(len(train_blocks), (cfg.batch_size,), generator=generator)
            loss = model(**lm_batch(cfg.family, train_blocks[rows], tokenizer, cfg.mask_probability, generator)).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad()
            progress.set_postfix(loss=f"{loss.item():.3f}")
        facts = {
            "train_texts": len(train_texts), "held_out_texts": len(held_out_texts), "train_tokens": train_blocks.numel(),
            "vocab": len(tokenizer), "emoticons": sum(token not in SPECIAL_TOKENS for token in tokenizer.get_added_vocab()),
            "parameters": sum(p.numel() for p in model.parameters()), "minutes": (time.perf_counter() - started) / 60,
            "device": f"{os.cpu_count()} CPU cores" if not torch.cuda.is_available() else torch.cuda.get_device_name(),
            "initial_loss": initial_loss, "held_out_loss": held_out_loss(model, cfg.family, held_out_blocks, tokenizer, cfg),
        }
        model.half().save_pretrained(folder)
        tokenizer.save_pretrained(folder)
        write_card(folder, output_dir.name, cfg, facts)
    print(f"held-back loss {facts['initial_loss']:.3f} -> {facts['held_out_loss']:.3f}; saved to {output_dir}")


if __name__ == "__main__":
    cli.main(main)
