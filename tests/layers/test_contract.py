"""The contract every LoRA layer kind keeps, checked for each kind and config.

Each case is a tiny two-module model: the layer under test (``layer``) and an untargeted module
after it (``post``, with a bias), so that "only the adapter changed" has something else to watch.
The forward is checked against ``W x + s · B A x`` written out by hand in float64 from the
parameters, never against lorakit's own helpers.
"""

from __future__ import annotations

import copy
import dataclasses
from collections import OrderedDict
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from transformers.pytorch_utils import Conv1D

import lorakit
from lorakit import LoraConfig
from lorakit.layers import LoraLayer

ADAPTER = "default"
IN, OUT, DIM, VOCAB = 6, 5, 4, 10
CHANNELS_IN, CHANNELS_OUT = 3, 4
FUSED_OUT = 9  # three equal slices of 3
SLICES = (True, False, True)
BATCH, TOKENS, LENGTH, SIDE = 2, 3, 8, 6
ADAPTER_STD = 0.5  # adapter weights after randomising: large enough to move the output visibly
SGD_LR, ADAMW_LR = 0.1, 1e-2


def _gpt2_conv1d(nf: int, nx: int) -> nn.Module:
    """transformers' Conv1D (weight (in, out)) with a non-zero bias, so bias handling shows."""
    layer = Conv1D(nf, nx)
    with torch.no_grad():
        layer.bias.normal_()
    return layer


def _randn(*shape):
    return lambda: torch.randn(*shape)


@dataclasses.dataclass(frozen=True)
class Case:
    id: str
    kind: str  # how the reference formula reads the weight: linear, gpt2, embedding, conv
    layer: Callable[[], nn.Module]
    post: Callable[[], nn.Module]
    inputs: Callable[[], torch.Tensor]
    config: LoraConfig
    r: int  # the rank the adapter must get
    scale: float  # the factor s the update must be multiplied by
    slices: tuple[bool, ...] | None = None


def _cfg(**kw) -> LoraConfig:
    return LoraConfig(target_modules=("layer",), **{"r": 2, "alpha": 4, **kw})


LINEAR_X = _randn(BATCH, TOKENS, IN)
CASES = [
    Case(
        "linear",
        "linear",
        lambda: nn.Linear(IN, OUT),
        lambda: nn.Linear(OUT, 2),
        LINEAR_X,
        _cfg(),
        2,
        2.0,
    ),
    Case(
        "linear-no-bias",
        "linear",
        lambda: nn.Linear(IN, OUT, bias=False),
        lambda: nn.Linear(OUT, 2),
        LINEAR_X,
        _cfg(r=3, alpha=3),
        3,
        1.0,
    ),
    Case(
        "gpt2-conv1d",
        "gpt2",
        lambda: _gpt2_conv1d(OUT, IN),
        lambda: nn.Linear(OUT, 2),
        LINEAR_X,
        _cfg(),
        2,
        2.0,
    ),
    Case(
        "embedding",
        "embedding",
        lambda: nn.Embedding(VOCAB, DIM),
        lambda: nn.Linear(DIM, 2),
        lambda: torch.randint(0, VOCAB, (BATCH, TOKENS + 2)),
        _cfg(),
        2,
        2.0,
    ),
    Case(
        "conv1d",
        "conv",
        lambda: nn.Conv1d(CHANNELS_IN, CHANNELS_OUT, 3),
        lambda: nn.Conv1d(CHANNELS_OUT, 2, 1),
        lambda: torch.randn(BATCH, CHANNELS_IN, LENGTH),
        _cfg(),
        2,
        2.0,
    ),
    Case(
        "conv2d",
        "conv",
        lambda: nn.Conv2d(CHANNELS_IN, CHANNELS_OUT, 3),
        lambda: nn.Conv2d(CHANNELS_OUT, 2, 1),
        lambda: torch.randn(BATCH, CHANNELS_IN, SIDE, SIDE),
        _cfg(),
        2,
        2.0,
    ),
    Case(
        "conv2d-no-bias",
        "conv",
        lambda: nn.Conv2d(CHANNELS_IN, CHANNELS_OUT, (3, 2), bias=False),
        lambda: nn.Conv2d(CHANNELS_OUT, 2, 1),
        lambda: torch.randn(BATCH, CHANNELS_IN, SIDE, SIDE),
        _cfg(r=1, alpha=1),
        1,
        1.0,
    ),
    Case(
        "fused-linear",
        "linear",
        lambda: nn.Linear(IN, FUSED_OUT),
        lambda: nn.Linear(FUSED_OUT, 2),
        LINEAR_X,
        _cfg(fused_slices={"layer": SLICES}),
        2,
        2.0,
        SLICES,
    ),
    Case(
        "fused-gpt2-conv1d",
        "gpt2",
        lambda: _gpt2_conv1d(FUSED_OUT, IN),
        lambda: nn.Linear(FUSED_OUT, 2),
        LINEAR_X,
        _cfg(r=3, alpha=6, fused_slices={"layer": SLICES}),
        3,
        2.0,
        SLICES,
    ),
    Case(
        "rslora",
        "linear",
        lambda: nn.Linear(IN, OUT),
        lambda: nn.Linear(OUT, 2),
        LINEAR_X,
        _cfg(r=4, alpha=6, use_rslora=True),
        4,
        3.0,  # 6 / sqrt(4)
    ),
    Case(
        "gaussian-init",
        "linear",
        lambda: nn.Linear(IN, OUT),
        lambda: nn.Linear(OUT, 2),
        LINEAR_X,
        _cfg(init="gaussian"),
        2,
        2.0,
    ),
    Case(
        "rank-alpha-pattern",
        "linear",
        lambda: nn.Linear(IN, OUT),
        lambda: nn.Linear(OUT, 2),
        LINEAR_X,
        _cfg(rank_pattern={"layer": 3}, alpha_pattern={"layer": 5.0}),
        3,
        5.0 / 3,
    ),
    Case(
        "conv2d-rslora-pattern",
        "conv",
        lambda: nn.Conv2d(CHANNELS_IN, CHANNELS_OUT, 3),
        lambda: nn.Conv2d(CHANNELS_OUT, 2, 1),
        lambda: torch.randn(BATCH, CHANNELS_IN, SIDE, SIDE),
        _cfg(use_rslora=True, rank_pattern={"lay.*": 4}),
        4,
        2.0,  # 4 / sqrt(4)
    ),
    Case(
        "dropout",
        "linear",
        lambda: nn.Linear(IN, OUT),
        lambda: nn.Linear(OUT, 2),
        LINEAR_X,
        _cfg(dropout=0.25),
        2,
        2.0,
    ),
]
BIAS_MODES = ("none", "all", "lora_only")


