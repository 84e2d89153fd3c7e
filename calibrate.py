"""Fit the calibration of trained checkpoints (the recall-balancing bias and the confidence temperature,
weibo_senti/calibration.py) and write it into their checkpoint.json.

train.py does this itself at the end of a run; this is for checkpoints trained before it did, or to refit one.
Both are fitted on half the validation split of the run that trained the checkpoint (its seed, fraction and data, from
checkpoint.json), texts without emoticon tags; what they change is reported on the other half. A run that had
human-labelled posts (weibo2018, its checkpoint.json says so) is fitted on half of their fixed validation posts instead,
as they are and without tags, as train.py does.

python calibrate.py models/classifiers/adapter_tuning bert_lora/output/best
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from weibo_senti import UserError, cli  # noqa: E402

DATA = ""  # the labelled CSV the checkpoint was trained on ("" = the one its checkpoint.json names)
BATCH_SIZE = 64  # texts per model call
BANDS_ONLY = False  # keep the temperature and bias; fit only the five levels' edges (a checkpoint calibrated on human-labelled posts before they were fitted)


def main(argv=None):
    cfg = cli.parse_config(globals(), argv, positional=("checkpoints", "checkpoint folders to calibrate"))
    from weibo_senti.training import calibrate_checkpoint, fit_bands_of_checkpoint, run_validation_rows
    from weibo_senti.checkpoint import read_info

    if not cfg.checkpoints:
        raise UserError("name the checkpoint folders to calibrate, e.g. python calibrate.py adapter_tuning/output/best")
    infos = {checkpoint: read_info(checkpoint) for checkpoint in cfg.checkpoints}  # a damaged one is named before any work
    for checkpoint, info in infos.items():
        if info.get("run", {}).get("human_data", "none").lower() != "none":
            from weibo_senti import REPO_ROOT
            from weibo_senti.data import HUMAN_SPLIT_SEED, load_labelled_csv, split_human

            path = Path(info["run"]["human_data"])
            _, val = split_human(load_labelled_csv(path if path.is_absolute() else REPO_ROOT / path)[0])
            if cfg.bands_only:
                fit_bands_of_checkpoint(checkpoint, val, HUMAN_SPLIT_SEED, cfg.batch_size)
            else:
                calibrate_checkpoint(checkpoint, val, HUMAN_SPLIT_SEED, cfg.batch_size, as_they_are=True)
        elif cfg.bands_only:
            raise UserError(f"{checkpoint}: --bands-only needs a checkpoint trained with human-labelled posts (its run names no human_data)")
        else:
            val = run_validation_rows(checkpoint, info, cfg.data)
            calibrate_checkpoint(checkpoint, val, int(info["run"]["seed"]), cfg.batch_size)


if __name__ == "__main__":
    cli.main(main)
