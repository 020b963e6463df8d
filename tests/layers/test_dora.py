"""DoRA: the layer against the paper's formula in float64 and against PEFT on the same weights.

``W' = m ⊙ (W + s B A) / ‖W + s B A‖`` per output row, the norm detached from the graph (DoRA
paper, section 4.3). PEFT 0.21's DoRA is the oracle for outputs, gradients and files.
"""

from __future__ import annotations

import copy
import json
import warnings

import peft
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn
from transformers.pytorch_utils import Conv1D

import lorakit
from lorakit import AdapterError, ConfigError, LoraConfig
from tiny_models import each_row_alone, logits, randomise, tiny_gpt2, tiny_llama, tokens

PREFIX = "base_model.model."
TARGETS = ["q_proj", "v_proj", "down_proj"]
DORA = LoraConfig(r=4, alpha=8, target_modules=TARGETS, use_dora=True)
IN, OUT = 6, 5


def dora_reference(w, bias, a, b, m, s, x):
    """``m ⊙ (W + s B A) / ‖W + s B A‖ x + bias`` in float64, W as (out, in)."""
    w, a, b, m, x = (t.detach().double() for t in (w, a, b, m, x))
    merged = w + s * (b @ a)
    merged = merged * (m / merged.norm(dim=1))[:, None]
    out = x @ merged.t()
    return out if bias is None else out + bias.detach().double()


def bare(layer: nn.Module, config: LoraConfig = DORA) -> nn.Module:
    model = nn.Sequential()
    model.add_module("layer", layer)
    return lorakit.apply_lora(model, config.replace(target_modules=["layer"]))


def peft_pair(make_base=tiny_llama, config: LoraConfig = DORA):
    """(base, lorakit model, PEFT model): the same base and the same random A, B and m."""
    base = make_base()
    ours = lorakit.apply_lora(copy.deepcopy(base), config).eval()
    data = {k: v for k, v in config.to_peft_dict().items() if k != "peft_type"}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**data)).eval()
    state = theirs.state_dict()
    with torch.no_grad():
        for name, p in theirs.named_parameters():
            if "lora_" in name:
                p.add_(torch.randn_like(p) * 0.2)
        for path, layer in lorakit.lora_layers(ours):
            key = f"{PREFIX}{path}."
            layer.lora_A["default"].copy_(state[f"{key}lora_A.default.weight"])
            layer.lora_B["default"].copy_(state[f"{key}lora_B.default.weight"])
            layer.lora_magnitude["default"].copy_(
                state[f"{key}lora_magnitude_vector.default.weight"]
            )
    return base, ours, theirs


# -- the layer --------------------------------------------------------------------------------
@pytest.mark.parametrize("bias", [True, False])
def test_starts_exactly_at_the_base_with_the_weight_norm_as_magnitude(bias):
    layer = nn.Linear(IN, OUT, bias=bias)
    reference = copy.deepcopy(layer)
    model = bare(layer)
    x = torch.randn(3, IN)
    assert torch.equal(model(x), reference(x))
    m = model.layer.lora_magnitude["default"]
    torch.testing.assert_close(m, reference.weight.norm(dim=1))
    a, b = model.layer.lora_A["default"], model.layer.lora_B["default"]
    assert {id(p) for p in lorakit.adapter_parameters(model)} == {id(a), id(b), id(m)}
    assert lorakit.count_parameters(model)[0] == 4 * (IN + OUT) + OUT


@pytest.mark.parametrize("kind", ["linear", "linear-no-bias", "gpt2-conv1d"])
def test_forward_and_merge_match_the_float64_formula(kind):
    if kind == "gpt2-conv1d":
        layer = Conv1D(OUT, IN)
        nn.init.normal_(layer.bias)
    else:
        layer = nn.Linear(IN, OUT, bias=kind == "linear")
    model = bare(layer)
    randomise(model)
    model.eval()
    lora = model.layer
    w = lora.weight.t() if kind == "gpt2-conv1d" else lora.weight
    x = torch.randn(2, 3, IN)
    args = (w, lora.bias, lora._A["default"], lora._B["default"], lora._M["default"], 2.0, x)
    expected = dora_reference(*args)
    torch.testing.assert_close(model(x), expected.float())
    lorakit.merge(model)
    torch.testing.assert_close(model(x), expected.float())
    lorakit.unmerge(model)
    torch.testing.assert_close(model(x), expected.float())


def test_unmerge_gives_the_weight_back_and_merge_repeats_safely():
    layer = nn.Linear(IN, OUT)
    original = layer.weight.detach().clone()
    model = randomise(bare(layer)).eval()
    x = torch.randn(4, IN)
    before = model(x)
    assert lorakit.merge(model) and not lorakit.merge(model)  # a second merge does nothing
    merged = model.layer.weight.detach().clone()
    assert not torch.equal(merged, original)
    torch.testing.assert_close(model(x), before)
    lorakit.unmerge(model)
    torch.testing.assert_close(model.layer.weight, original)  # float32 rounding
    torch.testing.assert_close(model(x), before)
    unloaded = lorakit.merge_and_unload(model)
    assert isinstance(unloaded.layer, nn.Linear)
    torch.testing.assert_close(unloaded(x), before)


