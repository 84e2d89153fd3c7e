import torch
from transformers import AutoModelForSequenceClassification

from adapter_tuning import adapter
from adapter_tuning.adapter import AdapterLayer, GPT2BlockWithAdapter
from weibo_senti.models import load_tokenizer

SETTINGS = {"adapter_size": 16}


def build(tiny_models):
    tokenizer = load_tokenizer(tiny_models["gpt2"])
    torch.manual_seed(0)
    return adapter.build(tiny_models["gpt2"], tokenizer, SETTINGS), tokenizer


def test_wrapped_model_at_init_gives_the_base_models_logits(tiny_models):
    model, tokenizer = build(tiny_models)
    base = AutoModelForSequenceClassification.from_pretrained(tiny_models["gpt2"], num_labels=2, pad_token_id=tokenizer.pad_token_id)
    base.score.load_state_dict(model.score.state_dict())
    batch = tokenizer(["今天好开心[哈哈]", "难过"], padding=True, return_tensors="pt", return_token_type_ids=False)
    model.eval(), base.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(**batch).logits, base(**batch).logits, atol=1e-4, rtol=0)


def test_every_block_is_wrapped_and_only_adapters_and_head_train(tiny_models):
    model, _ = build(tiny_models)
    assert all(isinstance(block, GPT2BlockWithAdapter) for block in model.transformer.h)
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".adapter." in name or name.startswith("score.") for name in trainable)
    assert "score.weight" in trainable
    assert sum(".adapter." in name for name in trainable) == 4 * len(model.transformer.h)  # down/up weight and bias


def test_adapter_layer_is_a_residual_bottleneck():
    layer = AdapterLayer(hidden_size=8, adapter_size=2)
    x = torch.randn(3, 8)
    expected = x + layer.up(torch.relu(layer.down(x)))
    torch.testing.assert_close(layer(x), expected)
    assert layer.up.weight.abs().max() < 1e-3  # near-identity at the start


def test_block_wrapper_accepts_tuple_outputs_of_older_transformers():
    class OldBlock(torch.nn.Module):
        def forward(self, hidden_states, **kwargs):
            return (hidden_states * 2, "present")

    wrapped = GPT2BlockWithAdapter(OldBlock(), hidden_size=4, adapter_size=2)
    hidden, present = wrapped(torch.ones(1, 2, 4))
    assert present == "present"
    torch.testing.assert_close(hidden, wrapped.adapter(torch.full((1, 2, 4), 2.0)))


def test_a_half_precision_base_is_trained_in_float32(tiny_models, tmp_path):
    from weibo_senti import lora

    half = tmp_path / "half"
    AutoModelForSequenceClassification.from_pretrained(tiny_models["gpt2"], num_labels=2).half().save_pretrained(half)
    load_tokenizer(tiny_models["gpt2"]).save_pretrained(half)
    tokenizer = load_tokenizer(half)
    lora_settings = {"r": 4, "lora_alpha": 8, "lora_dropout": 0.0, "target_modules": ["c_attn"]}
    for model in (adapter.build(half, tokenizer, SETTINGS), lora.build(half, tokenizer, lora_settings)):
        assert {p.dtype for p in model.parameters()} == {torch.float32}


def test_adapters_wrap_the_layers_of_a_bert_encoder_too(tiny_models):
    from adapter_tuning.adapter import BertLayerWithAdapter

    tokenizer = load_tokenizer(tiny_models["bert"])
    model = adapter.build(tiny_models["bert"], tokenizer, SETTINGS)
    assert all(isinstance(layer, BertLayerWithAdapter) for layer in model.bert.encoder.layer)
    trainable = {name.split(".")[0] if not ".adapter." in name else "adapter" for name, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"adapter", "classifier", "bert"}  # bert: its pooler, missing from a masked-LM checkpoint
    assert all(".adapter." in name or ".pooler." in name or name.startswith("classifier.")
               for name, p in model.named_parameters() if p.requires_grad)
    batch = tokenizer(["今天好开心[哈哈]", "难过"], padding=True, return_tensors="pt")
    assert model(**batch).logits.shape == (2, 2)
