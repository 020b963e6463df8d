"""How a quantized weight stores its codes and scales: frozen uint8 parameters (for FSDP2).

The representation changes nothing a user sees: the typed tensors, the state dict, the counts,
what trains. These tests pin that down on one process; test_quant_fsdp.py shards it.
"""

from __future__ import annotations

import pytest
import torch
from quant_models import tiny_llama
from torch import nn

import lorakit
from lorakit import LoraConfig
from lorakit.quant import QuantizedWeight, QuantLinear, quantized_storage_bytes

pytest.importorskip("transformers")

STORED = ["packed", "absmax_bytes", "nested_absmax_bytes"]


def weight(double_quant=True, shape=(48, 80)) -> QuantizedWeight:
    return QuantizedWeight.quantize(torch.randn(shape), "nf4", double_quant=double_quant)


@pytest.mark.parametrize("double_quant", [True, False], ids=["double", "single"])
def test_codes_and_scales_are_frozen_byte_parameters_viewed_in_their_dtypes(double_quant):
    w = weight(double_quant)
    names = STORED if double_quant else STORED[:2]
    assert [n for n, _ in w.named_parameters()] == names
    assert all(p.dtype == torch.uint8 and not p.requires_grad for p in w.parameters())
    assert [n for n, _ in w.named_buffers()] == ["code", "nested_code"][: 1 + double_quant]
    blocks = 48 * 80 // 64
    assert w.absmax.shape == (blocks,)
    assert w.absmax.dtype == (torch.uint8 if double_quant else torch.float32)
    assert w.absmax.untyped_storage().data_ptr() == w.absmax_bytes.untyped_storage().data_ptr()
    if double_quant:
        assert w.nested_absmax.shape == (1,) and w.nested_absmax.dtype == torch.float32
    else:
        assert w.nested_absmax is None and w.absmax_bytes.shape == (blocks, 4)


def test_the_state_dict_holds_the_typed_tensors_not_the_bytes():
    layer = nn.Sequential(QuantLinear(weight()))
    state = layer.state_dict()
    assert list(state) == [
        "0.weight",
        "0.weight.absmax",
        "0.weight.quant_map",
        "0.weight.nested_absmax",
        "0.weight.nested_quant_map",
        "0.weight.quant_state.bitsandbytes__nf4",
    ]
    w = layer[0].weight
    assert torch.equal(state["0.weight"], w.packed) and state["0.weight"].shape == (1920, 1)
    assert state["0.weight.absmax"].dtype == torch.uint8
    assert state["0.weight.nested_absmax"].dtype == torch.float32
    assert torch.equal(state["0.weight.nested_absmax"], w.nested_absmax)


def test_a_code_cannot_be_made_trainable():
    with pytest.raises(RuntimeError, match="floating point"):
        weight().packed.requires_grad_(True)


def test_dtype_casts_leave_codes_scales_and_codebooks_alone():
    layer = QuantLinear(weight(double_quant=False))
    before = {k: v.clone() for k, v in layer.state_dict().items()}
    stored = list(layer.weight.parameters())
    layer.to(torch.bfloat16).half().to("cpu")
    assert list(layer.weight.parameters()) == stored  # the same parameter objects
    after = layer.state_dict()
    for key, value in before.items():
        assert after[key].dtype == value.dtype and torch.equal(after[key], value), key


def test_only_adapters_train_and_counts_are_the_elements_the_weights_stand_for():
    base = tiny_llama()
    floats = sum(p.numel() for p in base.parameters())
    model = lorakit.apply_lora(lorakit.quantize(base), LoraConfig(r=4, target_modules="all-linear"))
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert {id(p) for p in trainable} == {id(p) for p in lorakit.adapter_parameters(model)}
    adapters = sum(p.numel() for p in trainable)
    assert lorakit.count_parameters(model) == (adapters, floats + adapters)


def test_a_saved_copy_of_a_quantized_module_trains_its_float_parameters_only():
    config = LoraConfig(r=4, target_modules=["q_proj"], modules_to_save=["lm_head", "down_proj"])
    model = lorakit.quantize(tiny_llama())
    the_plan = lorakit.plan(model, config)
    model = lorakit.apply_lora(model, config)
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert all(p.is_floating_point() for p in trainable)
    assert {id(p) for p in trainable} == {id(p) for p in lorakit.adapter_parameters(model)}
    assert lorakit.count_parameters(model)[0] == the_plan.trainable


def test_storage_bytes_of_an_unsharded_model_are_all_held():
    model = lorakit.quantize(tiny_llama())
    weights = [w for _, w in lorakit.quant.quantized_weights(model)]
    whole = sum(
        t.numel() * t.element_size() for w in weights for t in (w.packed, w.absmax, w.nested_absmax)
    )
    codebooks = sum(b.numel() * b.element_size() for w in weights for b in w.buffers())
    assert quantized_storage_bytes(model) == (whole, whole)
    assert whole + codebooks == sum(w.nbytes for w in weights)
