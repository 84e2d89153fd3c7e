import pytest

from weibo_senti.data import (
    DataError, EncodedTexts, load_labelled_csv, make_collate, read_csv_text, split_train_val, strip_emoticons,
)
from weibo_senti.models import load_tokenizer


def write(tmp_path, text, name="data.csv", encoding="utf-8"):
    path = tmp_path / name
    path.write_bytes(text.encode(encoding))
    return path


def test_missing_file_names_the_file_the_public_source_and_the_flag(tmp_path):
    with pytest.raises(DataError) as error:
        load_labelled_csv(tmp_path / "nowhere.csv")
    message = str(error.value)
    assert "nowhere.csv" in message and "weibo_senti_100k" in message
    assert "--data" in message and "WEIBO_SENTI_DATA" in message


def test_not_utf8_names_the_line(tmp_path):
    path = write(tmp_path, "label,review\n1,很好[哈哈]\n0,太差了[泪]\n", encoding="gbk")
    with pytest.raises(DataError, match=r"not UTF-8 text \(line 2"):
        load_labelled_csv(path)


def test_missing_column_lists_what_is_there(tmp_path):
    path = write(tmp_path, "label,text\n1,很好\n")
    with pytest.raises(DataError, match=r"missing column\(s\) review; the header is label, text"):
        load_labelled_csv(path)


def test_rows_with_bad_labels_are_dropped_and_reported_by_row(tmp_path):
    path = write(tmp_path, "label,review\n1,好[哈哈]\n2,怪\npositive,好啊\n0,差[泪]\n")
    table, report = load_labelled_csv(path)
    assert sorted(table["review"]) == ["好[哈哈]", "差[泪]"]
    assert "2 rows whose column 'label' is not 0 or 1" in str(report)
    assert "rows 3, 4" in str(report)


def test_empty_and_nan_reviews_are_dropped(tmp_path):
    path = write(tmp_path, "label,review\n1,好[哈哈]\n0,\n1,NaN\n0,   \n0,差[泪]\n")
    table, report = load_labelled_csv(path)
    assert len(table) == 2
    assert "3 rows with an empty or NaN 'review': rows 3, 4, 5" in str(report)


def test_leading_bom_in_file_and_in_reviews_is_removed(tmp_path):
    path = write(tmp_path, "\ufefflabel,review\n1,\ufeff好[哈哈]\n0,差[泪]\n")
    table, report = load_labelled_csv(path)
    assert list(table.columns) == ["row", "label", "review"]
    assert table["review"].tolist() == ["好[哈哈]", "差[泪]"]
    assert "BOM (U+FEFF) from column 'review' in rows 2" in str(report)


def test_same_text_with_both_labels_is_dropped_and_repeats_are_kept_once(tmp_path):
    path = write(tmp_path, "label,review\n1,一样\n0,一样\n1,好[哈哈]\n1,好[哈哈]\n0,差[泪]\n")
    table, report = load_labelled_csv(path)
    assert table["review"].tolist() == ["好[哈哈]", "差[泪]"]
    assert "2 rows whose 'review' text also appears with the other label (1 texts): rows 2, 3" in str(report)
    assert "1 rows repeating an earlier row" in str(report)


def test_nothing_usable_left_stops(tmp_path):
    path = write(tmp_path, "label,review\n5,好\n0,\n")
    with pytest.raises(DataError, match="no usable rows left"):
        load_labelled_csv(path)


def test_one_class_only_stops(tmp_path):
    path = write(tmp_path, "label,review\n1,好\n1,棒\n")
    with pytest.raises(DataError, match="both 0 and 1 are needed"):
        load_labelled_csv(path)


def test_split_is_stratified_seeded_and_subsets_on_request(weibo_csv):
    table, _ = load_labelled_csv(weibo_csv)
    train, val = split_train_val(table, 0.1, seed=42)
    again_train, again_val = split_train_val(table, 0.1, seed=42)
    assert val["review"].tolist() == again_val["review"].tolist()
    assert len(val) == 40 and val["label"].sum() == 20
    assert not set(train["review"]) & set(val["review"])
    small_train, small_val = split_train_val(table, 0.1, seed=42, max_samples=100)
    assert (len(small_train), len(small_val)) == (90, 10) and small_val["label"].sum() == 5
    assert set(small_train["review"]) <= set(train["review"]) and set(small_val["review"]) <= set(val["review"])


def test_strip_emoticons_removes_tags_only():
    assert strip_emoticons("今天好开心[哈哈][爱你]，[ok]明天见[") == "今天好开心，明天见["


def test_batches_are_padded_to_their_own_longest_text(tiny_models):
    tokenizer = load_tokenizer(tiny_models["bert"])
    dataset = EncodedTexts(["好", "今天天气好开心"], [1, 1], tokenizer, max_length=128)
    batch = make_collate(tokenizer.pad_token_id)([dataset[0], dataset[1]])
    assert batch["input_ids"].shape == (2, 9)  # 7 characters + [CLS] + [SEP], not 128
    assert batch["attention_mask"][0].tolist() == [1, 1, 1] + [0] * 6
    assert (batch["input_ids"][0, 3:] == tokenizer.pad_token_id).all()


def test_emoticon_drop_shows_texts_without_tags_at_the_given_rate(tiny_models):
    import random

    tokenizer = load_tokenizer(tiny_models["bert"])
    texts = ["好开心[哈哈]"] * 400
    never = EncodedTexts(texts, [1] * 400, tokenizer, 128)
    half = EncodedTexts(texts, [1] * 400, tokenizer, 128, emoticon_drop=0.5)
    full_length, stripped_length = len(never[0]["input_ids"]), len(tokenizer("好开心")["input_ids"])
    assert {len(never[i]["input_ids"]) for i in range(400)} == {full_length}
    random.seed(0)
    lengths = [len(half[i]["input_ids"]) for i in range(400)]
    assert set(lengths) == {full_length, stripped_length}
    assert 150 < lengths.count(stripped_length) < 250


def test_length_grouped_batches_cover_every_text_once_and_group_similar_lengths():
    import torch

    from weibo_senti.data import LengthGroupedBatches

    lengths = [(i * 37) % 128 + 1 for i in range(1000)]
    sampler = LengthGroupedBatches(lengths, batch_size=10, window=5)
    torch.manual_seed(1)
    batches = list(sampler)
    torch.manual_seed(1)
    assert list(sampler) == batches  # the epoch seed alone decides the batches
    assert len(batches) == len(sampler) == 100
    assert sorted(i for batch in batches for i in batch) == list(range(1000))
    spread = sum(max(lengths[i] for i in b) - min(lengths[i] for i in b) for b in batches) / len(batches)
    assert spread < 30  # random batches of 10 would spread about 100


def test_a_quote_left_open_is_said_with_its_row(tmp_path, capsys):
    path = tmp_path / "q.csv"
    path.write_text('label,review\n1,"好开心\n0,难过\n1,真棒"\n0,下雨了\n', encoding="utf-8")
    table = read_csv_text(path)
    assert len(table) == 2  # legal CSV: read as it stands, but not silently
    assert "row 2, column 'review' holds 2 line(s) that read as rows of their own" in capsys.readouterr().err
