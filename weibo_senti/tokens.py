"""Texts to model inputs at the accelerator's pace: the fast tokenizer's Rust core straight into arrays, length-sorted
batches by count or by token budget, padded with numpy, and on a GPU made ahead in a background thread into pinned
memory, so tokenizing the next batches overlaps the forward pass of this one.

transformers' tokenizer(..., return_tensors="pt") spent 9 of 11 s converting nested lists to tensors in a profile of
74,625 texts on a GPU machine (issue 45); the Rust core's encode_batch_fast returns ids we copy into one array."""
import queue
import threading

import numpy as np
import torch

WINDOW = 4096  # texts tokenized at a time when batches are made ahead: the first forward pass waits for one window only


class TextEncoder:
    """Token ids of texts, as a tokenizer(texts, truncation=True, max_length=...) call gives them, an array per text."""

    def __init__(self, tokenizer, max_length):
        self.tokenizer, self.max_length, self.pad_token_id = tokenizer, max_length, tokenizer.pad_token_id
        self.fast = getattr(tokenizer, "backend_tokenizer", None)  # None: a slow (Python) tokenizer

    def encode(self, texts):
        if self.fast is None:
            encoded = self.tokenizer(list(texts), truncation=True, max_length=self.max_length, return_attention_mask=False)
            return [np.asarray(ids, dtype=np.int64) for ids in encoded["input_ids"]]
        # the Rust core keeps the truncation and padding of its last call; transformers sets its own before each of its
        # calls, as these lines do (a copy of e5's core would cost 3 s of loading)
        if (self.fast.truncation or {}).get("max_length") != self.max_length or self.fast.truncation.get("stride") != 0 or \
                self.fast.truncation.get("strategy") != "longest_first" or self.fast.truncation.get("direction") != "right":
            self.fast.enable_truncation(self.max_length)
        if self.fast.padding is not None:
            self.fast.no_padding()
        encode = getattr(self.fast, "encode_batch_fast", self.fast.encode_batch)  # _fast: no character offsets (tokenizers >= 0.21)
        # one array per text, joined with np.concatenate when padded: measured 3x faster than np.fromiter over the lists
        return [np.asarray(encoding.ids, dtype=np.int64) for encoding in encode(list(texts))]


def plan_batches(lengths, batch_size, batch_tokens=0, pad_to_multiple_of=1):
    """Positions of the texts in each batch, by increasing length: `batch_size` texts each, or with batch_tokens > 0 as
    many as fit in batch_tokens padded tokens (at least one)."""
    order = np.argsort(np.asarray(lengths), kind="stable")
    if batch_tokens <= 0:
        return [order[start:start + batch_size] for start in range(0, len(order), batch_size)]
    batches, start = [], 0
    sorted_lengths = np.asarray(lengths)[order]
    while start < len(order):
        end = start + 1
        while end < len(order) and (end + 1 - start) * _padded(sorted_lengths[end], pad_to_multiple_of) <= batch_tokens:
            end += 1
        batches.append(order[start:end])
        start = end
    return batches


def _padded(length, multiple):
    return -(-int(length) // multiple) * multiple


def pad(rows, pad_token_id, pad_to_multiple_of=1):
    """(input_ids, attention_mask) as int64 arrays [len(rows), longest rounded up to the multiple]."""
    lengths = np.fromiter((len(row) for row in rows), dtype=np.int64, count=len(rows))
    mask = np.arange(_padded(lengths.max(), pad_to_multiple_of)) < lengths[:, None]
    input_ids = np.full(mask.shape, pad_token_id, dtype=np.int64)
    input_ids[mask] = np.concatenate(rows)
    return input_ids, mask.astype(np.int64)


def batches(texts, encoder, batch_size, batch_tokens=0, pad_to_multiple_of=1, window=None):
    """(positions, input_ids, attention_mask) per batch, every text once. window: tokenize this many texts at a time (by
    character length first), so batches start before all texts are tokenized; None: all at once."""
    texts = list(texts)
    if window is None or window >= len(texts):
        groups = [np.arange(len(texts))]
    else:
        by_characters = np.argsort(np.fromiter((len(text) for text in texts), dtype=np.int64, count=len(texts)), kind="stable")
        groups = [by_characters[start:start + window] for start in range(0, len(texts), window)]
    for group in groups:
        ids = encoder.encode([texts[i] for i in group])
        for batch in plan_batches([len(row) for row in ids], batch_size, batch_tokens, pad_to_multiple_of):
            yield (group[batch], *pad([ids[i] for i in batch], encoder.pad_token_id, pad_to_multiple_of))


def to_device(batch_iterator, device, ahead=4):
    """The batches as tensors on `device`. On a GPU a background thread makes the next `ahead` batches (tokenize, pad,
    pin) while the GPU computes, and copies them without blocking; on a CPU they are made when asked for."""
    if device.type != "cuda":
        for positions, input_ids, attention_mask in batch_iterator:
            yield positions, torch.from_numpy(input_ids), torch.from_numpy(attention_mask)
        return
    ready, done, stop = queue.Queue(maxsize=ahead), object(), threading.Event()

    def put(item):
        """Hand `item` over unless the consumer has stopped; False when it has."""
        while not stop.is_set():
            try:
                ready.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def produce():
        try:
            for positions, input_ids, attention_mask in batch_iterator:
                if not put((positions, torch.from_numpy(input_ids).pin_memory(), torch.from_numpy(attention_mask).pin_memory())):
                    return
            put(done)
        except BaseException as error:  # said where the batches are used, not lost in the thread
            put(error)

    worker = threading.Thread(target=produce, name="tokenize-ahead", daemon=True)
    worker.start()
    try:
        while (item := ready.get()) is not done:
            if isinstance(item, BaseException):
                raise item
            positions, input_ids, attention_mask = item
            yield positions, input_ids.to(device, non_blocking=True), attention_mask.to(device, non_blocking=True)
    finally:
        stop.set()
