"""lorakit on a wide set of transformers architectures, tiny configs built in code.

Beyond the Llama, GPT-2, BERT and RoBERTa of the detailed tests: decoder-only models with fused
projections (Phi-3's qkv_proj, Falcon's query_key_value and its nn.Linear subclass), OPT (whose
MLP sees the batch flattened to rows × tokens), encoder-decoders (T5, BART), an image model (ViT)
and others. For each: the adapted model starts equal to the base, disabling gives the base
exactly, PEFT loads lorakit's adapter file and computes the same output (the independent
reference), merging keeps the output, QLoRA's base computes what its dequantized weights do, and
a mixed-adapter batch equals each row run alone, on both mixed-batch paths; for the generating
models, mixed-batch generation with the KV cache equals each row's own, and training in a mixed
batch gives gradient only to the adapters its rows use.
"""

from __future__ import annotations

import copy

import pytest
import torch
import transformers as tf

import lorakit
from lorakit import LoraConfig
from lorakit.layers import LoraLayer
from lorakit.quant import dequantize
from tiny_models import each_row_alone, randomise

VOCAB = 100
DECODER = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64)
GQA = dict(**DECODER, vocab_size=VOCAB, num_key_value_heads=2)
SEQ2SEQ = dict(
    d_model=32,
    encoder_layers=1,
    decoder_layers=1,
    encoder_attention_heads=4,
    decoder_attention_heads=4,
    encoder_ffn_dim=64,
    decoder_ffn_dim=64,
    vocab_size=VOCAB,
)
MODELS = {
    "qwen2": lambda: tf.Qwen2ForCausalLM(tf.Qwen2Config(**GQA)),
    "qwen3": lambda: tf.Qwen3ForCausalLM(tf.Qwen3Config(**GQA, head_dim=8)),
    "mistral": lambda: tf.MistralForCausalLM(tf.MistralConfig(**GQA)),
    "gemma": lambda: tf.GemmaForCausalLM(tf.GemmaConfig(**GQA, head_dim=8)),
    "gemma2": lambda: tf.Gemma2ForCausalLM(tf.Gemma2Config(**GQA, head_dim=8)),
    "phi3": lambda: tf.Phi3ForCausalLM(tf.Phi3Config(**GQA, pad_token_id=0)),
    "falcon": lambda: tf.FalconForCausalLM(
        tf.FalconConfig(
            hidden_size=32, num_hidden_layers=2, num_attention_heads=4, vocab_size=VOCAB
        )
    ),
    "gpt_neox": lambda: tf.GPTNeoXForCausalLM(tf.GPTNeoXConfig(**DECODER, vocab_size=VOCAB)),
    "opt": lambda: tf.OPTForCausalLM(
        tf.OPTConfig(
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=4,
            ffn_dim=64,
            vocab_size=VOCAB,
            word_embed_proj_dim=32,
        )
    ),
    "t5": lambda: tf.T5ForConditionalGeneration(
        tf.T5Config(
            d_model=32,
            d_ff=64,
            num_layers=2,
            num_heads=4,
            d_kv=8,
            vocab_size=VOCAB,
            decoder_start_token_id=0,
        )
    ),
    "bart": lambda: tf.BartForConditionalGeneration(tf.BartConfig(**SEQ2SEQ)),
    "distilbert": lambda: tf.DistilBertForSequenceClassification(
        tf.DistilBertConfig(dim=32, n_layers=2, n_heads=4, hidden_dim=64, vocab_size=VOCAB)
    ),
    "vit": lambda: tf.ViTForImageClassification(
        tf.ViTConfig(**DECODER, image_size=16, patch_size=8, num_labels=3)
    ),
}
CONFIG = LoraConfig(r=4, alpha=8, target_modules="all-linear")
ROWS = 3


def inputs(name: str) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    if name == "vit":
        return {"pixel_values": torch.randn(ROWS, 3, 16, 16, generator=gen)}
    ids = torch.randint(3, VOCAB, (ROWS, 7), generator=gen)
    if name in ("t5", "bart"):
        return {"input_ids": ids, "decoder_input_ids": ids[:, :5]}
    return {"input_ids": ids}


def logits(model, kwargs) -> torch.Tensor:
    with torch.no_grad():
        return model(**kwargs).logits


def two_adapters(model):
    """``model`` with adapters "a" (CONFIG) and "b" (rank 2, every linear layer), randomised."""
    lorakit.apply_lora(model, CONFIG, "a")
    lorakit.apply_lora(model, LoraConfig(r=2, alpha=3, target_modules="all-linear"), "b")
    return randomise(model)


@pytest.fixture(params=sorted(MODELS))
def case(request):
    name = request.param
    return name, MODELS[name]().eval(), inputs(name)


