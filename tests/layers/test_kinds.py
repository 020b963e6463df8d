"""What each layer kind adds to the shared contract.

Convolutions with stride, padding, dilation and a non-zero padding mode; embeddings with a
``padding_idx``; fused slices as independent LoRAs on the slices they adapt; float16/bfloat16
bases; merges refusing non-finite weights.
"""

from __future__ import annotations

import copy
from collections import OrderedDict

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from transformers.pytorch_utils import Conv1D

import lorakit
from lorakit import LoraConfig, MergeError

ADAPTER = "default"
R, ALPHA = 2, 6
SCALE = ALPHA / R
IN, VOCAB, DIM, PAD = 6, 7, 4, 0
BATCH, TOKENS = 3, 5
SGD_LR = 0.5
ADAPTER_STD = 0.5
LOW_PRECISION = (torch.bfloat16, torch.float16)
HUGE = 1e3  # A and B filled with this: B A is ~ r·1e6, far beyond float16's 65,504
CONFIG = LoraConfig(r=R, alpha=ALPHA, target_modules=("layer",))

# (id, base convolution, input shape, how F.conv reproduces the base: padding done by F.pad first)
CONVS = [
    ("conv1d-stride-pad-dilation", lambda: nn.Conv1d(3, 4, 3, stride=2, padding=2, dilation=2),
     (2, 3, 11), dict(stride=2, padding=2, dilation=2), None),
    ("conv2d-mixed",
     lambda: nn.Conv2d(3, 4, (3, 2), stride=(2, 1), padding=(1, 2), dilation=(2, 1)),
     (2, 3, 7, 6), dict(stride=(2, 1), padding=(1, 2), dilation=(2, 1)), None),
    ("conv2d-reflect", lambda: nn.Conv2d(3, 4, 3, padding=1, padding_mode="reflect"),
     (2, 3, 5, 5), dict(), (1, 1, 1, 1)),
    ("conv3d", lambda: nn.Conv3d(2, 3, 2, stride=1, padding=1, bias=False),
     (2, 2, 3, 4, 3), dict(padding=1), None),
]  # fmt: skip
FUSED = [
    ("linear", lambda out: nn.Linear(IN, out), False),
    ("gpt2-conv1d", lambda out: Conv1D(out, IN), True),
]
SLICE_PATTERNS = [(True, False, True), (False, True), (True, True, False, True)]
SLICE_SIZE = 3


def seq(layer: nn.Module) -> nn.Sequential:
    return nn.Sequential(OrderedDict(layer=layer))


def randomise(model: nn.Module, std: float = ADAPTER_STD) -> None:
    with torch.no_grad():
        for p in lorakit.adapter_parameters(model):
            p.copy_(torch.randn_like(p) * std)


def ab(layer) -> tuple[torch.Tensor, torch.Tensor]:
    return layer.lora_A[ADAPTER].detach(), layer.lora_B[ADAPTER].detach()


# -- convolutions ----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("make", "shape", "kwargs", "pad"), [c[1:] for c in CONVS], ids=[c[0] for c in CONVS]
)
def test_conv_matches_the_combined_kernel(make, shape, kwargs, pad):
    model = lorakit.apply_lora(seq(make()), CONFIG)
    randomise(model)
    layer = model.layer
    x = torch.randn(*shape)
    w = layer.weight.detach().double()
    bias = None if layer.bias is None else layer.bias.detach().double()
    a, b = (t.double() for t in ab(layer))
    conv = {3: F.conv1d, 4: F.conv2d, 5: F.conv3d}[w.dim()]
    kernel = w + SCALE * (b.flatten(1) @ a.flatten(1)).view(w.shape)  # (out, in, *k)
    xd = x.double() if pad is None else F.pad(x.double(), pad, mode="reflect")
    expected = conv(xd, kernel, bias, **kwargs)
    out = model(x)
    torch.testing.assert_close(out, expected.float())

    merged = copy.deepcopy(model)
    lorakit.merge(merged)
    torch.testing.assert_close(merged(x), out)
    plain = lorakit.merge_and_unload(copy.deepcopy(model))
    assert type(plain.layer) is type(make())
    torch.testing.assert_close(plain(x), out)


