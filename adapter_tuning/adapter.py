"""Bottleneck adapters after every transformer block (GPT-2 blocks, or the layers of a BERT-family encoder); the base
model stays frozen, adapters and the classification head train."""
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from weibo_senti import UserError
from weibo_senti.checkpoint import require_files
from weibo_senti.models import HEAD_MODULES, load_base_classifier

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


class BertLayerWithAdapter(GPT2BlockWithAdapter):
    """The same wrapper around a layer of a BERT-family encoder (BertLayer, and the like)."""


def _blocks(model):
    """(the list of transformer blocks to wrap, the wrapper class) for a GPT-2 or BERT-family classifier."""
    if model.config.model_type == "gpt2":
        return model.transformer.h, GPT2BlockWithAdapter
    encoder = getattr(model.base_model, "encoder", None)
    if encoder is not None and isinstance(getattr(encoder, "layer", None), nn.ModuleList):
        return encoder.layer, BertLayerWithAdapter
    raise UserError(
        f"adapter tuning wraps GPT-2 blocks or the layers of a BERT-family encoder; this is a {model.config.model_type} model"
    )


def settings(cfg):
    return {"adapter_size": cfg.adapter_size}


def check(model, settings):
    """Before any work: the model has blocks this method can wrap (UserError otherwise)."""
    _blocks(model)


def _trainable_names(model):
    return {name for name, parameter in model.named_parameters() if parameter.requires_grad}


def build(base_path, tokenizer, settings, weights_from=None):
    model, not_in_base = load_base_classifier(base_path, tokenizer, settings)
    blocks, wrapper = _blocks(model)
    for parameter in model.parameters():
        parameter.requires_grad = False
    for index in range(len(blocks)):
        blocks[index] = wrapper(blocks[index], model.config.hidden_size, settings["adapter_size"])
    for name in [*(head for head in HEAD_MODULES if hasattr(model, head)), *not_in_base]:
        for parameter in model.get_submodule(name).parameters():
            parameter.requires_grad = True
    if weights_from is not None:
        require_files(weights_from, WEIGHTS_FILE)
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
