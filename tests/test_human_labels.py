"""Issue 43: people's labels (weibo2018) as data, mixed with the distant labels, choosing best/ and the calibration."""
import json

import pytest
import torch
from safetensors.torch import load_file

import tiny
from conftest import REPO_ROOT, run_script, train
from weibo_senti import UserError, training
from weibo_senti.calibration import LEVELS
from weibo_senti.data import HUMAN_DATA, HUMAN_VAL_ROWS, DataError, LengthGroupedBatches, load_labelled_csv, split_human


@pytest.fixture(scope="session")
def human_txt(tmp_path_factory):
    return tiny.write_weibo2018(tmp_path_factory.mktemp("human") / "train.txt", tiny.synthetic_rows(600, seed=7))


def test_the_shipped_weibo2018_file_is_read_in_its_own_format_and_split_the_same_way_every_time():
    table, report = load_labelled_csv(HUMAN_DATA)
    assert (report.rows_read, report.rows_used) == (10_000, 9_990) and "10 rows repeating" in str(report)
    assert "row 1 is the header" not in str(report)
    train_a, val_a = split_human(table)
    train_b, val_b = split_human(table.sample(frac=1, random_state=3).sort_index())
    assert len(val_a) == HUMAN_VAL_ROWS and len(train_a) == 8_490
    assert val_a["review"].tolist() == val_b["review"].tolist()  # fixed: no --seed moves it
    assert not set(val_a["review"]) & set(train_a["review"])
    assert abs(val_a["label"].mean() - train_a["label"].mean()) < 0.01  # stratified
    assert len(split_human(table, samples=250)[0]) == 250 and split_human(table, samples=250)[1].equals(val_a)