@pytest.mark.parametrize(
    ("make", "shape"), [(c[1], c[2]) for c in CONVS], ids=[c[0] for c in CONVS]
)
def test_conv_mixed_batch_rows_match_single_runs(make, shape):
    model = lorakit.apply_lora(seq(make()), CONFIG, "a")
    lorakit.apply_lora(model, CONFIG.replace(r=3), "b")
    randomise(model)
    x = torch.randn(4, *shape[1:])
    names = ["b", None, "a", "b"]
    with lorakit.adapter_per_row(model, names):
        mixed = model(x)
    for i, name in enumerate(names):
        lorakit.set_adapter(model, name)
        torch.testing.assert_close(mixed[i : i + 1], model(x[i : i + 1]))


# -- embeddings ------------------------------------------------------------------------------------
def embedding_model() -> nn.Module:
    return lorakit.apply_lora(seq(nn.Embedding(VOCAB, DIM, padding_idx=PAD)), CONFIG)


def ids_with_padding() -> torch.Tensor:
    ids = torch.randint(1, VOCAB, (BATCH, TOKENS))
    ids[:, -2:] = PAD
    return ids


def test_embedding_padding_rows_stay_at_the_base_while_training():
    model = embedding_model()
    ids = ids_with_padding()
    base_pad_row = model.layer.weight[PAD].detach().clone()
    assert not base_pad_row.any()
    opt = torch.optim.SGD(lorakit.adapter_parameters(model), lr=SGD_LR)
    for _ in range(3):
        opt.zero_grad()
        model(ids).square().mean().backward()
        assert not model.layer.lora_A[ADAPTER].grad[:, PAD].any()
        opt.step()
    a, b = ab(model.layer)
    assert a.abs().sum() > 0 and not a[:, PAD].any()
    out = model(ids)
    assert torch.equal(out[ids == PAD], base_pad_row.expand(int((ids == PAD).sum()), DIM))
    expected = (
        model.layer.weight.detach().double()[ids] + SCALE * a.double().t()[ids] @ b.double().t()
    )
    torch.testing.assert_close(out, expected.float())


def test_embedding_mixed_batch_gradient_matches_the_single_adapter_path():
    """Per-row adapters on an embedding follow F.embedding: no gradient reaches padding_idx."""
    model = embedding_model()
    randomise(model)  # A's padding column too, so the forward there is not trivially zero
    ids = ids_with_padding()
    a = model.layer.lora_A[ADAPTER]
    b = model.layer.lora_B[ADAPTER]
    out = model(ids)
    out.square().sum().backward()
    grads = a.grad.clone(), b.grad.clone()
    a.grad = b.grad = None
    with lorakit.adapter_per_row(model, [ADAPTER] * BATCH):
        mixed = model(ids)
        mixed.square().sum().backward()
    torch.testing.assert_close(mixed, out)
    assert not a.grad[:, PAD].any()
    torch.testing.assert_close(a.grad, grads[0])
    torch.testing.assert_close(b.grad, grads[1])


