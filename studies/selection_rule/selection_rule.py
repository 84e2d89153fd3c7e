"""Which of one run's saved checkpoints train.py's rule for best/ keeps: the highest macro-F1 without emoticon tags on
the half of the validation texts the confidence is fitted on (weibo_senti/training.py, SELECTION_METRIC; the earlier
listed wins a tie). For runs of earlier versions, whose best/ was chosen by macro-F1 with the tags: list best/ and last/
to see which the rule keeps. Each is scored as its epoch was, before its calibration; the other half, which neither the
rule nor the calibration sees, is reported beside.
python studies/selection_rule/selection_rule.py bert_lora/output_student4_4epochs/best bert_lora/output_student4_4epochs/last
Writes studies/selection_rule/results.json.
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from weibo_senti import UserError, cli, repo_relative  # noqa: E402
from weibo_senti.training import SPLIT_KEYS, run_validation_rows  # noqa: E402
from weibo_senti.checkpoint import read_info, write_json_atomic  # noqa: E402
from weibo_senti.data import detailed_scores, strip_emoticons  # noqa: E402
from weibo_senti.predict import Classifier  # noqa: E402
from weibo_senti.training import SELECTION_METRIC, SELECTION_RULES, selection_positions  # noqa: E402

BATCH_SIZE = 64  # texts per model call
OUT = Path("studies/selection_rule/results.json")


def _scores(classifier, rows, batch_size):
    probabilities = classifier.probabilities(rows["review"].map(strip_emoticons).tolist(), batch_size)
    detail = detailed_scores(rows["label"].to_numpy(), probabilities.argmax(axis=1))
    return {"texts": len(rows), "accuracy": round(detail["accuracy"], 4), "macro_f1": round(detail["macro_f1"], 4),
            "recall": [round(detail["per_class"][name]["recall"], 4) for name in ("negative", "positive")]}


def main(argv=None):
    cfg = cli.parse_config(globals(), argv, positional=("checkpoints", "checkpoint folders of one training run"))
    if len(cfg.checkpoints) < 2:
        raise UserError("name at least two checkpoint folders of one run, e.g. its best/ and last/")
    infos = {checkpoint: read_info(checkpoint) for checkpoint in cfg.checkpoints}
    splits = {checkpoint: {key: info.get("run", {}).get(key) for key in SPLIT_KEYS}
              for checkpoint, info in infos.items()}
    if len({str(split) for split in splits.values()}) > 1:
        raise UserError("these checkpoints were not validated on the same texts: " + "; ".join(f"{c}: {s}" for c, s in splits.items()))
    first, info = next(iter(infos.items()))  # one split for all, checked above: read once
    val = run_validation_rows(first, info)
    fit = val.iloc[selection_positions(val, int(info["run"]["seed"]))]
    held_out = val.drop(fit.index)  # none under 200 validation texts
    rows = []
    for checkpoint, info in infos.items():
        classifier = Classifier.load(checkpoint, mixed_precision="auto")
        classifier.temperature, classifier.bias = 1.0, 0.0  # as the epoch was scored
        row = {"checkpoint": repo_relative(Path(checkpoint)), "epoch": info.get("epoch"),
               "fit_half": _scores(classifier, fit, cfg.batch_size),
               "held_out_half": _scores(classifier, held_out, cfg.batch_size) if len(held_out) else None}
        print(f"{row['checkpoint']} (epoch {row['epoch']}): without tags, macro-F1 {row['fit_half']['macro_f1']:.4f} on the "
              f"{len(fit):,} texts that choose" + (f", accuracy {row['held_out_half']['accuracy']:.4f} on the other {len(held_out):,}"
                                                   if len(held_out) else ""))
        rows.append(row)
    kept = max(rows, key=lambda row: row["fit_half"]["macro_f1"])
    print(f"the rule keeps {kept['checkpoint']} (epoch {kept['epoch']})")
    write_json_atomic(cfg.out, {"command": "python studies/selection_rule/selection_rule.py " + " ".join(str(c) for c in cfg.checkpoints),
                                "rule": f"the highest {SELECTION_RULES[SELECTION_METRIC]}, before calibration; the earlier listed on a tie",
                                "checkpoints": rows, "kept": kept["checkpoint"]})
    print(f"wrote {cfg.out}")


if __name__ == "__main__":
    cli.main(main)
