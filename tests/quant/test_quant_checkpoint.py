"""bitsandbytes' 4-bit checkpoint layout, read and written, against bitsandbytes and transformers.

* a ``QuantLinear``'s state dict equals a bitsandbytes ``Linear4bit``'s, key for key and byte for
  byte (the JSON quant state included);
* a prequantized checkpoint written by transformers + bitsandbytes loads into lorakit with equal
  outputs; a lorakit-quantized model saved with ``hf_quantization_config`` loads in transformers
  + bitsandbytes with equal outputs;
* lorakit's own round trips: strict loading, a float checkpoint into a quantized model, a
  checkpoint in another format, errors for mismatched shapes and missing entries.

bitsandbytes' CPU inference path in eval mode switches to a bfloat16 kernel when the CPU has
AVX512-BF16; outputs compared exactly with lorakit's float32 path turn it off.
"""

from __future__ import annotations

import copy
import json

import pytest
import torch
from quant_models import LLAMA, tiny_llama
from safetensors.torch import load_file, save_file
from torch import nn

from lorakit.quant import (
    QuantizedWeight,
    QuantLinear,
    hf_quantization_config,
    load_quantized,
    quantize,
)

bnb = pytest.importorskip("bitsandbytes")
transformers = pytest.importorskip("transformers")

IN, OUT = 70, 130


def float32_path(model: nn.Module) -> nn.Module:
    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.support_avx512bf16_for_cpu = False
    return model


def bnb_linear(linear: nn.Linear, quant_type: str, double_quant: bool, blocksize: int = 64):
    layer = bnb.nn.Linear4bit(
        IN,
        OUT,
        bias=linear.bias is not None,
        compute_dtype=torch.float32,
        compress_statistics=double_quant,
        quant_type=quant_type,
    )
    layer.weight.blocksize = blocksize
    layer.load_state_dict(linear.state_dict())
    return float32_path(layer.to("cpu")).eval()  # .to() quantizes


@pytest.mark.parametrize("double_quant", [False, True], ids=["plain", "double"])
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_state_dict_equals_bitsandbytes_linear4bit(quant_type, double_quant):
    linear = nn.Linear(IN, OUT)
    theirs = bnb_linear(linear, quant_type, double_quant).state_dict()
    ours = QuantLinear.from_linear(linear, quant_type, double_quant=double_quant).state_dict()
    assert list(ours) == ["bias", *(k for k in theirs if k != "bias")]
    for key, value in theirs.items():
        assert ours[key].dtype == value.dtype and torch.equal(ours[key], value), key


@pytest.mark.parametrize("quant_type, blocksize", [("nf4", 64), ("fp4", 128)])
def test_lorakit_layout_loads_in_bitsandbytes(quant_type, blocksize):
    linear = nn.Linear(IN, OUT)
    ours = QuantLinear.from_linear(linear, quant_type, blocksize=blocksize)
    state = ours.state_dict()
    stats = {k.removeprefix("weight."): v for k, v in state.items() if k.startswith("weight.")}
    theirs = bnb.nn.Linear4bit(IN, OUT, compute_dtype=torch.float32)
    theirs.weight = bnb.nn.Params4bit.from_prequantized(state["weight"], stats, device="cpu")
    theirs.bias = nn.Parameter(state["bias"])
    x = torch.randn(3, IN)
    torch.testing.assert_close(float32_path(theirs).eval()(x), ours(x), rtol=0, atol=0)


def test_bitsandbytes_layout_loads_in_lorakit():
    linear = nn.Linear(IN, OUT)
    theirs = bnb_linear(linear, "fp4", True, blocksize=128)
    model = nn.Sequential(copy.deepcopy(linear))
    load_quantized(model, {f"0.{k}": v for k, v in theirs.state_dict().items()})
    assert isinstance(model[0], QuantLinear) and model[0].weight.blocksize == 128
    x = torch.randn(3, IN)
    torch.testing.assert_close(model(x), theirs(x), rtol=0, atol=0)


def test_other_quant_storage_dtypes_are_read_as_bytes():
    w = torch.randn(OUT, IN)
    packed, state = bnb.functional.quantize_4bit(w, quant_type="nf4", quant_storage=torch.bfloat16)
    entries = {"": packed, **state.as_dict(packed=True)}
    ours = QuantizedWeight.from_bnb(entries)
    assert torch.equal(ours.dequantize(), bnb.functional.dequantize_4bit(packed, state))


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    torch.manual_seed(0)
    model = tiny_llama()
    path = tmp_path_factory.mktemp("llama")
    model.save_pretrained(path)
    return path


