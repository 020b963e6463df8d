"""Mixed-adapter batches: SGMV shrink and expand driven by a token → adapter map.

Each token t of a flattened batch x (T, K) adds the update of its own adapter ``map[t]`` (-1:
none), ``y[t] = out[t] + s_a · B_a A_a x[t]``, as two kernels (Punica's SGMV, vLLM's
``lora_shrink`` / ``lora_expand``):

    shrink:  xa[t, :r_a] = x[t] A_aᵀ          (T, R) float32, R = the largest rank
    expand:  y[t]       += s_a · xa[t, :r_a] B_aᵀ

The adapters are **packed without padding** (:class:`Packed`): every A_a (r_a, K) stacked into
one (Σr, K) buffer and every B_aᵀ into one (Σr, N) buffer, with a rank and an offset per adapter,
so an adapter of rank 4 beside one of rank 64 costs rank 4. Only the small intermediate xa has R
columns.

The tokens are grouped by adapter with fixed-shape tensor operations (a stable sort of the map,
a count by scatter-add and a cumulative sum, :func:`segments`), never on the host, and both
kernels launch a fixed grid (adapters × token blocks × column blocks) whose programs past the
end of their adapter's segment or rank return at once: the same launch serves any map of the
same length, so the kernels can be captured in a CUDA graph for decoding. In a model, a row
plan's segments are formed once, by its first layer, and shared by the others. Each program
multiplies a block of one adapter's tokens with ``tl.dot``.

Gradients reach x (``dx[t] = s_a · (dy[t] B_a) A_a``, the same two kernels with A and Bᵀ
swapped) and ``out``; the packed adapters are constants here (serving). Training several
adapters at once keeps the eager path (``lorakit.layers.rows``), which is also this module's
reference.
"""

from __future__ import annotations

import weakref
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from torch.autograd.function import once_differentiable

from ..errors import AdapterError
from ._util import block, dot, dot_f32, store_as, to_dtype

BLOCK_T = 16  # tokens per program (tl.dot needs at least 16 rows on a GPU)


@dataclass(frozen=True)
class Packed:
    """Adapters of one layer packed without padding; index i is adapter i of the map."""

    a: torch.Tensor  # (Σr, K) every A, one after another
    bt: torch.Tensor  # (Σr, N) every Bᵀ, at the same offsets
    offsets: torch.Tensor  # (n,) int32, first row of adapter i
    ranks: torch.Tensor  # (n,) int32, 0 for an adapter this layer does not have
    scales: torch.Tensor  # (n,) float32
    max_rank: int

    def __len__(self) -> int:
        return self.ranks.numel()


def pack(adapters: Sequence[tuple[torch.Tensor, torch.Tensor, float] | None]) -> Packed:
    """Pack ``(A (r, K), B (N, r), scale)`` per adapter (None: absent, adds nothing)."""
    present = [t for t in adapters if t is not None]
    if not present:
        raise AdapterError("pack: no adapters to pack")
    a0, b0, _ = present[0]
    k, n, dtype = a0.shape[1], b0.shape[0], a0.dtype
    a_parts, b_parts, offsets, ranks, scales, row = [], [], [], [], [], 0
    for i, item in enumerate(adapters):
        a, b, s = item if item is not None else (None, None, 0.0)
        offsets.append(row)
        ranks.append(0 if a is None else a.shape[0])
        scales.append(float(s))
        if a is None:
            continue
        if a.dim() != 2 or b.dim() != 2 or a.shape[1] != k or b.shape != (n, a.shape[0]):
            raise AdapterError(
                f"pack: adapter {i} has A {tuple(a.shape)} and B {tuple(b.shape)}; every adapter "
                f"needs A (r, {k}) and B ({n}, r)"
            )
        a_parts.append(a.detach().to(dtype))
        b_parts.append(b.detach().to(dtype).t())
        row += a.shape[0]
    device = a0.device
    ints = dict(dtype=torch.int32, device=device)
    return Packed(
        torch.cat(a_parts).contiguous(),
        torch.cat(b_parts).contiguous(),
        torch.tensor(offsets, **ints),
        torch.tensor(ranks, **ints),
        torch.tensor(scales, dtype=torch.float32, device=device),
        max(ranks),
    )


