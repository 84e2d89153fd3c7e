import json
import shutil

import pytest

import compare
import tiny


def test_compare_reports_every_checkpoint_on_the_same_split(trained, weibo_csv, tmp_path):
    checkpoints = [trained(method)[0] / "best" for method in ("adapter_tuning", "lora", "bert_lora")]
    extra = tiny.write_csv(tmp_path / "extra.csv", tiny.synthetic_rows(20, seed=9))
    argv = [*map(str, checkpoints), "--data", str(weibo_csv), "--extra", str(extra), "--results-dir", str(tmp_path / "results"),
            "--single-texts", "5"]
    rows = compare.main(argv)
    assert [row["method"] for row in rows] == ["adapter_tuning", "lora", "bert_lora"]
    markdown = (tmp_path / "results" / "comparison.md").read_text(encoding="utf-8")
    # rows are told apart by folder, not only by method
    assert "/best (adapter_tuning) |" in markdown and "/best (bert_lora) |" in markdown and "acc extra.csv |" in markdown
    # a set of your own with emoticon tags is also scored without them, with its recall per class and calibration error
    assert "acc extra.csv, no tags |" in markdown and markdown.count("| extra.csv, no tags |") == 3
    for row in rows:
        tagged, untagged = row["scores"]["extra.csv"], row["scores"]["extra.csv, no tags"]
        assert tagged["per_class"]["positive"]["support"] == untagged["per_class"]["positive"]["support"] == 10
        assert 0 <= untagged["calibration_error"] <= 1
    assert (tmp_path / "results" / "comparison.png").read_bytes()[:4] == b"\x89PNG"
    for row, checkpoint in zip(rows, checkpoints):
        # the scores are those the training run logged for the same validation split
        logged = json.loads((checkpoint / "checkpoint.json").read_text())["metrics"]
        assert abs(row["scores"]["val"]["accuracy"] - logged["val_accuracy"]) < 1e-9
        assert abs(row["scores"]["val_no_emoticons"]["macro_f1"] - logged["val_no_emoticons_macro_f1"]) < 1e-9
        assert row["weights_bytes"] > 0 and row["peak_rss_mb"] > 0 and row["ms_per_single_text"] > 0
        assert row["warning"] is None
        assert row["epochs"] == 4 and row["seconds_per_epoch"] > 0


def test_compare_finds_the_training_log_inside_a_shipped_classifier_folder(trained, tmp_path):
    output_dir, _ = trained("adapter_tuning")
    shipped = tmp_path / "classifiers" / "adapter_tuning"
    shutil.copytree(output_dir / "best", shipped)
    shutil.copy(output_dir / "training_log.json", shipped)
    facts = compare.checkpoint_facts(shipped, compare.cli.parse_config(vars(compare), []))
    assert facts["epochs"] == 4 and facts["seconds_per_epoch"] > 0
    assert facts["name"] == "adapter_tuning"


def test_compare_refuses_two_extra_sets_of_one_name(weibo_csv, tmp_path):
    for folder in ("a", "b"):
        (tmp_path / folder).mkdir()
        tiny.write_csv(tmp_path / folder / "posts.csv", tiny.synthetic_rows(10, seed=3))
    cfg = compare.cli.parse_config(vars(compare), ["--data", str(weibo_csv), "--extra", f"{tmp_path}/a/posts.csv,{tmp_path}/b/posts.csv"])
    with pytest.raises(compare.UserError, match="two files named posts.csv"):
        compare.load_text_sets(cfg)