@pytest.fixture(params=CASES, ids=[c.id for c in CASES])
def case(request) -> Case:
    return request.param


def build(case: Case) -> nn.Sequential:
    return nn.Sequential(OrderedDict(layer=case.layer(), post=case.post()))


def adapted(case: Case, config: LoraConfig | None = None) -> tuple[nn.Module, nn.Module]:
    """(an untouched copy of the base, the adapted model)."""
    base = build(case)
    reference = copy.deepcopy(base)
    return reference, lorakit.apply_lora(base, config or case.config)


def randomise(model: nn.Module) -> None:
    """Give every adapter tensor random values, so B A is no longer zero."""
    with torch.no_grad():
        for p in lorakit.adapter_parameters(model):
            p.copy_(torch.randn_like(p) * ADAPTER_STD)


def block_b(b: torch.Tensor, slices: tuple[bool, ...], r: int) -> torch.Tensor:
    """The compact fused B (m·out/k, r) as the full (out, m·r) block matrix, built by hand."""
    m = sum(slices)
    size = b.shape[0] // m
    full = b.new_zeros(size * len(slices), r * m)
    t = 0
    for j, on in enumerate(slices):
        if on:
            full[j * size : (j + 1) * size, t * r : (t + 1) * r] = b[t * size : (t + 1) * size]
            t += 1
    return full