def test_transformers_prequantized_checkpoint_loads_in_lorakit(llama_dir, tmp_path):
    config = transformers.BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.float32,
    )
    theirs = transformers.LlamaForCausalLM.from_pretrained(
        llama_dir, quantization_config=config, device_map="cpu"
    )
    theirs.save_pretrained(tmp_path)  # a published bnb-4bit checkpoint looks like this
    state = load_file(tmp_path / "model.safetensors")
    assert "model.layers.0.mlp.up_proj.weight.quant_state.bitsandbytes__nf4" in state

    ours = transformers.LlamaForCausalLM.from_pretrained(llama_dir).eval()
    result = load_quantized(ours, state, strict=False)
    # tied lm_head: transformers leaves it out of the file, as for any tied model
    assert result.missing_keys in ([], ["lm_head.weight"]) and result.unexpected_keys == []
    assert isinstance(ours.model.layers[0].mlp.up_proj, QuantLinear)
    ids = torch.randint(0, LLAMA["vocab_size"], (2, 9))
    with torch.no_grad():
        torch.testing.assert_close(ours(ids).logits, float32_path(theirs.eval())(ids).logits)


def test_lorakit_checkpoint_loads_in_transformers(llama_dir, tmp_path):
    ours = quantize(transformers.LlamaForCausalLM.from_pretrained(llama_dir).eval())
    ours.config.quantization_config = hf_quantization_config(ours)
    ours.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())["quantization_config"]
    assert saved["bnb_4bit_quant_type"] == "nf4" and saved["bnb_4bit_use_double_quant"]

    theirs = transformers.LlamaForCausalLM.from_pretrained(tmp_path, device_map="cpu").eval()
    assert isinstance(theirs.model.layers[1].self_attn.o_proj, bnb.nn.Linear4bit)
    ids = torch.randint(0, LLAMA["vocab_size"], (2, 9))
    with torch.no_grad():
        torch.testing.assert_close(float32_path(theirs)(ids).logits, ours(ids).logits)


def test_round_trip_in_lorakit_is_exact(tmp_path):
    model = quantize(nn.Sequential(nn.Linear(IN, OUT), nn.ReLU(), nn.Linear(OUT, IN)))
    save_file(model.state_dict(), tmp_path / "q.safetensors")
    fresh = quantize(nn.Sequential(nn.Linear(IN, OUT), nn.ReLU(), nn.Linear(OUT, IN)))
    fresh.load_state_dict(load_file(tmp_path / "q.safetensors"))
    x = torch.randn(4, IN)
    torch.testing.assert_close(fresh(x), model(x), rtol=0, atol=0)


def test_loading_another_format_adopts_it():
    source = QuantLinear.from_linear(nn.Linear(IN, OUT), "fp4", blocksize=256, double_quant=False)
    target = QuantLinear.from_linear(nn.Linear(IN, OUT))  # nf4, block 64, double quant
    target.load_state_dict(source.state_dict())
    assert (target.weight.quant_type, target.weight.blocksize) == ("fp4", 256)
    assert not target.weight.double_quant
    x = torch.randn(2, IN)
    torch.testing.assert_close(target(x), source(x), rtol=0, atol=0)


def test_a_float_checkpoint_is_quantized_on_load():
    linear = nn.Linear(IN, OUT)
    target = QuantLinear.from_linear(nn.Linear(IN, OUT), "nf4", blocksize=128)
    target.load_state_dict(linear.state_dict())
    expected = QuantLinear.from_linear(linear, "nf4", blocksize=128)
    assert torch.equal(target.weight.packed, expected.weight.packed)


def test_mismatches_are_reported():
    target = QuantLinear.from_linear(nn.Linear(IN, OUT))
    wrong = QuantLinear.from_linear(nn.Linear(IN, OUT + 1)).state_dict()
    with pytest.raises(RuntimeError, match=r"size mismatch for weight.*\(131, 70\)"):
        target.load_state_dict(wrong)
    partial = {k: v for k, v in target.state_dict().items() if k != "weight"}
    with pytest.raises(RuntimeError, match='Missing key.*"weight"'):
        target.load_state_dict(partial)
    broken = dict(target.state_dict())
    del broken["weight.absmax"]
    with pytest.raises(RuntimeError, match="weight.absmax is missing"):
        target.load_state_dict(broken)


def test_load_quantized_into_a_meta_model():
    source = quantize(nn.Sequential(nn.Linear(IN, OUT), nn.Linear(OUT, 8)))
    with torch.device("meta"):
        target = nn.Sequential(nn.Linear(IN, OUT), nn.Linear(OUT, 8))
    load_quantized(target, source.state_dict(), assign=True)
    assert target[0].weight.device.type == "cpu"
    x = torch.randn(2, IN)
    torch.testing.assert_close(target(x), source(x), rtol=0, atol=0)
