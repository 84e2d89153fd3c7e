"""LoRA on Chinese GPT-2 for Weibo sentiment, through PEFT (r=8, alpha=32, dropout 0.1 on c_attn and c_proj).

The base model is frozen; the LoRA matrices and the classification head train. The best checkpoint is a PEFT
adapter folder. Edit the constants below or override any of them on the command line (see --help).
"""
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from weibo_senti import cli, training  # noqa: E402

MODEL = "uer/gpt2-chinese-cluecorpussmall"  # hub id, or a folder written by save_pretrained
DATA = Path(os.environ.get("WEIBO_SENTI_DATA", "dataset/weibo_senti_100k.csv"))  # label,review CSV (or env WEIBO_SENTI_DATA)
HUMAN_DATA = "dataset/weibo2018/train.txt"  # posts labelled by people (weibo2018's mid,label,text lines): a fixed 1,500 choose the best epoch and fit the calibration, the rest train ("none": no such data)
DISTANT_SHARE = 0.5  # share of each epoch's training texts drawn afresh from DATA (labels from emoticons); the rest are HUMAN_DATA's posts (0: human labels only; 1: all of DATA)
HUMAN_SAMPLES = 0  # train on a stratified subset of this many human-labelled posts (0 = all): the learning curve
INIT_FROM = ""  # start from this trained checkpoint of the method (a shipped classifier or your own) and fine-tune it on the labels ("" = from the base model)
OUTPUT_DIR = Path("lora/output")  # best/ (the best epoch on the human-labelled posts), last/ (for --resume), training_log.json
EPOCHS = 3  # passes over the training texts (an epoch: every human-labelled post, and the distant texts DISTANT_SHARE draws)
BATCH_SIZE = 16  # texts per step (per process)
LR = 5e-4  # AdamW peak learning rate
WARMUP_RATIO = 0.1  # share of steps with linear warm-up, then linear decay
MAX_LENGTH = 128  # tokens per text, longer texts are cut
GROUP_BY_LENGTH = True  # batch texts of similar length together: less padding, about 2x faster epochs (--no-group-by-length: off)
EMOTICON_DROP = 0.0  # probability that a training text is shown without its [...] emoticon tags (0 = off)
MIXED_PRECISION = "auto"  # auto (bf16 where the CPU or GPU computes it natively, else fp32), no, bf16 or fp16 (CUDA only)
LORA_R = 8  # rank of the LoRA update
LORA_ALPHA = 32  # LoRA scaling: the update is multiplied by alpha / r
LORA_DROPOUT = 0.1  # dropout on the LoRA input
TARGET_MODULES = "c_attn,c_proj"  # comma-separated module names; c_proj matches the attention and the MLP output projections
BASE_LAYERS = 0  # keep only the base's first N transformer layers (0 = all): a smaller, faster student (DistilBERT's recipe)
POOLING = "cls"  # what the head reads: cls (BERT's pooler on [CLS], GPT-2's last token) or mean (the mean of the token vectors, BERT-family bases; e5's way)
TEXT_PREFIX = ""  # put before every text, in training and prediction alike ("passage: " is e5's for texts)
LINEAR_PROBE = 0  # LP-FT: first fit the head on the frozen model's features of this many training texts (0 = off)
WISE_ALPHAS = ""  # WiSE-FT back toward LINEAR_PROBE's model or INIT_FROM's classifier: alphas to try, e.g. "0,0.25,0.5,0.75" ("" = off; 1 is always tried)
WISE_TOLERANCE = 0.003  # WiSE-FT keeps the smallest alpha within this much validation accuracy without tags of the best
TEACHER = ""  # a trained checkpoint to distil from: the loss adds a KL term to its softened probabilities ("" = off)
DISTILL_WEIGHT = 0.5  # with TEACHER: share of the loss that is the KL term to the teacher (the rest: cross-entropy on the labels)
DISTILL_TEMPERATURE = 2.0  # with TEACHER: temperature that softens both models' probabilities in the KL term
VAL_FRACTION = 0.1  # share of rows held out for validation (stratified)
SEED = 42  # split, initialisation and batch order
MAX_SAMPLES = 0  # use a stratified subset of this many rows (0 = all), for quick runs
RESUME = False  # continue the run in OUTPUT_DIR from its last finished epoch
OVERWRITE = False  # replace a run already in OUTPUT_DIR (without it, or --resume, train.py refuses to touch it)
MERGE_TO = ""  # after training, also write best/ merged into a standalone model folder here

if __name__ == "__main__":
    cli.main(lambda: training.main(globals(), "lora"))