def segments(token_map: torch.Tensor, n: int) -> tuple[torch.Tensor, ...]:
    """(order (T,), starts (n,), counts (n,)) int32: the tokens sorted by adapter (stable; -1
    last), where each adapter's run starts and how long it is. Fixed shapes, no host sync."""
    key = torch.where(token_map < 0, n, token_map).to(torch.int64)
    order = torch.sort(key, stable=True).indices
    counts = torch.zeros(n + 1, dtype=torch.int64, device=key.device)
    counts = counts.scatter_add_(0, key, torch.ones_like(key))[:n]  # bincount would sync
    starts = torch.cumsum(counts, 0) - counts
    return order.to(torch.int32), starts.to(torch.int32), counts.to(torch.int32)


@triton.jit
def _shrink_kernel(
    x_ptr, w_ptr, out_ptr, order_ptr, starts_ptr, counts_ptr, offsets_ptr, ranks_ptr,
    K, R_OUT,
    DOT_F32: tl.constexpr, IEEE: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    """out[t, j] = Σ_k x[t, k] · w[off_a + j, k] for j < r_a, a = the adapter of token t."""
    a = tl.program_id(0)
    count = tl.load(counts_ptr + a)
    rank = tl.load(ranks_ptr + a)
    if tl.program_id(1) * BLOCK_T >= count or tl.program_id(2) * BLOCK_R >= rank:
        return
    pos = tl.program_id(1) * BLOCK_T + tl.arange(0, BLOCK_T)
    mask_t = pos < count
    tok = tl.load(order_ptr + tl.load(starts_ptr + a) + pos, mask=mask_t, other=0)
    rr = tl.program_id(2) * BLOCK_R + tl.arange(0, BLOCK_R)
    mask_r = rr < rank
    rows = tl.load(offsets_ptr + a) + rr
    acc = tl.zeros((BLOCK_T, BLOCK_R), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        rk = k0 + tl.arange(0, BLOCK_K)
        mask_k = rk < K
        xmask = mask_t[:, None] & mask_k
        xt = tl.load(x_ptr + tok[:, None] * K + rk[None, :], mask=xmask, other=0.0)
        xt = to_dtype(xt.to(tl.float32), w_ptr.dtype.element_ty)  # x in the adapter's dtype
        wmask = mask_k[:, None] & mask_r[None, :]
        wt = tl.load(w_ptr + rows[None, :] * K + rk[:, None], mask=wmask, other=0.0)
        acc = dot(xt, wt, acc, DOT_F32, IEEE)
    mask = mask_t[:, None] & mask_r[None, :]
    tl.store(out_ptr + tok[:, None] * R_OUT + rr[None, :], acc, mask=mask)


@triton.jit
def _expand_kernel(
    xa_ptr, w_ptr, y_ptr, order_ptr, starts_ptr, counts_ptr, offsets_ptr, ranks_ptr, scales_ptr,
    N, R_IN,
    DOT_F32: tl.constexpr, IEEE: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    """y[t, n] += s_a · Σ_j xa[t, j] · w[off_a + j, n] for j < r_a, in place."""
    a = tl.program_id(0)
    count = tl.load(counts_ptr + a)
    rank = tl.load(ranks_ptr + a)
    if tl.program_id(1) * BLOCK_T >= count or rank == 0:
        return
    pos = tl.program_id(1) * BLOCK_T + tl.arange(0, BLOCK_T)
    mask_t = pos < count
    tok = tl.load(order_ptr + tl.load(starts_ptr + a) + pos, mask=mask_t, other=0)
    rn = tl.program_id(2) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = rn < N
    off = tl.load(offsets_ptr + a)
    acc = tl.zeros((BLOCK_T, BLOCK_N), dtype=tl.float32)
    for r0 in range(0, rank, BLOCK_R):
        rr = r0 + tl.arange(0, BLOCK_R)
        mask_r = rr < rank
        lmask = mask_t[:, None] & mask_r[None, :]
        lt = tl.load(xa_ptr + tok[:, None] * R_IN + rr[None, :], mask=lmask, other=0.0)
        lt = to_dtype(lt, w_ptr.dtype.element_ty)  # rounded as the eager path rounds x Aᵀ
        wmask = mask_r[:, None] & mask_n[None, :]
        wt = tl.load(w_ptr + (off + rr)[:, None] * N + rn[None, :], mask=wmask, other=0.0)
        acc = dot(lt, wt, acc, DOT_F32, IEEE)
    mask = mask_t[:, None] & mask_n[None, :]
    ptr = y_ptr + tok[:, None] * N + rn[None, :]
    y = tl.load(ptr, mask=mask, other=0.0).to(tl.float32) + tl.load(scales_ptr + a) * acc
    store_as(ptr, y, mask)


def shrink(x: torch.Tensor, w: torch.Tensor, packed: Packed, segs) -> torch.Tensor:
    """(T, R) float32: each token times its adapter's rows of ``w`` (Σr, K); zero elsewhere."""
    t, k = x.shape
    out = torch.zeros((t, max(packed.max_rank, 1)), dtype=torch.float32, device=x.device)
    block_r = block(packed.max_rank, hi=64)
    grid = (len(packed), triton.cdiv(t, BLOCK_T), triton.cdiv(packed.max_rank, block_r))
    _shrink_kernel[grid](
        x, w, out, *segs, packed.offsets, packed.ranks, k, out.shape[1],
        DOT_F32=dot_f32(), IEEE=w.dtype == torch.float32,
        BLOCK_T=BLOCK_T, BLOCK_R=block_r, BLOCK_K=block(k, hi=64),
    )  # fmt: skip
    return out


def expand_(y: torch.Tensor, xa: torch.Tensor, w: torch.Tensor, packed: Packed, segs) -> None:
    """``y[t] += s_a · xa[t, :r_a] w[rows of a]`` in place; ``w`` (Σr, N)."""
    t, n = y.shape
    block_n = block(n, hi=64)
    grid = (len(packed), triton.cdiv(t, BLOCK_T), triton.cdiv(n, block_n))
    _expand_kernel[grid](
        xa, w, y, *segs, packed.offsets, packed.ranks, packed.scales, n, xa.shape[1],
        DOT_F32=dot_f32(), IEEE=w.dtype == torch.float32,
        BLOCK_T=BLOCK_T, BLOCK_R=block(packed.max_rank, hi=64), BLOCK_N=block_n,
    )  # fmt: skip


class _Mixed(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, out, packed, segs):
        y = out.clone()
        expand_(y, shrink(x, packed.a, packed, segs), packed.bt, packed, segs)
        ctx.packed, ctx.segs = packed, segs
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, dy):
        packed, segs = ctx.packed, ctx.segs
        dy = dy.contiguous()
        grad_x = None
        if ctx.needs_input_grad[0]:  # dx[t] = s_a (dy[t] B_a) A_a
            grad_x = torch.zeros((dy.shape[0], packed.a.shape[1]), dtype=dy.dtype, device=dy.device)
            expand_(grad_x, shrink(dy, packed.bt, packed, segs), packed.a, packed, segs)
        return grad_x, dy if ctx.needs_input_grad[1] else None, None, None


def add_mixed(
    x: torch.Tensor, out: torch.Tensor, packed: Packed, token_map: torch.Tensor
) -> torch.Tensor:
    """``out[t] + s_a B_a A_a x[t]`` with ``a = token_map[t]`` (-1: out[t] unchanged).

    x (T, K), out (T, N), token_map (T,) integers in [-1, len(packed)). Returns a new tensor in
    out's dtype; differentiable in x and out.
    """
    if x.dim() != 2 or out.dim() != 2 or token_map.shape != (x.shape[0],):
        raise AdapterError(
            f"add_mixed: x {tuple(x.shape)}, out {tuple(out.shape)} and token_map "
            f"{tuple(token_map.shape)} do not fit x (T, K), out (T, N), token_map (T,)"
        )
    if x.shape[1] != packed.a.shape[1] or out.shape != (x.shape[0], packed.bt.shape[1]):
        raise AdapterError(
            f"add_mixed: x {tuple(x.shape)} and out {tuple(out.shape)} do not fit adapters "
            f"with A (r, {packed.a.shape[1]}) and B ({packed.bt.shape[1]}, r)"
        )
    return _Mixed.apply(
        x.contiguous(), out.contiguous(), packed, _checked_segments(token_map, x, len(packed))
    )


def _checked_segments(token_map: torch.Tensor, x: torch.Tensor, n: int) -> tuple:
    """:func:`segments` of a map checked to name packed adapters only (the check reads the map's
    largest entry on the host, so it is skipped while a CUDA graph is being captured)."""
    capturing = x.is_cuda and torch.cuda.is_current_stream_capturing()
    if not capturing and token_map.numel() and int(token_map.max()) >= n:
        raise AdapterError(
            f"add_mixed: token_map holds adapter {int(token_map.max())} but only "
            f"{n} adapters are packed (valid: -1 to {n - 1})"
        )
    return segments(token_map.to(x.device), n)


def add_rows(layer, x: torch.Tensor, out: torch.Tensor, table, slots: torch.Tensor) -> torch.Tensor:
    """The stacked mixed-batch update of a linear-like LoRA layer (``lorakit.layers.rows``) by
    the kernels: row i adds the adapter of slot ``slots[i]`` (slot 0, the base, adds nothing).

    x (rows, ..., K), out (rows, ..., N). The layer's adapters are packed in the table's slot
    order (absent ones with rank 0) and kept while no adapter tensor changes, as the eager stack
    is.
    """
    packed = _packed_for(layer, table)
    flat_x = x.reshape(-1, x.shape[-1])
    segs = _plan_segments(slots, flat_x, flat_x.shape[0] // x.shape[0], len(packed))
    y = _Mixed.apply(flat_x.contiguous(), out.reshape(-1, out.shape[-1]).contiguous(), packed, segs)
    return y.view(out.shape)


#: id(slots) -> (weak reference to slots, {(tokens per row, adapters): segments}): the segments
#: of a plan's rows, formed by its first layer and read by the others (no per-layer sort, and one
#: host read of the map per plan instead of one per layer); an entry dies with its plan's slots
_plan_cache: dict[int, tuple] = {}


def _plan_segments(slots: torch.Tensor, flat_x: torch.Tensor, per_row: int, n: int) -> tuple:
    entry = _plan_cache.get(id(slots))
    if entry is None or entry[0]() is not slots:
        if len(_plan_cache) > 64:  # forget the plans that are gone
            for key in [k for k, (ref, _) in _plan_cache.items() if ref() is None]:
                del _plan_cache[key]
        entry = _plan_cache[id(slots)] = (weakref.ref(slots), {})
    segs = entry[1].get((per_row, n))
    if segs is None:
        token_map = (slots.to(flat_x.device) - 1).repeat_interleave(per_row)  # slot 0 -> -1
        segs = entry[1][(per_row, n)] = _checked_segments(token_map, flat_x, n)
    return segs


def _packed_for(layer, table) -> Packed:
    params = [*layer._A.values(), *layer._B.values()]
    key = (
        table.names,
        tuple((id(p), p.data_ptr(), p._version) for p in params),
        tuple(r.scale for r in layer.records.values()),
    )
    cached = getattr(layer, "_packed_cache", None)
    if cached is not None and cached[0] == key:
        return cached[1]
    with torch.no_grad():
        packed = pack(
            [
                (layer._A[n], layer.effective_B(n), layer.records[n].scale)
                if n in layer.records
                else None
                for n in table.names
            ]
        )
    layer._packed_cache = (key, packed)
    return packed
