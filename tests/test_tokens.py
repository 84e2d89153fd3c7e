"""Issue 45: texts to model inputs without transformers' list-to-tensor conversion, batches by token budget, and the
batch and queue settings chosen by the device."""
import numpy as np
import pytest
import torch

import tiny
from weibo_senti import cli, predict, tokens
from weibo_senti.models import load_tokenizer


@pytest.fixture(scope="module")
def tokenizer(tiny_models):
    return load_tokenizer(tiny_models["bert"])


TEXTS = [text for _, text in tiny.synthetic_rows(60, seed=3)] + ["好" * 300, "", "坏"]


def test_the_encoder_gives_the_tokenizers_own_ids_whatever_the_tokenizer_was_last_asked(tokenizer):
    encoder = tokens.TextEncoder(tokenizer, 16)
    expected = tokenizer(TEXTS, truncation=True, max_length=16)["input_ids"]
    assert [ids.tolist() for ids in encoder.encode(TEXTS)] == expected
    tokenizer(TEXTS[:3], truncation=True, max_length=5, padding="max_length")  # leaves its own settings in the Rust core
    assert [ids.tolist() for ids in encoder.encode(TEXTS)] == expected
    assert tokenizer(TEXTS, truncation=True, max_length=16)["input_ids"] == expected  # and ours leave none in its way


def test_batches_by_count_or_by_token_budget_hold_every_text_once_sorted_by_length():
    lengths = [5, 1, 9, 3, 3, 7, 2, 8, 30]
    by_count = tokens.plan_batches(lengths, 4)
    assert [len(b) for b in by_count] == [4, 4, 1] and sorted(np.concatenate(by_count)) == list(range(9))
    by_tokens = tokens.plan_batches(lengths, 4, batch_tokens=16, pad_to_multiple_of=2)
    assert sorted(np.concatenate(by_tokens)) == list(range(9))
    for batch in by_tokens:
        longest = -(-max(lengths[i] for i in batch) // 2) * 2
        assert len(batch) == 1 or len(batch) * longest <= 16
    flat = [lengths[i] for batch in by_tokens for i in batch]
    assert flat == sorted(flat) and by_tokens[-1].tolist() == [8]  # one text longer than the budget goes alone


def test_padding_and_the_mask_match_the_rows():
    input_ids, mask = tokens.pad([np.array([5, 6, 7]), np.array([8])], pad_token_id=0, pad_to_multiple_of=4)
    assert input_ids.tolist() == [[5, 6, 7, 0], [8, 0, 0, 0]] and mask.tolist() == [[1, 1, 1, 0], [1, 0, 0, 0]]
    assert input_ids.dtype == np.int64 and mask.dtype == np.int64


@pytest.mark.parametrize("window", [None, 7])
def test_every_text_comes_out_once_at_its_position(tokenizer, window):
    encoder = tokens.TextEncoder(tokenizer, 32)
    seen = []
    for positions, input_ids, mask in tokens.to_device(tokens.batches(TEXTS, encoder, 8, 0, 1, window), torch.device("cpu")):
        assert isinstance(input_ids, torch.Tensor) and input_ids.shape == mask.shape == (len(positions), input_ids.shape[1])
        for row, position in enumerate(positions):
            expected = encoder.encode([TEXTS[position]])[0].tolist()
            assert input_ids[row, : len(expected)].tolist() == expected and int(mask[row].sum()) == len(expected)
        seen += positions.tolist()
    assert sorted(seen) == list(range(len(TEXTS)))


def test_a_failure_while_batches_are_made_ahead_reaches_the_caller():
    def broken():
        yield np.arange(1), np.zeros((1, 1), dtype=np.int64), np.ones((1, 1), dtype=np.int64)
        raise ValueError("bad batch")

    if not torch.cuda.is_available():  # the thread is for GPUs; on a CPU the error passes straight through
        with pytest.raises(ValueError, match="bad batch"):
            list(tokens.to_device(broken(), torch.device("cpu")))


def test_a_token_budget_gives_the_same_probabilities_as_batches_by_count(classifier):
    texts = TEXTS[:-2]
    by_count = classifier.probabilities(texts, batch_size=8)
    classifier.batch_tokens = 64
    try:
        by_tokens = classifier.probabilities(texts, batch_size=8)
    finally:
        classifier.batch_tokens = 0
    assert by_tokens == pytest.approx(by_count, abs=2e-3)  # bf16 on a bf16 CPU: other batches, other roundings
    assert (by_tokens.argmax(1) == by_count.argmax(1)).mean() >= 0.95


def test_on_a_cpu_the_scripts_keep_their_constants_and_say_so():
    import score

    cfg = cli.parse_config(vars(score), ["--input", "x.csv", "--backend", "onnx"])
    line = predict.fit_to_device(cfg)
    assert (cfg.batch_size, cfg.batch_tokens, cfg.chunk_rows) == (64, 0, 2000)
    assert line == "device: CPU batches and queue: --batch-size 64, --batch-tokens 0, --chunk-rows 2000"


def test_on_a_gpu_settings_not_given_take_the_gpus_values(monkeypatch):
    import serve

    monkeypatch.setattr(predict, "prediction_device", lambda backend: torch.device("cuda"))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Test GPU")
    cfg = cli.parse_config(vars(serve), ["--max-queue", "100"])
    line = predict.fit_to_device(cfg)
    assert cfg.max_queue == 100 and cfg.max_batch_size == predict.GPU_SETTINGS["max_batch_size"]
    assert cfg.batch_tokens == predict.GPU_SETTINGS["batch_tokens"] and cfg.forward_batch_size == 16
    assert line.startswith("device: GPU (Test GPU): where not given, the GPU's batches and queue:") and "--max-queue 100" in line