# -- fused slices ----------------------------------------------------------------------------------
@pytest.mark.parametrize("slices", SLICE_PATTERNS, ids=str)
@pytest.mark.parametrize(("make", "transposed"), [f[1:] for f in FUSED], ids=[f[0] for f in FUSED])
def test_fused_slices_are_independent_loras(make, transposed, slices):
    out_features = SLICE_SIZE * len(slices)
    base = seq(make(out_features))
    with torch.no_grad():
        base.layer.bias.normal_()
    reference = copy.deepcopy(base)
    config = CONFIG.replace(fused_slices={"layer": slices})
    model = lorakit.apply_lora(base, config)
    randomise(model)
    x = torch.randn(BATCH, TOKENS, IN)
    out, base_out = model(x), reference(x)

    a, b = ab(model.layer)
    w = model.layer.weight.detach().double()
    w = w.t() if transposed else w  # (out, in)
    bias = model.layer.bias.detach().double()
    t = 0  # index among the adapted slices: slice j's own pair is A[t·r:(t+1)·r], B[t·3:(t+1)·3]
    for j, on in enumerate(slices):
        rows = slice(j * SLICE_SIZE, (j + 1) * SLICE_SIZE)
        if not on:
            assert torch.equal(out[..., rows], base_out[..., rows])
            continue
        a_j = a[t * R : (t + 1) * R].double()  # (r, in)
        b_j = b[t * SLICE_SIZE : (t + 1) * SLICE_SIZE].double()  # (out/k, r)
        xd = x.double()
        expected = xd @ w[rows].t() + bias[rows] + SCALE * (xd @ a_j.t() @ b_j.t())
        torch.testing.assert_close(out[..., rows], expected.float())
        t += 1

    m = sum(slices)
    expected_params = m * R * (IN + out_features // len(slices))
    if slices == (True, False, True):
        assert expected_params == 2 * R * (IN + out_features // 3)
    assert lorakit.count_parameters(model)[0] == expected_params
    assert lorakit.plan(reference, config).adapter_params == expected_params

    weight = model.layer.weight.detach().clone()
    lorakit.merge(model)
    merged_w = model.layer.weight.detach()
    merged_w, weight = (merged_w.t(), weight.t()) if transposed else (merged_w, weight)
    for j, on in enumerate(slices):
        rows = slice(j * SLICE_SIZE, (j + 1) * SLICE_SIZE)
        if not on:  # a slice without adapter keeps its weight bit for bit
            assert torch.equal(merged_w[rows], weight[rows])
    torch.testing.assert_close(model(x), out)


# -- float16 / bfloat16 bases ----------------------------------------------------------------------
# (id, base layer, input, B A laid out like the base weight)
LOW_PRECISION_KINDS = [
    ("linear", lambda: nn.Linear(IN, 5), lambda: torch.randn(BATCH, TOKENS, IN),
     lambda a, b: b @ a),
    ("gpt2-conv1d", lambda: Conv1D(5, IN), lambda: torch.randn(BATCH, TOKENS, IN),
     lambda a, b: (b @ a).t()),
    ("embedding", lambda: nn.Embedding(VOCAB, DIM),
     lambda: torch.randint(0, VOCAB, (BATCH, TOKENS)),
     lambda a, b: (b @ a).t()),
    ("conv2d", lambda: nn.Conv2d(3, 4, 3), lambda: torch.randn(BATCH, 3, 5, 5),
     lambda a, b: (b.flatten(1) @ a.flatten(1)).view(b.shape[0], *a.shape[1:])),
]  # fmt: skip


@pytest.mark.parametrize("dtype", LOW_PRECISION, ids=str)
@pytest.mark.parametrize(
    ("make", "inputs", "delta"),
    [k[1:] for k in LOW_PRECISION_KINDS],
    ids=[k[0] for k in LOW_PRECISION_KINDS],
)
def test_low_precision_base(make, inputs, delta, dtype):
    base = seq(make()).to(dtype)
    reference = copy.deepcopy(base)
    model = lorakit.apply_lora(base, CONFIG)
    layer = model.layer
    assert layer.lora_A[ADAPTER].dtype == torch.float32
    assert layer.lora_B[ADAPTER].dtype == torch.float32
    x = inputs()
    x = x if not x.is_floating_point() else x.to(dtype)
    assert torch.equal(model(x), reference(x))

    randomise(model, std=0.1)  # an update a fraction of the base output: no cancellation
    out = model(x)
    assert out.dtype == dtype
    a, b = ab(layer)
    # the base in its own dtype, plus the update: reference output with the update in float64
    with torch.no_grad():
        ref_layer = copy.deepcopy(reference.layer).double()
        ref_layer.weight.copy_(SCALE * delta(a.double(), b.double()))
        if getattr(ref_layer, "bias", None) is not None:
            ref_layer.bias.zero_()
        xd = x if not x.is_floating_point() else x.double()
        update = ref_layer(xd)
    # the update is added to the base output in float32 and the sum rounded once (as PEFT does)
    torch.testing.assert_close(out, (reference(x).double() + update).to(dtype))

    w = layer.weight.detach().clone()
    lorakit.merge(model)
    hand = (w.float() + delta(a.float(), b.float()) * SCALE).to(dtype)  # float32 delta, one cast
    assert layer.weight.dtype == dtype
    assert torch.equal(layer.weight, hand)


def test_low_precision_merge_casts_once():
    """The delta is added in float32 and the sum cast once, not rounded to bf16 twice."""
    model = lorakit.apply_lora(seq(nn.Linear(IN, 5)).to(torch.bfloat16), CONFIG)
    randomise(model, std=0.1)
    layer = model.layer
    a, b = ab(layer)
    w = layer.weight.detach().clone()
    delta = (b @ a) * SCALE
    once = (w.float() + delta).to(torch.bfloat16)
    twice = w + delta.to(torch.bfloat16)
    assert not torch.equal(once, twice)  # the two orders differ on these weights
    lorakit.merge(model)
    assert torch.equal(layer.weight, once)


# -- merges that would write non-finite values -----------------------------------------------------
def two_layer_fp16() -> nn.Module:
    base = nn.Sequential(OrderedDict(first=nn.Linear(IN, IN), second=nn.Linear(IN, 5))).half()
    return lorakit.apply_lora(base, LoraConfig(r=R, target_modules=("first", "second")))


def test_merge_refuses_a_float16_overflow_and_changes_nothing():
    model = two_layer_fp16()
    randomise(model, std=0.01)
    with torch.no_grad():
        model.second.lora_A[ADAPTER].fill_(HUGE)
        model.second.lora_B[ADAPTER].fill_(HUGE)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(BATCH, IN).half()
    with pytest.raises(MergeError, match="second"):
        lorakit.merge(model)
    with pytest.raises(MergeError, match="second"):
        lorakit.merge_and_unload(model)
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key  # "first" was not merged either
    assert all(not layer.merged_adapters for _, layer in lorakit.lora_layers(model))
    assert isinstance(model.second, lorakit.layers.LoraLayer)
    with torch.no_grad():
        model.second.lora_B[ADAPTER].zero_()
    assert lorakit.merge(model) == ["first", "second"]
    assert torch.isfinite(model(x)).all()


def test_layer_merge_refuses_a_float16_overflow():
    layer = lorakit.apply_lora(nn.Linear(IN, 5).half(), LoraConfig(r=R))
    with torch.no_grad():
        layer.lora_A[ADAPTER].fill_(HUGE)
        layer.lora_B[ADAPTER].fill_(HUGE)
    weight = layer.weight.detach().clone()
    with pytest.raises(MergeError, match="non-finite"):
        layer.merge()
    assert torch.equal(layer.weight, weight)
    assert layer.merged_adapters == []


@pytest.mark.parametrize("bad", [float("inf"), float("nan")], ids=str)
def test_merge_refuses_non_finite_adapters_in_float32(bad):
    model = lorakit.apply_lora(seq(nn.Linear(IN, 5)), CONFIG)
    with torch.no_grad():
        model.layer.lora_B[ADAPTER][0, 0] = bad
    weight = model.layer.weight.detach().clone()
    with pytest.raises(MergeError, match="layer"):
        lorakit.merge(model)
    assert torch.equal(model.layer.weight, weight)
