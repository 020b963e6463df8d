"""The one tiled GEMM the kernels launch: a base product, a low-rank epilogue, a 4-bit weight.

    out (M, N) = acc + x (M, K) · W (K, N) + bias (N) + s · L (M, R) · Rm (R, N)

each term optional. ``W`` is a dense matrix or a 4-bit :class:`~lorakit.quant.QuantizedWeight`
whose tiles are decoded from the codes as they are loaded (row by row, :func:`.nf4.quant_rows`,
where a tile's row lies in one quantization block, else element by element,
:func:`.nf4.quant_values`), so no
weight-sized tensor is written (up to ``DECODE_PER_TILE_MAX_ROWS`` rows of x; past that W is
decoded once, see there); either W or Rm may be read transposed (``x Wᵀ`` for a
forward pass, ``dy W`` for its backward). Each program owns one (BLOCK_M, BLOCK_N) tile of the
output: it walks K in BLOCK_K steps for the base product, then R in BLOCK_R steps for the
low-rank product (the *epilogue*: the second GEMM of LoRA runs in the same program, on the tile
still in registers, instead of re-reading a finished output), and writes the tile once, rounded
once to the output dtype. Sums are float32.

Used as: the shrink ``x Aᵀ`` (M, r) (W = A, no epilogue); the fused forward
``x Wᵀ + bias + s (x Aᵀ) Bᵀ``; the backward ``dy W + s (dy B) A``; and ``out + s (x Aᵀ) Bᵀ``
on a base output computed elsewhere (``acc``).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..errors import AdapterError
from ..quant.weight import QuantizedWeight
from ._util import block, dot, dot_f32, store_as, to_dtype
from .nf4 import dequantize, quant_rows, quant_values, weight_args


@triton.jit
def _gemm_kernel(
    x_ptr, w_ptr, packed_ptr, code_ptr, absmax_ptr, nested_ptr, nested_code_ptr, offset,
    l_ptr, r_ptr, bias_ptr, acc_ptr, out_ptr,
    M, N, K, R, scale,
    stride_wk, stride_wn, stride_rr, stride_rn,
    BLOCKSIZE: tl.constexpr, DOUBLE: tl.constexpr, HAS_OFFSET: tl.constexpr,
    HAS_BASE: tl.constexpr, QUANT: tl.constexpr, HAS_LORA: tl.constexpr,
    HAS_BIAS: tl.constexpr, HAS_ACC: tl.constexpr, DOT_F32: tl.constexpr, IEEE: tl.constexpr,
    BY_ROWS: tl.constexpr, W_TRANS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
):  # fmt: skip
    rm = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m = rm < M
    mask_n = rn < N
    mask = mask_m[:, None] & mask_n[None, :]
    tile = rm[:, None] * N + rn[None, :]
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    if HAS_ACC:
        acc += tl.load(acc_ptr + tile, mask=mask, other=0.0).to(tl.float32)
    if HAS_BASE:  # the base product accumulates into the tile itself: no second accumulator
        for k0 in range(0, K, BLOCK_K):
            rk = k0 + tl.arange(0, BLOCK_K)
            mask_k = rk < K
            xmask = mask_m[:, None] & mask_k
            xt = tl.load(x_ptr + rm[:, None] * K + rk[None, :], mask=xmask, other=0.0)
            widx = rk[:, None] * stride_wk + rn[None, :] * stride_wn  # (BLOCK_K, BLOCK_N)
            wmask = mask_k[:, None] & mask_n[None, :]
            if QUANT:  # decoded from the codes, rounded to x's dtype as dequantize(dtype) does
                if BY_ROWS and W_TRANS:  # x Wᵀ: the tile is W[rn, k0 : k0 + BLOCK_K]ᵀ
                    wt = tl.trans(quant_rows(
                        rn, k0, K, mask_n, packed_ptr, code_ptr, absmax_ptr, nested_ptr,
                        nested_code_ptr, offset, BLOCKSIZE, DOUBLE, HAS_OFFSET, BLOCK_K,
                    ))  # fmt: skip
                elif BY_ROWS:  # dy W: the tile is W[rk, this program's columns]
                    wt = quant_rows(
                        rk, tl.program_id(1) * BLOCK_N, N, mask_k, packed_ptr, code_ptr,
                        absmax_ptr, nested_ptr, nested_code_ptr, offset, BLOCKSIZE, DOUBLE,
                        HAS_OFFSET, BLOCK_N,
                    )  # fmt: skip
                else:
                    wt = quant_values(
                        widx, wmask, packed_ptr, code_ptr, absmax_ptr, nested_ptr,
                        nested_code_ptr, offset, BLOCKSIZE, DOUBLE, HAS_OFFSET,
                    )  # fmt: skip
                wt = to_dtype(wt, x_ptr.dtype.element_ty)
            else:
                wt = tl.load(w_ptr + widx, mask=wmask, other=0.0)
            acc = dot(xt, wt, acc, DOT_F32, IEEE)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + rn, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    if HAS_LORA:  # the epilogue: s · L Rm on the tile still held
        low = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for r0 in range(0, R, BLOCK_R):
            rr = r0 + tl.arange(0, BLOCK_R)
            mask_r = rr < R
            lmask = mask_m[:, None] & mask_r
            lt = tl.load(l_ptr + rm[:, None] * R + rr[None, :], mask=lmask, other=0.0)
            ridx = rr[:, None] * stride_rr + rn[None, :] * stride_rn
            rt = tl.load(r_ptr + ridx, mask=mask_r[:, None] & mask_n[None, :], other=0.0)
            low = dot(lt, rt, low, DOT_F32, IEEE)
        acc += scale * low
    store_as(out_ptr + tile, acc, mask)


def _by_rows(weight: QuantizedWeight, cols: int) -> bool:
    """Whether a 4-bit W's tiles can be decoded row by row (:func:`.nf4.quant_rows`): a tile's
    ``cols`` columns of W fall in one quantization block of each row."""
    return cols >= 2 and weight.shape[1] % cols == 0 and weight.blocksize % cols == 0


def warps(block_m: int, block_n: int) -> int:
    """Warps per program: 8 for a full 64 x 64 tile (about 100-180 registers a thread for sm_90
    instead of 250-255 with 4, ptxas says), else 4."""
    return 8 if block_m * block_n >= 64 * 64 else 4


def _strides(rows_cols: tuple[int, int], transposed: bool) -> tuple[int, int]:
    """(stride along the reduced axis, stride along the output axis) of a row-major matrix read
    as itself (K, N) or transposed ((N, K) read as its transpose)."""
    return (1, rows_cols[1]) if transposed else (rows_cols[1], 1)


def gemm(
    x: torch.Tensor | None,
    weight: torch.Tensor | QuantizedWeight | None,
    *,
    transpose: bool = True,
    low: torch.Tensor | None = None,
    right: torch.Tensor | None = None,
    right_transpose: bool = True,
    scale: float = 1.0,
    bias: torch.Tensor | None = None,
    acc: torch.Tensor | None = None,
    n: int | None = None,
    dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """``acc + x·op(W) + bias + scale · low·op(right)`` as a new (M, N) tensor; see the module.

    ``x`` (M, K), ``low`` (M, R) and ``acc`` (M, N) are 2-D; ``op(W)`` is ``Wᵀ`` for a weight
    stored (N, K) (``transpose=True``, a linear layer's layout) or W stored (K, N); likewise
    ``right``. Output dtype: ``dtype``, else x's, else low's.
    """
    first = x if x is not None else low if low is not None else acc
    m = first.shape[0]
    if weight is not None:
        rows_cols = tuple(weight.shape)
        n = n or rows_cols[0 if transpose else 1]
        k = rows_cols[1 if transpose else 0]
        if x is None or x.shape[1] != k:
            got = "no x" if x is None else f"x {tuple(x.shape)}"
            raise AdapterError(f"gemm: {got} does not reduce with W {rows_cols}")
    else:
        k = 0
    r = 0
    if low is not None:
        r_shape = tuple(right.shape)
        n = n or r_shape[0 if right_transpose else 1]
        r = low.shape[1]
        if r_shape[1 if right_transpose else 0] != r:
            raise AdapterError(f"gemm: low {tuple(low.shape)} does not reduce with {r_shape}")
    n = n or acc.shape[1]
    out = torch.empty((m, n), dtype=dtype or first.dtype, device=first.device)
    if m == 0 or n == 0:
        return out.zero_() if acc is None else out.copy_(acc)
    quant = isinstance(weight, QuantizedWeight)
    if quant and m > DECODE_PER_TILE_MAX_ROWS:
        lora = (low, right, right_transpose, scale)
        return _decoded_once(x, weight, transpose, out.dtype, *lora, bias, acc)
    dummy = out
    if quant:
        q_tensors, consts = weight_args(weight)
    else:  # unused pointers and constants of the 4-bit branch
        q_tensors = (dummy, dummy, dummy, dummy, dummy, 0.0)
        consts = dict(BLOCKSIZE=64, DOUBLE=False, HAS_OFFSET=False)
    w_strides = _strides(rows_cols, transpose) if weight is not None else (0, 0)
    r_strides = _strides(tuple(right.shape), right_transpose) if low is not None else (0, 0)
    compute = x.dtype if x is not None else low.dtype if low is not None else out.dtype
    block_m, block_n, block_k = block(m, hi=64), block(n, hi=64), block(k, hi=64)
    grid = (triton.cdiv(m, block_m), triton.cdiv(n, block_n))
    by_rows = quant and _by_rows(weight, block_k if transpose else block_n)
    _gemm_kernel[grid](
        _c(x, dummy), dummy if quant or weight is None else weight.contiguous(), *q_tensors,
        _c(low, dummy), _c(right, dummy), _c(bias, dummy), _c(acc, dummy), out,
        m, n, k, r, float(scale), *w_strides, *r_strides, **consts,
        HAS_BASE=weight is not None, QUANT=quant, HAS_LORA=low is not None,
        HAS_BIAS=bias is not None, HAS_ACC=acc is not None, DOT_F32=dot_f32(),
        IEEE=compute == torch.float32, BY_ROWS=by_rows, W_TRANS=transpose,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, BLOCK_R=block(r, hi=64),
        enable_fp_fusion=not quant, num_warps=warps(block_m, block_n),
    )  # fmt: skip
    return out


#: a 4-bit W is decoded tile by tile inside the GEMM for at most this many rows of x: each
#: program of BLOCK_M rows decodes its own tiles, so W is decoded M / BLOCK_M times over. Few rows
#: (decoding, small batches): the codes are the only weight bytes read. More rows (training,
#: prefill): W is decoded once, whole, by :func:`.nf4.dequantize`, and torch's GEMM runs on it
#: (a weight-sized temporary for the time of one product, as bitsandbytes does).
DECODE_PER_TILE_MAX_ROWS = 128


def _decoded_once(x, weight, transpose, out_dtype, low, right, right_transpose, scale, bias, acc):
    dense = dequantize(weight, x.dtype)  # freed when this returns
    base = x @ (dense.t() if transpose else dense)
    if bias is not None:
        base += bias
    if acc is not None:
        base += acc
    if low is None:
        return base.to(out_dtype)
    return gemm(
        None, None, low=low, right=right, right_transpose=right_transpose, scale=scale, acc=base,
        dtype=out_dtype,
    )  # fmt: skip


def _c(t: torch.Tensor | None, dummy: torch.Tensor) -> torch.Tensor:
    return dummy if t is None else t.contiguous()


def linear(
    x: torch.Tensor, weight: torch.Tensor | QuantizedWeight, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """``F.linear(x, W, bias)`` for x of any leading shape; W dense (N, K) or 4-bit."""
    flat = x.reshape(-1, x.shape[-1])
    out = gemm(flat, weight, transpose=True, bias=bias)
    return out.view(*x.shape[:-1], out.shape[-1])
