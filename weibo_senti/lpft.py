"""Keep what the pretrained encoder knows.

LP-FT (Kumar et al., ICLR 2022): before fine-tuning, fit the classification head on the frozen model's features (a
linear probe, a logistic regression), so that fine-tuning starts from a head that already fits and distorts the
pretrained features less. WiSE-FT (Wortsman et al., CVPR 2022): after it, move back toward the linear-probe model by a
factor alpha: the update of each adapter or LoRA layer is scaled by alpha (its last projection, adapter `up` and
`lora_B`, times alpha) and every other trained tensor (the head) is interpolated, probe + alpha * (fine-tuned - probe).
A run that started from a trained classifier (--init-from) moves back toward it instead: every trained tensor is
interpolated, start + alpha * (fine-tuned - start), so alpha 0 is that classifier, which new labels must not make forget
all it knew. alpha is chosen on the texts that chose the epoch by a rule that favours the start; the weights are saved
with alpha applied, so the checkpoint loads, merges and exports like any other, and checkpoint.json keeps alpha.
"""
import numpy as np
import torch
from safetensors.torch import load_file, save_file
from sklearn.linear_model import LogisticRegression
from torch.utils.data import DataLoader, Subset
from tqdm.auto import tqdm

from . import UserError
from .models import HEAD_MODULES

PROBE_FILE = "linear_probe.safetensors"  # in OUTPUT_DIR: the trained tensors as fine-tuning started (the probe's, or
# the --init-from classifier's), for WiSE-FT
UPDATE_ENDS = (".lora_B.", ".adapter.up.")  # the tensors whose output is an adapter's or a LoRA layer's whole update


def parse_alphas(text):
    """'0,0.25,0.5' -> [0.0, 0.25, 0.5, 1.0] (the fine-tuned model, alpha 1, is always a candidate)."""
    try:
        alphas = sorted({float(value) for value in str(text).split(",") if value.strip()} | {1.0})
    except ValueError:
        raise UserError(f"--wise-alphas {text} (WISE_ALPHAS): comma-separated numbers between 0 and 1 are expected") from None
    if not all(0 <= alpha <= 1 for alpha in alphas):
        raise UserError(f"--wise-alphas {text} (WISE_ALPHAS): every alpha must be between 0 and 1")
    return alphas


def trainable_tensors(model):
    return {name: parameter for name, parameter in model.named_parameters() if parameter.requires_grad}


def _head(model):
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return next(getattr(base, name) for name in HEAD_MODULES if hasattr(base, name))


@torch.no_grad()
def head_inputs(model, loader, device):
    """The vectors the head reads (pooled, or for GPT-2 the last token's) and the labels, with the model in eval mode."""
    captured, features, labels = [], [], []
    hook = _head(model).register_forward_pre_hook(lambda module, args: captured.append(args[0].detach().float()))
    model.eval()
    try:
        for batch in tqdm(loader, desc="linear probe: features", leave=False):
            captured.clear()
            model(input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device))
            vectors = captured[0]
            if vectors.dim() == 3:  # GPT-2 scores every position and keeps the last text token (right padding)
                last = batch["attention_mask"].sum(dim=1) - 1
                vectors = vectors[torch.arange(len(last)), last.to(vectors.device)]
            features.append(vectors.cpu())
            labels.append(batch["labels"])
    finally:
        hook.remove()
    return torch.cat(features).numpy(), torch.cat(labels).numpy()


def fit_linear_probe(model, train_set, collate, texts, seed, batch_size, device):
    """Fit the head on the frozen model's features of `texts` training texts (drawn as training draws them, tags
    dropped alike), by logistic regression; returns its accuracy on those texts."""
    order = np.random.default_rng(seed).permutation(len(train_set))[:texts]
    loader = DataLoader(Subset(train_set, order.tolist()), batch_size=batch_size, collate_fn=collate)
    features, labels = head_inputs(model, loader, device)
    head = {name.rsplit(".", 1)[-1]: parameter for name, parameter in _head(model).named_parameters() if parameter.requires_grad}
    regression = LogisticRegression(max_iter=2000, fit_intercept="bias" in head).fit(features, labels)
    # two logits whose difference is the regression's score: softmax gives the regression's probabilities
    weight = torch.as_tensor(regression.coef_[0] / 2, dtype=torch.float32)
    head["weight"].data.copy_(torch.stack([-weight, weight]))
    if "bias" in head:
        bias = float(regression.intercept_[0]) / 2
        head["bias"].data.copy_(torch.tensor([-bias, bias]))
    return float(regression.score(features, labels))


def save_probe_state(model, path):
    save_file({name: tensor.detach().cpu().contiguous() for name, tensor in trainable_tensors(model).items()}, path)


def load_probe_state(path):
    if not path.is_file():
        raise UserError(f"--wise-alphas: {path} is missing; it is written when a run with --linear-probe or --init-from "
                        "starts, and WiSE-FT interpolates toward it")
    return load_file(path)


@torch.no_grad()
def interpolate(model, finetuned, probe, alpha, scale_updates=True):
    """Set the model's trained tensors to the WiSE-FT mix at `alpha` of the fine-tuned and the starting ones (`probe`);
    scale_updates=False for a start with trained adapters or LoRA layers, whose updates are interpolated too."""
    for name, parameter in trainable_tensors(model).items():
        if scale_updates and any(end in name for end in UPDATE_ENDS):
            parameter.copy_(alpha * finetuned[name])
        elif name in probe:
            parameter.copy_(probe[name] + alpha * (finetuned[name] - probe[name]))


def choose_alpha(candidates, tolerance, key="accuracy"):
    """The smallest alpha whose `key` (an accuracy without tags) is within `tolerance` of the best candidate's."""
    best = max(row[key] for row in candidates)
    return min(row["alpha"] for row in candidates if row[key] >= best - tolerance)