def test_quantized_base_qdora_merges_and_unmerges_bit_for_bit():
    base = tiny_llama()
    model = lorakit.quantize(copy.deepcopy(base), "nf4", double_quant=True)
    model = randomise(lorakit.apply_lora(model, DORA)).eval()
    layer = model.get_submodule("model.layers.0.self_attn.q_proj")
    codes = layer.weight.packed.clone()
    dense = layer.weight.dequantize(torch.float32)
    x = torch.randn(2, 3, dense.shape[1])
    args = (dense, None, layer._A["default"], layer._B["default"], layer._M["default"], 2.0, x)
    torch.testing.assert_close(layer(x), dora_reference(*args).float())
    ids = tokens(base.config.vocab_size)
    before = logits(model, ids)
    lorakit.merge(model)
    torch.testing.assert_close(logits(model, ids), before, rtol=1e-4, atol=1e-4)
    lorakit.unmerge(model)
    assert torch.equal(layer.weight.packed, codes)
    assert torch.equal(logits(model, ids), before)


def test_the_norm_is_detached_gradients_match_a_float64_reference():
    layer = nn.Linear(IN, OUT)
    model = randomise(bare(layer))
    lora = model.layer
    x = torch.randn(3, IN, dtype=torch.float64)
    leaves = [
        t.detach().double().requires_grad_()
        for t in (lora._A["default"], lora._B["default"], lora._M["default"])
    ]
    a, b, m = leaves
    w = lora.weight.detach().double()
    summed = w + 2.0 * (b @ a)
    norm = summed.norm(dim=1).detach()  # the paper's section 4.3: no gradient through the norm
    ((x @ (summed * (m / norm)[:, None]).t() + lora.bias.double()).square().sum()).backward()
    model(x.float()).square().sum().backward()
    for ours, ref in zip(lora.adapter_tensors("default"), leaves):
        torch.testing.assert_close(ours.grad, ref.grad.float(), rtol=1e-4, atol=1e-5)


def test_the_inference_cache_follows_changes_of_every_tensor():
    model = randomise(bare(nn.Linear(IN, OUT))).eval()
    lora = model.layer
    x = torch.randn(2, IN)
    with torch.no_grad():
        first = model(x)
        assert torch.equal(model(x), first)  # the kept g gives the same numbers
        for t in lora.adapter_tensors("default"):
            t.mul_(1.5)
            args = (
                lora.weight,
                lora.bias,
                lora._A["default"],
                lora._B["default"],
                lora._M["default"],
                2.0,
                x,
            )
            torch.testing.assert_close(model(x), dora_reference(*args).float())


def test_dropout_follows_peft_form():
    config = DORA.replace(dropout=0.5)
    model = randomise(bare(nn.Linear(IN, OUT), config)).train()
    lora = model.layer
    x = torch.randn(4, IN)
    torch.manual_seed(7)
    got = model(x)
    torch.manual_seed(7)
    dropped = F.dropout(x, 0.5, True)
    a, b, m, w = lora._A["default"], lora._B["default"], lora._M["default"], lora.weight
    with torch.no_grad():
        g = m / (w + 2.0 * b @ a).norm(dim=1)
        expected = (
            F.linear(x, w, lora.bias)
            + (g - 1) * F.linear(dropped, w)
            + g * 2.0 * F.linear(dropped, b @ a)
        )
    torch.testing.assert_close(got, expected)


@pytest.mark.parametrize(
    ("module", "words"),
    [(nn.Embedding(10, 4), "nn.Embedding"), (nn.Conv2d(3, 4, 3), "nn.Conv1d")],
)
def test_refused_where_it_does_not_apply(module, words):
    model = nn.Sequential()
    model.add_module("layer", module)
    with pytest.raises(AdapterError, match=f"layer: DoRA is for linear layers, not .*{words}"):
        lorakit.apply_lora(model, DORA.replace(target_modules=["layer"]))
    assert type(model.layer) is type(module)  # all or nothing: nothing was replaced
    gpt2 = tiny_gpt2()
    sliced = DORA.replace(target_modules=["c_attn"], fused_slices={"c_attn": (True, False, True)})
    with pytest.raises(AdapterError, match="fused slices"):
        lorakit.apply_lora(gpt2, sliced)


def test_combine_refuses_dora_adapters():
    model = lorakit.apply_lora(tiny_llama(), DORA)
    lorakit.apply_lora(model, LoraConfig(r=4, alpha=8, target_modules=TARGETS), "plain")
    with pytest.raises(ConfigError, match="DoRA"):
        lorakit.combine(model, {"default": 1.0, "plain": 1.0}, "linear")


