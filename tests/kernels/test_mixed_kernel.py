"""SGMV shrink/expand for mixed batches against a per-token float64 reference and the eager
stacked path: adapters of ranks 1 to 64 packed without padding, tokens without an adapter,
ragged token counts, float32 and bfloat16, the gradient of x."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton", reason="triton is not installed (the kernels extra)")

from lorakit.errors import AdapterError  # noqa: E402
from lorakit.kernels.mixed import add_mixed, pack, segments  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # else the interpreter (conftest)
IN, OUT = 72, 48
RANKS = (1, 8, None, 64, 3)  # None: an adapter this layer does not have


def _adapters(dtype, ranks=RANKS):
    g = torch.Generator().manual_seed(1)
    out = []
    for i, r in enumerate(ranks):
        if r is None:
            out.append(None)
            continue
        a = torch.randn(r, IN, generator=g) / IN**0.5
        b = torch.randn(OUT, r, generator=g) / r**0.5
        out.append((a.to(DEVICE, dtype), b.to(DEVICE, dtype), 0.5 + i))
    return out


def _map(tokens, n, seed):
    return torch.randint(-1, n, (tokens,), generator=torch.Generator().manual_seed(seed))


def _reference(x, out, adapters, token_map):
    """out[t] + s_a B_a A_a x[t] per token in float64, the adapters' values as stored."""
    y = out.double().clone()
    for t, i in enumerate(token_map.tolist()):
        if i >= 0 and adapters[i] is not None:
            a, b, s = adapters[i]
            y[t] += s * (b.double() @ (a.double() @ x[t].double()))
    return y


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("tokens", [1, 7, 37])
def test_each_token_adds_its_own_adapter(tokens, dtype):
    adapters = _adapters(dtype)
    packed = pack(adapters)
    token_map = _map(tokens, len(adapters), tokens)
    x = torch.randn(tokens, IN, device=DEVICE, dtype=dtype, requires_grad=True)
    out = torch.randn(tokens, OUT, device=DEVICE, dtype=dtype, requires_grad=True)
    got = add_mixed(x, out, packed, token_map.to(DEVICE))
    assert got.dtype == dtype
    xd = x.detach().double().requires_grad_(True)
    outd = out.detach().double().requires_grad_(True)
    want = _reference(xd, outd, adapters, token_map)
    # bfloat16: x Aᵀ and the output are rounded to 8 mantissa bits (as the eager path does)
    tol = dict(rtol=2e-2, atol=3e-2) if dtype == torch.bfloat16 else dict(rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got.double(), want, **tol)
    grad = torch.randn(tokens, OUT, device=DEVICE, dtype=dtype)
    gx, gout = torch.autograd.grad(got, (x, out), grad)
    wx, wout = torch.autograd.grad(want, (xd, outd), grad.double())
    torch.testing.assert_close(gx.double(), wx, **tol)
    assert torch.equal(gout, grad)


def test_a_rank_above_one_tile_is_summed_in_chunks():
    adapters = _adapters(torch.float32, ranks=(80, 2))  # rank 80: two chunks of 64 columns
    token_map = torch.tensor([0, 1, 0, -1, 0])
    x = torch.randn(5, IN, device=DEVICE)
    out = torch.randn(5, OUT, device=DEVICE)
    got = add_mixed(x, out, pack(adapters), token_map.to(DEVICE))
    want = _reference(x, out, adapters, token_map)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)


def test_tokens_without_an_adapter_keep_their_output_exactly():
    adapters = _adapters(torch.float32)
    token_map = torch.tensor([-1, 2, 0, -1, 3, -1])  # 2: absent from this layer
    x = torch.randn(6, IN, device=DEVICE)
    out = torch.randn(6, OUT, device=DEVICE)
    got = add_mixed(x, out, pack(adapters), token_map.to(DEVICE))
    untouched = torch.tensor([0, 1, 3, 5])
    assert torch.equal(got[untouched].cpu(), out[untouched].cpu())
    assert not torch.equal(got[2].cpu(), out[2].cpu())


def test_adapters_are_packed_without_padding():
    packed = pack(_adapters(torch.float32))
    assert packed.a.shape == (1 + 8 + 64 + 3, IN)
    assert packed.bt.shape == (1 + 8 + 64 + 3, OUT)
    assert packed.ranks.tolist() == [1, 8, 0, 64, 3]
    assert packed.offsets.tolist() == [0, 1, 9, 9, 73]
    assert packed.max_rank == 64


def test_segments_group_tokens_by_adapter_with_fixed_shapes():
    token_map = torch.tensor([2, -1, 0, 2, 1, 0, -1, 2])
    order, starts, counts = segments(token_map, 4)
    assert order.shape == (8,) and starts.shape == counts.shape == (4,)
    assert counts.tolist() == [2, 1, 3, 0]
    assert starts.tolist() == [0, 2, 3, 6]
    assert order.tolist() == [2, 5, 4, 0, 3, 7, 1, 6]  # stable; tokens without adapter last


def test_a_map_naming_an_adapter_that_is_not_packed_is_refused():
    packed = pack(_adapters(torch.float32))
    x, out = torch.randn(3, IN, device=DEVICE), torch.randn(3, OUT, device=DEVICE)
    with pytest.raises(AdapterError, match="adapter 5 but only 5 adapters.*-1 to 4"):
        add_mixed(x, out, packed, torch.tensor([0, 5, -1], device=DEVICE))
    with pytest.raises(AdapterError, match=r"A \(r, 72\) and B \(48, r\)"):
        add_mixed(x[:, :10], out, packed, torch.tensor([0, 1, -1], device=DEVICE))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA device")
def test_one_captured_graph_serves_every_map():
    adapters = _adapters(torch.bfloat16)
    packed = pack(adapters)
    x = torch.randn(64, IN, device="cuda", dtype=torch.bfloat16)
    out = torch.randn(64, OUT, device="cuda", dtype=torch.bfloat16)
    token_map = _map(64, len(adapters), 0).cuda()
    add_mixed(x, out, packed, token_map)  # compiles the kernels before the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y = add_mixed(x, out, packed, token_map)
    for seed in (1, 2):
        token_map.copy_(_map(64, len(adapters), seed))
        graph.replay()
        want = _reference(x, out, adapters, token_map.cpu())
        torch.testing.assert_close(y.double(), want, rtol=2e-2, atol=3e-2)
