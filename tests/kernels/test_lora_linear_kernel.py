"""The fused LoRA linear kernel, forward and backward, against the eager path and a float64
reference: ranks 1 to 64, ragged token counts, float32 and bfloat16, dense and 4-bit bases."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("triton", reason="triton is not installed (the kernels extra)")

from lorakit.errors import AdapterError  # noqa: E402
from lorakit.kernels.lora_linear import lora_add, lora_linear  # noqa: E402
from lorakit.layers.linear import _add_low_rank  # noqa: E402
from lorakit.quant import QuantizedWeight, quantized_linear  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # else the interpreter (conftest)
IN, OUT = 96, 80


def _close(got, want):
    """assert_close with the absolute tolerance relative to the tensor's largest entry: the two
    paths sum in different orders (float32 tiles here, torch's kernels there) and gradients are
    sums over every token, so entries that cancel to near zero carry the rounding error of the
    large terms. bfloat16 (8 mantissa bits) also rounds x Aᵀ and dy B differently in the two
    paths: a few of its ulps."""
    top = float(want.detach().abs().max()) or 1.0
    if want.dtype == torch.bfloat16:
        torch.testing.assert_close(got, want, rtol=3e-2, atol=3e-2 * top)
    else:
        torch.testing.assert_close(got, want, rtol=1.3e-6, atol=1e-6 * max(top, 10.0))


def _tensors(rank, dtype, tokens, quantized=False, inp=IN):
    g = torch.Generator().manual_seed(rank * 100 + tokens)
    w = torch.randn(OUT, inp, generator=g) / inp**0.5
    weight = (
        QuantizedWeight.quantize(w, "nf4", compute_dtype=dtype).to(DEVICE)
        if quantized
        else w.to(DEVICE, dtype)
    )
    leaves = dict(
        x=torch.randn(3, tokens, inp, generator=g),
        bias=torch.randn(OUT, generator=g),
        a=torch.randn(rank, inp, generator=g) / inp**0.5,
        b=torch.randn(OUT, rank, generator=g) / rank**0.5,
    )
    leaves = {k: v.to(DEVICE, dtype).requires_grad_(True) for k, v in leaves.items()}
    return weight, leaves


def _clone(leaves):
    return {k: v.detach().clone().requires_grad_(True) for k, v in leaves.items()}


def _grads(out, leaves, grad):
    return torch.autograd.grad(out, list(leaves.values()), grad)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
# (96, 25): 75 rows and rank 96 span more than one tile of rows and of rank
@pytest.mark.parametrize("rank, tokens", [(1, 1), (8, 13), (16, 7), (64, 5), (96, 25)])
def test_forward_and_backward_match_the_eager_path(rank, tokens, dtype):
    weight, k = _tensors(rank, dtype, tokens)
    e = _clone(k)
    s = 2.0 / rank
    got = lora_linear(k["x"], weight, k["bias"], k["a"], k["b"], s)
    want = _add_low_rank(e["x"], F.linear(e["x"], weight, e["bias"]), e["a"], e["b"], s)
    _close(got, want)
    grad = torch.randn_like(got)
    for g, w in zip(_grads(got, k, grad), _grads(want, e, grad)):
        _close(g, w)


@pytest.mark.parametrize("rank", [4, 32])
def test_float32_against_the_float64_formula(rank):
    weight, k = _tensors(rank, torch.float32, 11)
    d = {n: v.detach().double().requires_grad_(True) for n, v in k.items()}
    s = 0.5
    got = lora_linear(k["x"], weight, k["bias"], k["a"], k["b"], s)
    want = d["x"] @ weight.double().T + d["bias"] + s * (d["x"] @ d["a"].T) @ d["b"].T
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)
    grad = torch.randn_like(got)
    for g, w in zip(_grads(got, k, grad), _grads(want, d, grad.double())):
        torch.testing.assert_close(g.double(), w, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "row_limit, inp",
    [(128, 96), (128, 128), (8, 96)],
    # 96 inputs: tiles cross quantization blocks, decoded element by element; 128: each tile
    # row lies in one block, decoded row by row (forward and backward); 27 rows over a limit
    # of 8: W decoded once, whole
    ids=["tiles-by-element", "tiles-by-row", "decoded-once"],
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("rank", [2, 16])
def test_a_4bit_base_matches_quantized_linear(rank, dtype, row_limit, inp, monkeypatch):
    from lorakit.kernels import gemm

    monkeypatch.setattr(gemm, "DECODE_PER_TILE_MAX_ROWS", row_limit)
    weight, k = _tensors(rank, dtype, 9, quantized=True, inp=inp)
    e = _clone(k)
    got = lora_linear(k["x"], weight, k["bias"], k["a"], k["b"], 1.5)
    base = quantized_linear(e["x"], weight, e["bias"])
    want = _add_low_rank(e["x"], base, e["a"], e["b"], 1.5)
    _close(got, want)
    grad = torch.randn_like(got)
    for g, w in zip(_grads(got, k, grad), _grads(want, e, grad)):
        _close(g, w)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("rank, tokens", [(1, 3), (12, 17), (64, 2)])
def test_low_rank_add_matches_the_eager_path(rank, tokens, dtype):
    weight, k = _tensors(rank, dtype, tokens)
    del k["bias"]
    k["out"] = torch.randn(3, tokens, OUT, device=DEVICE, dtype=dtype, requires_grad=True)
    e = _clone(k)
    got = lora_add(k["x"], k["out"], k["a"], k["b"], 0.25)
    want = _add_low_rank(e["x"], e["out"].clone(), e["a"], e["b"], 0.25)  # eager adds in place
    _close(got, want)
    grad = torch.randn_like(got)
    for g, w in zip(_grads(got, k, grad), _grads(want, e, grad)):
        _close(g, w)


def test_float32_input_on_bfloat16_adapters_is_cast_as_the_eager_path_does():
    _, k = _tensors(8, torch.bfloat16, 4)
    x = torch.randn(3, 4, IN, device=DEVICE)
    out = torch.randn(3, 4, OUT, device=DEVICE)
    with torch.no_grad():
        got = lora_add(x, out, k["a"], k["b"], 0.5)
        want = _add_low_rank(x, out.clone(), k["a"], k["b"], 0.5)
    assert got.dtype == torch.float32
    # the eager path rounds the update to bfloat16 (F.linear in the adapters' dtype) before the
    # float32 add; the kernel adds it unrounded: they differ by bfloat16's resolution of it
    torch.testing.assert_close(got, want, rtol=1e-2, atol=2e-2)


def test_shapes_that_do_not_fit_are_refused():
    weight, k = _tensors(4, torch.float32, 2)
    with pytest.raises(AdapterError, match=r"A \(4, 96\) and B \(80, 3\)"):
        lora_linear(k["x"], weight, None, k["a"], k["b"][:, :3], 1.0)
    with pytest.raises(AdapterError, match="must be frozen"):
        lora_linear(k["x"], weight.requires_grad_(True), None, k["a"], k["b"], 1.0)


@pytest.mark.parametrize("quantized", [False, True], ids=["dense", "nf4"])
def test_a_group_of_projections_of_one_input_matches_each_alone(quantized):
    """q/k/v of one input with ranks 8, 1 and 16 (k without bias), an output left unused."""
    from lorakit.kernels.lora_linear import lora_linear_group

    built = [_tensors(r, torch.float32, 6, quantized) for r in (8, 1, 16)]
    x = built[0][1]["x"]
    parts = [(w, k["bias"], k["a"], k["b"], 0.5 + i) for i, (w, k) in enumerate(built)]
    parts[1] = (*parts[1][:1], None, *parts[1][2:])
    leaves = [x] + [t for p in parts for t in (p[1], p[2], p[3]) if t is not None]
    got = lora_linear_group(x, parts)
    want = [lora_linear(x, *p) for p in parts]
    for g, w in zip(got, want):
        _close(g, w)
    grads = [torch.randn_like(y) for y in got[:2]]  # v's output unused: its gradient is zero
    by_index = dict(enumerate(leaves))
    zero = [torch.zeros_like(want[2])]
    for g, w in zip(_grads(got[:2], by_index, grads), _grads(want, by_index, grads + zero)):
        _close(g, w)