# -- against PEFT -----------------------------------------------------------------------------
def test_outputs_gradients_and_merge_match_peft():
    base, ours, theirs = peft_pair()
    ids = tokens(base.config.vocab_size)
    torch.testing.assert_close(logits(ours, ids), logits(theirs, ids))
    ours(input_ids=ids, labels=ids).loss.backward()
    theirs(input_ids=ids, labels=ids).loss.backward()
    params = dict(theirs.named_parameters())
    for path, layer in lorakit.lora_layers(ours):
        key = f"{PREFIX}{path}."
        for mine, name in zip(
            layer.adapter_tensors("default"),
            (
                "lora_A.default.weight",
                "lora_B.default.weight",
                "lora_magnitude_vector.default.weight",
            ),
        ):
            torch.testing.assert_close(mine.grad, params[key + name].grad, msg=key + name)
    merged_theirs = theirs.merge_and_unload()
    merged_ours = lorakit.merge_and_unload(ours)
    torch.testing.assert_close(logits(merged_ours, ids), logits(merged_theirs, ids))


def test_files_round_trip_both_ways_with_peft(tmp_path):
    base, ours, theirs = peft_pair()
    ids = tokens(base.config.vocab_size)
    expected = logits(theirs, ids)
    lorakit.save_adapter(ours, tmp_path / "ours")
    config = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    assert config["use_dora"] is True
    keys = load_file(tmp_path / "ours" / "adapter_model.safetensors")
    assert f"{PREFIX}model.layers.0.self_attn.q_proj.lora_magnitude_vector" in keys
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loaded = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "ours")
    torch.testing.assert_close(logits(loaded, ids), expected)
    theirs.save_pretrained(tmp_path / "theirs")
    mine = lorakit.load_adapter(copy.deepcopy(base), tmp_path / "theirs")
    assert mine.get_submodule("model.layers.1.mlp.down_proj").record("default").variant == "dora"
    torch.testing.assert_close(logits(mine, ids), expected)
    # merged with no model, from the files alone
    adapter = lorakit.io.read_adapter(tmp_path / "theirs")
    state = lorakit.merge_state_dict(base.state_dict(), adapter)
    fresh = copy.deepcopy(base)
    fresh.load_state_dict(state)
    torch.testing.assert_close(logits(fresh, ids), expected)


def test_a_file_without_its_magnitudes_is_refused(tmp_path):
    _, ours, _ = peft_pair()
    lorakit.save_adapter(ours, tmp_path)
    path = tmp_path / "adapter_model.safetensors"
    from safetensors.torch import save_file

    tensors = {k: v for k, v in load_file(path).items() if "magnitude" not in k}
    save_file(tensors, path)
    with pytest.raises(lorakit.AdapterFileError, match="lora_magnitude_vector"):
        lorakit.load_adapter(tiny_llama(), tmp_path)


# -- mixed batches ----------------------------------------------------------------------------
@pytest.mark.parametrize("plain_adapters", [1, 5])  # grouped path; the padded stack
def test_dora_rows_mix_with_lora_rows_and_the_base(plain_adapters):
    model = lorakit.apply_lora(tiny_llama(), DORA, "dora")
    for i in range(plain_adapters):
        lorakit.apply_lora(
            model, LoraConfig(r=2 + i, alpha=8, target_modules="all-linear"), f"p{i}"
        )
    randomise(model)
    names = ["dora", None, "p0", "dora", f"p{plain_adapters - 1}", None]
    ids = torch.randint(0, model.config.vocab_size, (len(names), 7))
    with lorakit.adapter_per_row(model, names):
        mixed = logits(model, ids)
    alone = each_row_alone(model, names, lambda i: logits(model, ids[i : i + 1])[0])
    torch.testing.assert_close(mixed, torch.stack(alone), rtol=1e-5, atol=1e-5)


def test_dora_adapters_train_from_their_own_rows_only():
    model = lorakit.apply_lora(tiny_llama(), DORA, "a")
    lorakit.apply_lora(model, DORA, "b")
    lorakit.apply_lora(model, LoraConfig(r=4, alpha=8, target_modules=TARGETS), "c")
    randomise(model)
    for p in lorakit.adapter_parameters(model):
        p.requires_grad_(True)
    names = ["a", "a", "b", "c"]  # consecutive blocks: the block path
    ids = torch.randint(0, model.config.vocab_size, (len(names), 6))
    with lorakit.adapter_per_row(model, names):
        out = model(input_ids=ids).logits
    out[:2].sum().backward()  # only the rows of "a"
    layer = model.get_submodule("model.layers.0.self_attn.q_proj")
    assert all(t.grad is not None and t.grad.abs().sum() > 0 for t in layer.adapter_tensors("a"))
    assert all(t.grad is None or not t.grad.any() for t in layer.adapter_tensors("b"))
    # the gradient of "a" equals that of "a" alone on its rows
    grads = [t.grad.clone() for t in layer.adapter_tensors("a")]
    model.zero_grad()
    lorakit.set_adapter(model, "a")
    for p in lorakit.adapter_parameters(model):
        p.requires_grad_(True)
    model(input_ids=ids[:2]).logits.sum().backward()
    for got, t in zip(grads, layer.adapter_tensors("a")):
        torch.testing.assert_close(got, t.grad, rtol=1e-4, atol=1e-6)