def reference_forward(case: Case, layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``W x + bias + s · B A x`` in float64 from the layer's parameters."""
    w = layer.weight.detach().double()
    bias = None if layer.bias is None else layer.bias.detach().double()
    a = layer.lora_A[ADAPTER].detach().double()
    b = layer.lora_B[ADAPTER].detach().double()
    s = case.scale
    if case.kind == "embedding":  # A (r, V), B (dim, r): row i of B A's transpose is A[:, i]
        return w[x] + s * (a.t()[x] @ b.t())
    if case.kind == "conv":
        conv = {3: F.conv1d, 4: F.conv2d}[w.dim()]
        kernel = (b.flatten(1) @ a.flatten(1)).view(w.shape)  # (out, in, *k)
        return conv(x.double(), w, bias) + s * conv(x.double(), kernel)
    if case.slices is not None:
        b = block_b(b, case.slices, case.r)
    w_out_in = w.t() if case.kind == "gpt2" else w
    out = x.double() @ w_out_in.t() + s * (x.double() @ a.t() @ b.t())
    return out if bias is None else out + bias


def plain_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


# --------------------------------------------------------------------------------------------------
def test_starts_equal_to_base(case):
    reference, model = adapted(case)
    x = case.inputs()
    assert torch.equal(model(x), reference(x))
    layer = model.layer
    zero = layer.lora_A[ADAPTER] if case.kind == "embedding" else layer.lora_B[ADAPTER]
    random = layer.lora_B[ADAPTER] if case.kind == "embedding" else layer.lora_A[ADAPTER]
    assert not zero.any()
    assert random.abs().sum() > 0


def test_adapter_shapes_and_scale(case):
    _, model = adapted(case)
    layer = model.layer
    w = layer.weight
    a, b = layer.lora_A[ADAPTER], layer.lora_B[ADAPTER]
    m = sum(case.slices) if case.slices else 1
    if case.kind == "embedding":
        assert a.shape == (case.r, w.shape[0]) and b.shape == (w.shape[1], case.r)
    elif case.kind == "conv":
        assert a.shape == (case.r, *w.shape[1:])
        assert b.shape == (w.shape[0], case.r, *[1] * (w.dim() - 2))
    else:
        in_f, out_f = (w.shape[0], w.shape[1]) if case.kind == "gpt2" else (w.shape[1], w.shape[0])
        n_slices = len(case.slices) if case.slices else 1
        assert a.shape == (m * case.r, in_f)
        assert b.shape == (m * out_f // n_slices, case.r)
    assert {id(p) for p in lorakit.adapter_parameters(model)} == {id(a), id(b)}
    assert layer.record(ADAPTER).scale == pytest.approx(case.scale)


def test_forward_matches_float64_formula(case):
    _, model = adapted(case)
    randomise(model)
    model.eval()
    x = case.inputs()
    expected = reference_forward(case, model.layer, x)
    torch.testing.assert_close(model.layer(x), expected.float())


def test_merged_equals_unmerged_equals_unloaded(case):
    base = build(case)
    reference, original_layer = copy.deepcopy(base), base.layer
    model = lorakit.apply_lora(base, case.config)
    randomise(model)
    model.eval()
    x = case.inputs()
    unmerged = model(x)

    merged_model = copy.deepcopy(model)
    assert lorakit.merge(merged_model) == ["layer"]
    weights = plain_state(merged_model)
    merged = merged_model(x)
    torch.testing.assert_close(merged, unmerged)
    assert lorakit.merge(merged_model) == []  # merging again is a no-op
    for key, value in merged_model.state_dict().items():
        assert torch.equal(value, weights[key]), key
    assert torch.equal(merged_model(x), merged)

    unloaded = lorakit.merge_and_unload(model)
    assert torch.equal(unloaded(x), merged)
    for name, module in unloaded.named_modules():
        assert not type(module).__module__.startswith("lorakit"), name
    assert type(unloaded.layer) is type(reference.layer)
    assert unloaded.layer is original_layer  # the very module that was handed over
    assert sorted(unloaded.state_dict()) == sorted(reference.state_dict())
    assert lorakit.list_adapters(unloaded) == []


def test_disable_adapters_gives_base_exactly(case):
    reference, model = adapted(case)
    randomise(model)
    model.eval()
    x = case.inputs()
    adapted_out = model(x)
    base_out = reference(x)
    assert not torch.equal(adapted_out, base_out)
    with lorakit.disable_adapters(model) as inside:
        assert inside is model
        assert torch.equal(model(x), base_out)
    assert torch.equal(model(x), adapted_out)


def test_disable_adapters_restores_after_an_error(case):
    _, model = adapted(case)
    randomise(model)
    model.eval()
    x = case.inputs()
    adapted_out = model(x)
    with pytest.raises(KeyError), lorakit.disable_adapters(model):
        raise KeyError("inside")
    assert torch.equal(model(x), adapted_out)


def test_train_eval_and_forward_never_change_weights(case):
    _, model = adapted(case)
    randomise(model)
    before = plain_state(model)
    x = case.inputs()
    model.train()
    model(x)
    model.eval()
    model(x)
    model.train()
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key


def test_state_dict_round_trip_is_bit_exact(case):
    _, model = adapted(case)
    randomise(model)
    model.eval()
    x = case.inputs()
    expected = model(x)
    _, fresh = adapted(case)  # different random base and adapter
    fresh.eval()
    assert not torch.equal(fresh(x), expected)
    fresh.load_state_dict(model.state_dict())  # strict
    assert torch.equal(fresh(x), expected)


def test_base_state_dict_keys_are_kept(case):
    reference, model = adapted(case)
    base_sd = reference.state_dict()
    sd = model.state_dict()
    extra = set(sd) - set(base_sd)
    assert set(base_sd) <= set(sd)
    assert extra == {f"layer.lora_A.{ADAPTER}", f"layer.lora_B.{ADAPTER}"}
    for key, value in base_sd.items():
        assert torch.equal(sd[key], value), key
    keys = {"layer.weight"} | ({"layer.bias"} if "bias" in reference.layer.state_dict() else set())
    assert keys <= set(sd)
    # the base loads into the adapted model with its own keys, nothing remapped
    model.load_state_dict({**sd, **base_sd})


@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
def test_only_adapter_parameters_change_after_a_step(case, optimizer):
    _, model = adapted(case)
    randomise(model)  # so both A and B receive gradient
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    adapter_ids = {id(p) for p in lorakit.adapter_parameters(model)}
    trainable = [p for p in model.parameters() if p.requires_grad]
    if optimizer == "sgd":
        opt = torch.optim.SGD(trainable, lr=SGD_LR)
    else:
        opt = torch.optim.AdamW(trainable, lr=ADAMW_LR)
    model(case.inputs()).square().mean().backward()
    opt.step()
    for name, p in model.named_parameters():
        if id(p) in adapter_ids:
            assert not torch.equal(p, before[name]), f"{name} did not train"
        else:
            assert torch.equal(p, before[name]), f"{name} changed"
            assert p.grad is None, name


@pytest.mark.parametrize("bias", BIAS_MODES)
def test_requires_grad_follows_the_bias_mode(case, bias):
    _, model = adapted(case, case.config.replace(bias=bias))
    adapter_ids = {id(p) for p in lorakit.adapter_parameters(model)}
    expected = set(adapter_ids)
    layer_bias, post_bias = model.layer.bias, model.post.bias
    if bias in ("all", "lora_only") and layer_bias is not None:
        expected.add(id(layer_bias))
    if bias == "all":
        expected.add(id(post_bias))
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    assert trainable == expected
    assert lorakit.count_parameters(model)[0] == sum(
        p.numel() for p in model.parameters() if id(p) in expected
    )


@pytest.mark.parametrize("bias", ["all", "lora_only"])
def test_trainable_biases_train(case, bias):
    _, model = adapted(case, case.config.replace(bias=bias))
    randomise(model)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=SGD_LR)
    model(case.inputs()).square().mean().backward()
    opt.step()
    expect_changed = {"post.bias"} if bias == "all" else set()
    if model.layer.bias is not None:
        expect_changed.add("layer.bias")
    for name, p in model.named_parameters():
        if name in ("layer.weight", "post.weight"):
            assert torch.equal(p, before[name]), name
        elif name in expect_changed:
            assert not torch.equal(p, before[name]), name
        elif name == "post.bias":
            assert torch.equal(p, before[name]), name


def test_merged_state_dict_loads_into_a_fresh_base(case):
    _, model = adapted(case)
    randomise(model)
    model.eval()
    before = plain_state(model)
    x = case.inputs()
    expected = model(x)
    merged = lorakit.merged_state_dict(model)
    for key, value in model.state_dict().items():  # the model itself is not changed
        assert torch.equal(value, before[key]), key
    fresh = build(case).eval()
    fresh.load_state_dict(merged)  # strict: exactly the base's keys
    torch.testing.assert_close(fresh(x), expected)


def test_bare_layer_is_returned_as_its_replacement(case):
    base = case.layer()
    reference = copy.deepcopy(base)
    config = case.config
    anywhere = {}  # the bare layer's path is "": a pattern naming "layer" becomes ".*"
    for field in ("rank_pattern", "alpha_pattern", "fused_slices"):
        values = list(getattr(config, field).values())
        anywhere[field] = {".*": values[0]} if values else {}
    layer = lorakit.apply_lora(base, config.replace(target_modules=".*", **anywhere))
    assert layer is not base and isinstance(layer, LoraLayer)
    randomise(layer)
    layer.eval()
    x = case.inputs()
    expected = layer(x)
    assert not torch.equal(expected, reference(x))
    fresh = case.layer()
    fresh.load_state_dict(lorakit.merged_state_dict(layer))
    torch.testing.assert_close(fresh.eval()(x), expected)
    unloaded = lorakit.merge_and_unload(layer)
    assert unloaded is base and type(unloaded) is type(reference)
    torch.testing.assert_close(unloaded(x), expected)
