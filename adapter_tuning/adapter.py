"""Bottleneck adapters after every GPT-2 block; the base model stays frozen, adapters and the score head train."""
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from weibo_senti import UserError
from weibo_senti.models import load_base_classifier

WEIGHTS_FILE = "adapter_model.safetensors"


class AdapterLayer(nn.Module):
    """x + up(relu(down(x))). The up-projection starts near zero, so a fresh adapter is almost the identity."""

    def __init__(self, hidden_size, adapter_size):
        super().__init__()
        self.down = nn.Linear(hidden_size, adapter_size)
        self.up = nn.Linear(adapter_size, hidden_size)
        nn.init.normal_(self.down.weight, std=0.02)
        nn.init.zeros_(self.down.bias)
        nn.init.normal_(self.up.weight, std=1e-4)
        nn.init.zeros_(self.up.bias)

    def forward(self, hidden_states):
        return hidden_states + self.up(torch.relu(self.down(hidden_states)))


class GPT2BlockWithAdapter(nn.Module):
    """A GPT2Block followed by an AdapterLayer on its hidden states."""

    def __init__(self, block, hidden_size, adapter_size):
        super().__init__()
        self.block = block
        self.adapter = AdapterLayer(hidden_size, adapter_size)

    def forward(self, hidden_states, *args, **kwargs):
        output = self.block(hidden_states, *args, **kwargs)
        if isinstance(output, tuple):  # transformers 4.x returns (hidden_states, present, attentions...)
            return (self.adapter(output[0]),) + output[1:]
        return self.adapter(output)  # transformers 5.x returns the hidden states alone


def settings(cfg):
    return {"adapter_size": cfg.adapter_size}


def _trainable_names(model):
    return {name for name, parameter in model.named_parameters() if parameter.requires_grad}


def build(base_path, tokenizer, settings, weights_from=None):
    model, not_in_base = load_base_classifier(base_path, tokenizer)
    if model.config.model_type != "gpt2":
        raise UserError(f"adapter tuning wraps GPT-2 blocks; {base_path} is a {model.config.model_type} model")
    for parameter in model.parameters():
        parameter.requires_grad = False
    hidden_size = model.config.hidden_size
    blocks = model.transformer.h
    for index in range(len(blocks)):
        blocks[index] = GPT2BlockWithAdapter(blocks[index], hidden_size, settings["adapter_size"])
    for name in ["score", *not_in_base]:
        for parameter in model.get_submodule(name).parameters():
            parameter.requires_grad = True
    if weights_from is not None:
        weights = load_file(weights_from / WEIGHTS_FILE)
        expected = _trainable_names(model)
        if set(weights) != expected:
            raise ValueError(
                f"{weights_from / WEIGHTS_FILE} does not match adapter size {settings['adapter_size']} on {base_path}: "
                f"missing {sorted(expected - set(weights))[:3]}, unexpected {sorted(set(weights) - expected)[:3]}"
            )
        model.load_state_dict(weights, strict=False)
    return model


def save(model, directory):
    trainable = _trainable_names(model)
    weights = {name: tensor.detach().contiguous().cpu() for name, tensor in model.state_dict().items() if name in trainable}
    save_file(weights, directory / WEIGHTS_FILE, metadata={"format": "pt"})
