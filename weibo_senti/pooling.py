"""Mean pooling for BERT-family classifiers (the e5 recipe): the head reads the mean of the last layer's token vectors
over the attention mask, as e5 was trained to be read, instead of BERT's pooler on [CLS] (which e5 does not have, so
it would start random). transformers has no option for it in BertForSequenceClassification, so a forward hook on the
encoder puts the mean where the head takes the pooled vector from; it holds no weights, and the classifier stays an
ordinary transformers model (save_pretrained, PEFT, merging and ONNX export work as before)."""
import torch


def mean_over_mask(hidden_states, attention_mask):
    """The mean of hidden_states [batch, tokens, hidden] over the tokens the mask keeps."""
    mask = attention_mask.unsqueeze(-1).to(hidden_states.dtype)
    return (hidden_states * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1.0)


def _mean_pooled_output(encoder, args, kwargs, output):
    mask = kwargs.get("attention_mask")
    if mask is None:
        mask = torch.ones(output.last_hidden_state.shape[:2], dtype=torch.long, device=output.last_hidden_state.device)
    # a new output with the mean second, where the classifier's forward reads it (outputs[1])
    others = {key: value for key, value in output.items() if key not in ("last_hidden_state", "pooler_output")}
    return type(output)(last_hidden_state=output.last_hidden_state, pooler_output=mean_over_mask(output.last_hidden_state, mask), **others)


def use_mean_pooling(model):
    """Make a BERT-family sequence classifier read the masked mean of its token vectors; its pooler is dropped."""
    encoder = model.base_model
    if not hasattr(encoder, "pooler"):
        raise ValueError(f"mean pooling replaces the pooler of a BERT-family encoder; a {model.config.model_type} model has none")
    encoder.pooler = None
    encoder.register_forward_hook(_mean_pooled_output, with_kwargs=True)
    model.config.classifier_pooling = "mean"
    return model
