"""The original BettaFish scripts' approach, on our model, for the benchmark to measure against.

What they did, kept here on purpose: each text is tokenized in the Dataset's __getitem__ and padded to 128 tokens,
prediction runs one text at a time, and the checkpoint is the whole model's state_dict (torch.save).
"""
import torch


class PaddedDataset(torch.utils.data.Dataset):
    def __init__(self, texts, labels, tokenizer, max_length=128):
        self.texts, self.labels, self.tokenizer, self.max_length = list(texts), list(labels), tokenizer, max_length

    def __len__(self):
        return len(self.texts)

    def __getitem__(self, index):
        encoded = self.tokenizer(
            self.texts[index], padding="max_length", truncation=True, max_length=self.max_length, return_tensors="pt"
        )
        return {
            "input_ids": encoded["input_ids"].squeeze(0),
            "attention_mask": encoded["attention_mask"].squeeze(0),
            "labels": torch.tensor(self.labels[index]),
        }


def predict_one(model, tokenizer, text, max_length=128):
    encoded = tokenizer(text, padding="max_length", truncation=True, max_length=max_length, return_tensors="pt")
    with torch.no_grad():
        logits = model(input_ids=encoded["input_ids"], attention_mask=encoded["attention_mask"]).logits
    return torch.softmax(logits, dim=-1)[0]


def save_checkpoint(model, path):
    torch.save(model.state_dict(), path)
