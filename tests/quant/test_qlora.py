"""QLoRA: LoRA adapters on a quantized base, trained, merged and unloaded.

The reference for every adapted output is the same adapter on a float base holding the
dequantized weights: a LoRA layer on a quantized base must compute exactly what it computes on
that full-precision base (in the chosen compute dtype).
"""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from quant_models import LLAMA, tiny_llama
from torch import nn

import lorakit
from lorakit import LoraConfig
from lorakit.layers import AdapterRecord, LoraLinear
from lorakit.quant import (
    QuantizedWeight,
    QuantLinear,
    dequantize,
    quantize,
    requantization_errors,
)

pytest.importorskip("transformers")

CONFIG = LoraConfig(r=4, alpha=8, target_modules="all-linear")
LINEARS_PER_LAYER = 7  # q, k, v, o, gate, up, down
ADAPTER_STD = 0.05
STEPS, LR = 12, 1e-2


def with_random_adapters(model, seed=1):
    """B starts at zero; give every adapter a value so that merges and outputs mean something."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in lorakit.adapter_parameters(model):
            p.copy_(torch.randn(p.shape, generator=gen) * ADAPTER_STD)
    return model


@pytest.fixture
def pair():
    """(QLoRA model, the same adapters on a float base holding the dequantized weights)."""
    quantized = quantize(tiny_llama())
    reference = dequantize(copy.deepcopy(quantized))
    qlora = with_random_adapters(lorakit.apply_lora(quantized, CONFIG))
    lora = with_random_adapters(lorakit.apply_lora(reference, CONFIG))
    return qlora, lora


def ids(batch=2, tokens=9):
    return torch.randint(0, LLAMA["vocab_size"], (batch, tokens))


def test_every_linear_but_the_head_is_quantized_and_adapted(pair):
    qlora, _ = pair
    layers = dict(lorakit.lora_layers(qlora))
    assert len(layers) == LINEARS_PER_LAYER * LLAMA["num_hidden_layers"]
    assert all(isinstance(layer.weight, QuantizedWeight) for layer in layers.values())
    assert type(qlora.lm_head) is nn.Linear


def test_outputs_equal_lora_on_the_dequantized_base(pair):
    qlora, lora = pair
    x = ids()
    with torch.no_grad():
        torch.testing.assert_close(qlora(x).logits, lora(x).logits)


def test_adapter_gradients_equal_lora_on_the_dequantized_base(pair):
    qlora, lora = pair
    x = ids()
    qlora(x, labels=x).loss.backward()
    lora(x, labels=x).loss.backward()
    grads = [p.grad for p in lorakit.adapter_parameters(qlora)]
    expected = [p.grad for p in lorakit.adapter_parameters(lora)]
    assert len(grads) == 2 * LINEARS_PER_LAYER * LLAMA["num_hidden_layers"]
    for got, want in zip(grads, expected, strict=True):
        torch.testing.assert_close(got, want)


def test_training_lowers_the_loss_and_changes_only_adapters():
    model = lorakit.apply_lora(quantize(tiny_llama()), CONFIG)
    frozen = {k: v.clone() for k, v in model.state_dict().items() if ".lora_" not in k}
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert {id(p) for p in trainable} == {id(p) for p in lorakit.adapter_parameters(model)}
    optimizer = torch.optim.AdamW(trainable, lr=LR)
    x = ids(4, 16)
    model.train()
    losses = []
    for _ in range(STEPS):
        loss = model(x, labels=x).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.3
    after = model.state_dict()
    for key, value in frozen.items():  # codes, scales, norms, embeddings: untouched
        assert torch.equal(after[key], value), key


def test_a_chosen_compute_dtype():
    linear = nn.Linear(64, 32)
    layer = LoraLinear(QuantLinear.from_linear(linear, compute_dtype=torch.bfloat16))
    layer.add_adapter("a", AdapterRecord(rank=4, alpha=8, scale=2.0), dtype=torch.float32)
    layer.set_adapter("a")
    with torch.no_grad():
        layer.lora_B["a"].normal_()
    x = torch.randn(3, 64)
    w = layer.weight.dequantize(torch.bfloat16)
    base = F.linear(x.bfloat16(), w, layer.bias.bfloat16()).float()
    update = 2.0 * (x @ layer.lora_A["a"].t()) @ layer.lora_B["a"].t()
    torch.testing.assert_close(layer(x), base + update)


def test_adapters_of_a_half_precision_quantized_base_are_float32():
    model = quantize(tiny_llama().to(torch.bfloat16), compute_dtype=torch.bfloat16)
    model = lorakit.apply_lora(model, CONFIG)
    assert {p.dtype for p in lorakit.adapter_parameters(model)} == {torch.float32}
    out = model(ids()).logits
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()


def test_merge_holds_full_precision_and_unmerge_restores_the_codes(pair):
    qlora, lora = pair
    x = ids()
    stored = {k: v.clone() for k, v in qlora.state_dict().items()}
    with torch.no_grad():
        adapted = qlora(x).logits
        lorakit.merge(qlora)
        layer = qlora.model.layers[0].self_attn.q_proj
        assert isinstance(layer.weight, nn.Parameter) and layer.merged_adapters == ["default"]
        torch.testing.assert_close(qlora(x).logits, adapted)
        lorakit.merge(lora)
        torch.testing.assert_close(layer.weight, lora.model.layers[0].self_attn.q_proj.weight)
        lorakit.unmerge(qlora)
        assert isinstance(layer.weight, QuantizedWeight)
        assert all(torch.equal(v, stored[k]) for k, v in qlora.state_dict().items())
        torch.testing.assert_close(qlora(x).logits, adapted)


def test_merge_and_unload_in_full_precision(pair):
    qlora, lora = pair
    x = ids()
    with torch.no_grad():
        adapted = qlora(x).logits
        merged = lorakit.merge_and_unload(qlora)
    projection = merged.model.layers[1].mlp.down_proj
    assert type(projection) is nn.Linear and projection.weight.dtype == torch.float32
    assert not any(isinstance(m, (QuantLinear, LoraLinear)) for m in merged.modules())
    with torch.no_grad():
        torch.testing.assert_close(merged(x).logits, adapted)
        torch.testing.assert_close(merged(x).logits, lorakit.merge_and_unload(lora)(x).logits)


def test_merge_and_unload_requantized_reports_the_error_per_layer(pair):
    qlora, _ = pair
    x = ids()
    with torch.no_grad():
        originals = {
            f"{p}.weight": (
                layer.weight,
                layer.dense_weight().detach().clone(),
                layer.delta_weight("default"),
            )
            for p, layer in lorakit.lora_layers(qlora)
        }
    with torch.no_grad():
        adapted = qlora(x).logits
        merged = lorakit.merge_and_unload(qlora, requantize=True)
    assert isinstance(merged.model.layers[0].mlp.up_proj, QuantLinear)
    errors = requantization_errors(merged)
    assert sorted(errors) == sorted(originals)
    for path, error in errors.items():
        old, dense, delta = originals[path]
        new = merged.get_submodule(path)
        assert (new.quant_type, new.blocksize, new.double_quant) == (
            old.quant_type,
            old.blocksize,
            old.double_quant,
        )
        exact = dense + delta
        diff = new.dequantize() - exact
        assert error.relative == pytest.approx(float(diff.norm() / exact.norm()))
        assert error.of_delta == pytest.approx(float(diff.norm() / delta.norm()), rel=1e-4)
        assert error.max_abs == pytest.approx(float(diff.abs().max()))
        assert 0 < error.relative < 0.15  # the rounding of one more 4-bit quantization
    with torch.no_grad():
        drift = (merged(x).logits - adapted).abs().max()
    assert 0 < drift < 0.5 * adapted.abs().max()


def test_merged_state_dict_loads_into_a_float_base(pair):
    qlora, _ = pair
    x = ids()
    fresh = tiny_llama()
    fresh.load_state_dict(lorakit.merged_state_dict(qlora))
    with torch.no_grad():
        torch.testing.assert_close(fresh(x).logits, qlora(x).logits)


def test_state_dict_keeps_the_bitsandbytes_keys(pair):
    qlora, _ = pair
    keys = [k for k in qlora.state_dict() if k.startswith("model.layers.0.self_attn.q_proj.")]
    assert keys == [
        "model.layers.0.self_attn.q_proj.weight",
        "model.layers.0.self_attn.q_proj.weight.absmax",
        "model.layers.0.self_attn.q_proj.weight.quant_map",
        "model.layers.0.self_attn.q_proj.weight.nested_absmax",
        "model.layers.0.self_attn.q_proj.weight.nested_quant_map",
        "model.layers.0.self_attn.q_proj.weight.quant_state.bitsandbytes__nf4",
        "model.layers.0.self_attn.q_proj.lora_A.default",
        "model.layers.0.self_attn.q_proj.lora_B.default",
    ]
    twin = lorakit.apply_lora(quantize(tiny_llama()), CONFIG)
    twin.load_state_dict(qlora.state_dict())
    x = ids()
    with torch.no_grad():
        torch.testing.assert_close(twin(x).logits, qlora(x).logits, rtol=0, atol=0)


def test_remove_lora_gives_back_the_quantized_layers(pair):
    qlora, _ = pair
    codes = qlora.model.layers[0].self_attn.v_proj.weight.packed.clone()
    base = lorakit.remove_lora(qlora)
    layer = base.model.layers[0].self_attn.v_proj
    assert isinstance(layer, QuantLinear) and torch.equal(layer.weight.packed, codes)


def test_counts_include_the_quantized_weights(pair):
    qlora, lora = pair
    assert lorakit.count_parameters(qlora) == lorakit.count_parameters(lora)
    base = quantize(tiny_llama())
    the_plan = lorakit.plan(base, CONFIG)
    adapted = lorakit.apply_lora(base, CONFIG)
    assert (the_plan.trainable, the_plan.total) == lorakit.count_parameters(adapted)


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_quantizing_a_memory_mapped_checkpoint_lets_the_file_go(tmp_path, tied):
    """transformers maps a safetensors checkpoint into memory; the tensors kept in full precision
    must not hold that mapping (and every page quantization read) for the life of the model."""
    import gc

    from transformers import LlamaForCausalLM

    tiny_llama(tie_word_embeddings=tied).save_pretrained(tmp_path)
    loaded = LlamaForCausalLM.from_pretrained(tmp_path).eval()
    mapped = [t for t in (*loaded.parameters(), *loaded.buffers()) if not _own_memory(t)]
    if not mapped:
        pytest.skip("this transformers version copies checkpoints into memory")
    reference = quantize(tiny_llama(tie_word_embeddings=tied))  # the same weights, in memory

    model = quantize(loaded)
    del mapped
    gc.collect()
    assert all(_own_memory(t) for t in (*model.parameters(), *model.buffers()))
    if tied:
        assert model.lm_head.weight is model.model.embed_tokens.weight
    maps = Path("/proc/self/maps")
    if maps.exists():
        assert str(tmp_path) not in maps.read_text(), "the checkpoint is still mapped"
    tokens = ids()
    with torch.no_grad():
        assert torch.equal(model(tokens).logits, reference(tokens).logits)


def _own_memory(tensor: torch.Tensor) -> bool:
    return tensor.untyped_storage().resizable()


def test_linear_subclasses_are_quantized_and_attention_out_proj_is_not():
    """A subclass of nn.Linear computes x Wᵀ + b (transformers' FalconLinear); the out_proj of
    nn.MultiheadAttention does not go through its own forward, so it stays in full precision."""

    class Subclassed(nn.Linear):
        pass

    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.attention = nn.MultiheadAttention(16, 2, batch_first=True)
            self.fc = Subclassed(16, 8)
            self.head = nn.Linear(8, 4)

        def forward(self, x):
            return self.head(self.fc(self.attention(x, x, x)[0]))

    model = Model().eval()
    quantized = quantize(copy.deepcopy(model), include_head=True)
    assert isinstance(quantized.fc, QuantLinear) and isinstance(quantized.head, QuantLinear)
    assert type(quantized.attention.out_proj) is nn.modules.linear.NonDynamicallyQuantizableLinear
    x = torch.randn(2, 5, 16)
    with torch.no_grad():
        torch.testing.assert_close(quantized(x), dequantize(copy.deepcopy(quantized))(x))