def test_adapter_round_trip_through_peft(case, tmp_path):
    peft = pytest.importorskip("peft")
    name, base, kwargs = case
    expected = logits(base, kwargs)
    model = lorakit.apply_lora(copy.deepcopy(base), CONFIG)
    assert torch.equal(logits(model, kwargs), expected), "not equal to the base at init"
    randomise(model)
    adapted = logits(model, kwargs)
    assert not torch.allclose(adapted, expected)
    with lorakit.disable_adapters(model):
        assert torch.equal(logits(model, kwargs), expected)
    lorakit.save_adapter(model, tmp_path)
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path).eval()
    torch.testing.assert_close(logits(theirs, kwargs), adapted)
    merged = lorakit.merge_and_unload(model)
    assert not any(isinstance(m, LoraLayer) for m in merged.modules())
    torch.testing.assert_close(logits(merged, kwargs), adapted)


def test_quantized_base_computes_its_dequantized_weights(case):
    name, base, kwargs = case
    quantized = lorakit.quantize(copy.deepcopy(base))
    reference = dequantize(copy.deepcopy(quantized))
    torch.testing.assert_close(logits(quantized, kwargs), logits(reference, kwargs))


@pytest.mark.parametrize("grouped_max", [4, 0], ids=["grouped", "stacked"])
def test_mixed_batch_rows_equal_each_row_alone(case, grouped_max, monkeypatch):
    monkeypatch.setattr(LoraLayer, "GROUPED_MAX_ADAPTERS", grouped_max)
    name, base, kwargs = case
    model = two_adapters(copy.deepcopy(base))
    names = ["a", None, "b"]
    with lorakit.adapter_per_row(model, names):
        mixed = logits(model, kwargs)
    alone = each_row_alone(
        model, names, lambda i: logits(model, {k: v[i : i + 1] for k, v in kwargs.items()})
    )
    for i, row in enumerate(alone):
        torch.testing.assert_close(mixed[i : i + 1], row)


GENERATES = sorted(set(MODELS) - {"distilbert", "vit"})


@pytest.mark.parametrize("name", GENERATES)
def test_mixed_batch_generation_equals_each_row_alone(name):
    """Greedy generation with the KV cache: prefill and every decoding step take each row's
    adapter, so each row's tokens are the ones it generates alone."""
    model = two_adapters(MODELS[name]().eval())
    ids = inputs(name)["input_ids"]
    options = dict(max_new_tokens=5, min_new_tokens=5, do_sample=False, pad_token_id=0)
    names = ["a", None, "b"]
    with torch.no_grad(), lorakit.adapter_per_row(model, names):
        mixed = model.generate(ids, **options)
    with torch.no_grad():
        alone = each_row_alone(model, names, lambda i: model.generate(ids[i : i + 1], **options))
    for i, row in enumerate(alone):
        assert torch.equal(mixed[i : i + 1], row), f"row {i} ({names[i]})"


@pytest.mark.parametrize("name", GENERATES)
def test_mixed_batch_training_gives_gradient_only_to_the_rows_adapters(name):
    model = two_adapters(MODELS[name]().train())
    kwargs = inputs(name)
    labels = kwargs.get("decoder_input_ids", kwargs["input_ids"]).contiguous()
    with lorakit.adapter_per_row(model, ["a", None, "a"]):
        model(**kwargs, labels=labels).loss.backward()
    used = [p.grad for p in lorakit.adapter_parameters(model, "a")]
    unused = [p.grad for p in lorakit.adapter_parameters(model, "b")]
    assert all(g is not None for g in used) and any(bool(g.abs().sum()) for g in used)
    assert all(g is None or not bool(g.abs().sum()) for g in unused)


def test_plan_on_the_meta_device_counts_what_peft_adds(case):
    peft = pytest.importorskip("peft")
    name, base, _ = case
    with torch.device("meta"):
        planned = lorakit.plan(MODELS[name](), CONFIG)
    ours = lorakit.count_parameters(lorakit.apply_lora(copy.deepcopy(base), CONFIG))[0]
    config = peft.LoraConfig(r=CONFIG.r, lora_alpha=CONFIG.alpha, target_modules="all-linear")
    theirs = peft.get_peft_model(copy.deepcopy(base), config)
    assert (
        planned.trainable == ours == sum(p.numel() for p in theirs.parameters() if p.requires_grad)
    )


def test_a_peft_adapter_file_loads_to_the_same_output(case, tmp_path):
    """The other direction: PEFT writes (rsLoRA scaling, random A and B), lorakit reads."""
    peft = pytest.importorskip("peft")
    name, base, kwargs = case
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", use_rslora=True)
    theirs = peft.get_peft_model(copy.deepcopy(base), config)
    gen = torch.Generator().manual_seed(4)
    with torch.no_grad():
        for key, p in theirs.named_parameters():
            if "lora_" in key:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.2)
    theirs.eval().save_pretrained(tmp_path)
    ours = lorakit.load_adapter(copy.deepcopy(base), tmp_path)
    torch.testing.assert_close(logits(ours, kwargs), logits(theirs, kwargs))
