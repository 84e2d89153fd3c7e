"""Full fine-tuning (every weight trains), through the same loop, data and checkpoints as the three methods: the
reference they are compared against (README, Results). Not a method shipped for use: its checkpoint is a whole model.

python studies/full_finetune/full_finetune.py --model intfloat/multilingual-e5-small --lr 5e-5 --epochs 1
"""
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from weibo_senti import cli, training  # noqa: E402
from weibo_senti.models import load_base_classifier  # noqa: E402

MODEL = "intfloat/multilingual-e5-small"  # hub id, or a folder written by save_pretrained
DATA = Path(os.environ.get("WEIBO_SENTI_DATA", "dataset/weibo_senti_100k.csv"))  # label,review CSV (or env WEIBO_SENTI_DATA)
OUTPUT_DIR = Path("studies/full_finetune/output")  # best/ (best epoch without emoticon tags), last/ (for --resume), training_log.json
EPOCHS = 1  # passes over the training rows
BATCH_SIZE = 32  # texts per step (per process)
LR = 5e-5  # AdamW peak learning rate
WARMUP_RATIO = 0.1  # share of steps with linear warm-up, then linear decay
MAX_LENGTH = 128  # tokens per text, longer texts are cut
GROUP_BY_LENGTH = True  # batch texts of similar length together: less padding, about 2x faster epochs (--no-group-by-length: off)
EMOTICON_DROP = 0.5  # probability that a training text is shown without its [...] emoticon tags (0 = off)
MIXED_PRECISION = "auto"  # auto (bf16 where the CPU or GPU computes it natively, else fp32), no, bf16 or fp16 (CUDA only)
BASE_LAYERS = 0  # keep only the base's first N transformer layers (0 = all): a smaller, faster student (DistilBERT's recipe)
POOLING = "cls"  # what the head reads: cls (BERT's pooler on [CLS], GPT-2's last token) or mean (the mean of the token vectors, BERT-family bases; e5's way)
TEXT_PREFIX = ""  # put before every text, in training and prediction alike ("passage: " is e5's for texts)
LINEAR_PROBE = 0  # LP-FT: first fit the head on the frozen model's features of this many training texts (0 = off)
WISE_ALPHAS = ""  # WiSE-FT (needs LINEAR_PROBE): scales of the update to try, e.g. "0,0.25,0.5,0.75" ("" = off; 1 is always tried)
WISE_TOLERANCE = 0.003  # WiSE-FT keeps the smallest alpha within this much validation accuracy without tags of the best
TEACHER = ""  # a trained checkpoint to distil from: the loss adds a KL term to its softened probabilities ("" = off)
DISTILL_WEIGHT = 0.5  # with TEACHER: share of the loss that is the KL term to the teacher (the rest: cross-entropy on the labels)
DISTILL_TEMPERATURE = 2.0  # with TEACHER: temperature that softens both models' probabilities in the KL term
VAL_FRACTION = 0.1  # share of rows held out for validation (stratified)
SEED = 42  # split, initialisation and batch order
MAX_SAMPLES = 0  # use a stratified subset of this many rows (0 = all), for quick runs
RESUME = False  # continue the run in OUTPUT_DIR from its last finished epoch
OVERWRITE = False  # replace a run already in OUTPUT_DIR (without it, or --resume, train.py refuses to touch it)


def settings(cfg):
    return {}


def build(base_path, tokenizer, settings, weights_from=None):
    # a saved checkpoint's config already holds its number of layers
    model, _ = load_base_classifier(weights_from or base_path, tokenizer, {**settings, "base_layers": 0} if weights_from else settings)
    return model  # every parameter trains


def save(model, directory):
    model.save_pretrained(directory)


if __name__ == "__main__":
    cli.main(lambda: training.run(cli.parse_config(globals()), "full_finetune"))