def test_texts_with_commas_keep_them_and_a_malformed_line_is_named(tmp_path):
    table, _ = load_labelled_csv(tiny.write_weibo2018(tmp_path / "ok.txt", [(1, "好开心"), (0, "难过")]))
    assert table["review"].tolist() == ["好开心，好,吧", "难过，好,吧"] and table["row"].tolist() == [1, 2]
    bad = tmp_path / "bad.txt"
    bad.write_text("1,1,好\n2;0;坏\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"bad.txt, line 2: expected 'mid,label,text'"):
        load_labelled_csv(bad)


def test_mixed_batches_take_every_human_post_and_a_fresh_draw_of_the_others():
    import torch

    lengths = [1] * 100
    batches = LengthGroupedBatches(lengths, 10, pools=[(list(range(20)), None), (list(range(20, 100)), 20)])
    assert len(batches) == 4
    torch.manual_seed(0)
    first = sorted(i for batch in batches for i in batch)
    second = sorted(i for batch in batches for i in batch)
    for epoch in (first, second):
        assert len(epoch) == 40 and set(range(20)) <= set(epoch) and len(set(epoch)) == 40
    assert first != second  # the distant texts are drawn afresh each epoch


@pytest.mark.parametrize("share", [0.0, 0.5])
def test_a_run_with_human_labels_is_chosen_and_calibrated_on_them(tiny_models, weibo_csv, human_txt, tmp_path, share):
    output = tmp_path / "run"
    log = train("adapter_tuning", tiny_models["gpt2"], weibo_csv, output, "--human-data", str(human_txt), "--distant-share", str(share),
                "--epochs", "2", "--adapter-size", "16")
    for key in ("human_val_accuracy", "human_val_macro_f1", "human_val_recall_positive", "human_val_calibration_error",
                "human_val_no_emoticons_accuracy", "human_val_fit_macro_f1", "val_no_emoticons_accuracy"):
        assert key in log[0]
    info = json.loads((output / "best" / "checkpoint.json").read_text(encoding="utf-8"))
    best = max(log, key=lambda entry: entry[training.HUMAN_SELECTION_METRIC])
    assert info["epoch"] == best["epoch"] and info["selected_by"]["metric"] == training.HUMAN_SELECTION_METRIC
    assert info["data_rows"]["human_val"] == 300 and info["data_rows"]["human_train"] == 300  # 600 posts: half held out
    assert info["data_rows"]["distant_per_epoch"] == (0 if share == 0 else 300)
    assert "human-labelled validation posts" in info["calibration"]["fitted_on"]
    assert info["run"]["distant_share"] == str(share)
    bands = info["calibration"]["bands"]  # the five levels' edges, on the same posts
    assert 0.5 <= bands["neutral_below"] <= bands["very_from"] <= 1 and set(bands["held_out"]) == set(LEVELS)
    assert sum(level["share"] for level in bands["held_out"].values()) == pytest.approx(1, abs=1e-3)


def test_init_from_starts_from_a_trained_checkpoint_and_takes_its_settings(trained, tiny_models, weibo_csv, human_txt, tmp_path):
    start = trained("adapter_tuning")[0] / "best"
    started = json.loads((start / "checkpoint.json").read_text(encoding="utf-8"))
    output = tmp_path / "tuned"
    log = train("adapter_tuning", tiny_models["gpt2"], weibo_csv, output, "--human-data", str(human_txt), "--distant-share", "0",
                "--epochs", "1", "--init-from", str(start))
    info = json.loads((output / "best" / "checkpoint.json").read_text(encoding="utf-8"))
    assert info["method_settings"] == started["method_settings"] and info["init_from"] == str(start)
    # it starts where the checkpoint left off: better than a fresh start after one epoch on the same labels
    fresh = train("adapter_tuning", tiny_models["gpt2"], weibo_csv, tmp_path / "fresh", "--human-data", str(human_txt),
                  "--distant-share", "0", "--epochs", "1")
    assert log[0]["val_no_emoticons_accuracy"] >= fresh[0]["val_no_emoticons_accuracy"] - 0.05


def test_wise_ft_after_init_from_goes_back_toward_the_classifier_it_started_from(trained, tiny_models, weibo_csv, human_txt, tmp_path):
    start = trained("adapter_tuning")[0] / "best"
    output = tmp_path / "tuned"
    # a tolerance this wide keeps the smallest alpha: 0, the starting classifier's own weights
    train("adapter_tuning", tiny_models["gpt2"], weibo_csv, output, "--human-data", str(human_txt), "--distant-share", "0",
          "--epochs", "1", "--init-from", str(start), "--wise-alphas", "0,0.5", "--wise-tolerance", "0.99")
    record = json.loads((output / "best" / "checkpoint.json").read_text(encoding="utf-8"))["wise_ft"]
    assert record["alpha"] == 0 and str(start) in record["toward"] and [row["alpha"] for row in record["candidates"]] == [0, 0.5, 1]
    started, now = load_file(start / "adapter_model.safetensors"), load_file(output / "best" / "adapter_model.safetensors")
    assert started.keys() == now.keys() and all(torch.allclose(started[name], now[name]) for name in started)
    fine_tuned = load_file(output / "best_finetuned" / "adapter_model.safetensors")
    assert not all(torch.allclose(started[name], fine_tuned[name]) for name in started)


def test_init_from_a_lora_checkpoint_twice_saves_each_head_module_once(trained, tiny_models, weibo_csv, human_txt, tmp_path):
    start = trained("lora")[0] / "best"
    for name in ("once", "twice"):
        train("lora", tiny_models["gpt2"], weibo_csv, tmp_path / name, "--human-data", str(human_txt), "--distant-share", "0",
              "--epochs", "1", "--init-from", str(start))
        start = tmp_path / name / "best"
    saved = json.loads((start / "adapter_config.json").read_text(encoding="utf-8"))["modules_to_save"]
    assert sorted(saved) == sorted(set(saved)) and "score" in saved


def test_init_from_refuses_another_method_and_contradicting_flags(trained, tiny_models, weibo_csv, human_txt, tmp_path):
    lora = trained("lora")[0] / "best"
    with pytest.raises(UserError, match="a lora checkpoint; adapter_tuning/train.py starts only from adapter_tuning ones"):
        train("adapter_tuning", tiny_models["gpt2"], weibo_csv, tmp_path / "a", "--init-from", str(lora))
    adapter = trained("adapter_tuning")[0] / "best"
    with pytest.raises(UserError, match="--adapter-size 8 .the checkpoint has"):
        train("adapter_tuning", tiny_models["gpt2"], weibo_csv, tmp_path / "b", "--init-from", str(adapter), "--adapter-size", "8")
    result = run_script(REPO_ROOT / "adapter_tuning" / "train.py", "--init-from", str(tmp_path / "missing"), "--output-dir", str(tmp_path / "c"))
    assert result.returncode == 2 and "no checkpoint of this toolkit there" in result.stderr


def test_distant_share_out_of_range_is_refused_before_any_work(tiny_models, weibo_csv, tmp_path):
    with pytest.raises(UserError, match=r"--distant-share 1.5 \(DISTANT_SHARE\): out of range"):
        train("adapter_tuning", tiny_models["gpt2"], weibo_csv, tmp_path / "x", "--distant-share", "1.5")
