"""The bar any neural model here must beat: character n-gram TF-IDF + logistic regression, on train.py's split.

Scores the validation texts as they are and with every [...] emoticon tag removed, for a plain fit and for a fit on
the training texts twice, once with and once without their tags (what --emoticon-drop 0.5 does in expectation).
Then the same model on people's labels (weibo2018's training posts, all of them and stratified subsets: the learning
curve's classic bar), scored on the 750 held-out validation posts that compare.py leads with.
python studies/tfidf_baseline/tfidf_baseline.py
"""
import os
import sys
from pathlib import Path

import pandas as pd
from sklearn.feature_extraction.text import TfidfVectorizer
from sklearn.linear_model import LogisticRegression

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from weibo_senti import REPO_ROOT, cli  # noqa: E402
from weibo_senti.calibration import calibration_halves  # noqa: E402
from weibo_senti.data import HUMAN_SPLIT_SEED, load_labelled_csv, scores, split_human, split_train_val, strip_emoticons  # noqa: E402

DATA = Path(os.environ.get("WEIBO_SENTI_DATA", "dataset/weibo_senti_100k.csv"))  # label,review CSV
VAL_FRACTION = 0.1  # as in train.py
SEED = 42  # as in train.py
NGRAM_MAX = 3  # character 1..NGRAM_MAX-grams
MIN_DF = 2  # n-grams in fewer training texts are dropped
C = 4.0  # inverse regularisation strength of the logistic regression
HUMAN_DATA = "dataset/weibo2018/train.txt"  # posts labelled by people ("none": skip the learning curve)
HUMAN_SAMPLES = "250,1000,3000,0"  # training posts of HUMAN_DATA for each fit (0: all)


def fit_and_score(train_texts, train_labels, val, cfg):
    vectorizer = TfidfVectorizer(analyzer="char", ngram_range=(1, cfg.ngram_max), min_df=cfg.min_df, sublinear_tf=True)
    model = LogisticRegression(C=cfg.c, max_iter=2000).fit(vectorizer.fit_transform(train_texts), train_labels)
    plain = scores(val["label"], model.predict(vectorizer.transform(val["review"])))
    stripped = scores(val["label"], model.predict(vectorizer.transform(val["review"].map(strip_emoticons))))
    return plain, stripped


def main(cfg):
    table, report = load_labelled_csv(cfg.data)
    print(report)
    train, val = split_train_val(table, cfg.val_fraction, cfg.seed)
    with_and_without = pd.concat([train, train.assign(review=train["review"].map(strip_emoticons))])
    print("fit on                               acc   macro-F1   acc, no emoticons   macro-F1, no emoticons")
    for name, fit_rows in (("training texts", train), ("training texts, with and without tags", with_and_without)):
        plain, stripped = fit_and_score(fit_rows["review"], fit_rows["label"], val, cfg)
        print(f"{name:<38} {plain['accuracy']:.4f}  {plain['macro_f1']:.4f}     {stripped['accuracy']:.4f}             {stripped['macro_f1']:.4f}")
    if cfg.human_data.lower() == "none":
        return
    human, _ = load_labelled_csv(REPO_ROOT / cfg.human_data)
    _, held_out = calibration_halves(split_human(human)[1], HUMAN_SPLIT_SEED)
    print(f"\npeople's labels ({cfg.human_data}), scored on the {len(held_out)} held-out validation posts")
    print("training posts    acc   macro-F1   acc, no emoticons")
    for samples in (int(n) for n in cfg.human_samples.split(",")):
        train_posts, _ = split_human(human, samples=samples)
        plain, stripped = fit_and_score(train_posts["review"], train_posts["label"], held_out, cfg)
        print(f"{len(train_posts):<16,} {plain['accuracy']:.4f}  {plain['macro_f1']:.4f}     {stripped['accuracy']:.4f}")


if __name__ == "__main__":
    cli.main(lambda: main(cli.parse_config(globals())))
