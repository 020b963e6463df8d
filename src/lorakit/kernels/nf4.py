"""4-bit (NF4 / FP4) dequantization in Triton, bit-identical to the eager path and bitsandbytes.

A 4-bit weight of n elements (``lorakit.quant.QuantizedWeight``, bitsandbytes' layout) holds

    packed  (ceil(n/2),) uint8   element i in byte i // 2, the high nibble when i is even
    absmax  (n/B,)  float32 block scales, or uint8 codes of them (double quantization)
    nested_absmax (n/B/256,) float32, nested_code (256,) float32, offset: the second level

and element i is

    scale(b) = nested_code[absmax[b]] · nested_absmax[b // 256] + offset     (b = i // B)
    w[i]     = code[q_i] · scale(b)                                         (float32)

each product and sum rounded to float32 on its own, as torch computes it; the kernels are
launched with ``enable_fp_fusion=False`` so that no multiply-add is contracted into an FMA
(which would round once and change the last bit). The result is cast to the output dtype
rounding to nearest even, as ``Tensor.to`` does.

:func:`quant_values` is the jit function every kernel that reads a 4-bit weight uses (the GEMM of
:mod:`.gemm` calls it on each tile, so for few rows of input a weight is never decoded whole).
:func:`dequantize` writes the whole weight (the reference is ``QuantizedWeight.dequantize``);
:func:`dequantize_matmul` is ``x Wᵀ + bias`` on the codes.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.autograd.function import once_differentiable

from ..errors import QuantError
from ..quant.codebooks import FOUR_BIT
from ..quant.weight import QuantizedWeight
from ._util import FLOATS, store_as

NESTED = 256  # bitsandbytes' nested block size (lorakit.quant.blockwise.NESTED_BLOCKSIZE)


@triton.jit
def block_scales(
    blk, mask, absmax_ptr, nested_ptr, nested_code_ptr, offset,
    DOUBLE: tl.constexpr, HAS_OFFSET: tl.constexpr,
):  # fmt: skip
    """float32 scale of each 4-bit block ``blk`` (any shape): the absmax, or its 8-bit code
    decoded (``nested_code[c] · nested_absmax[b // 256] + offset``, two roundings)."""
    if DOUBLE:
        c = tl.load(absmax_ptr + blk, mask=mask, other=0).to(tl.int32)
        scale = tl.load(nested_code_ptr + c, mask=mask, other=0.0)
        scale = scale * tl.load(nested_ptr + blk // 256, mask=mask, other=0.0)
        if HAS_OFFSET:
            scale = scale + offset
    else:
        scale = tl.load(absmax_ptr + blk, mask=mask, other=0.0)
    return scale


@triton.jit
def quant_values(
    idx,
    mask,
    packed_ptr,
    code_ptr,
    absmax_ptr,
    nested_ptr,
    nested_code_ptr,
    offset,
    BLOCKSIZE: tl.constexpr,
    DOUBLE: tl.constexpr,
    HAS_OFFSET: tl.constexpr,
):
    """float32 values of the 4-bit weight at flat indices ``idx`` (any shape; 0 where masked)."""
    byte = tl.load(packed_ptr + idx // 2, mask=mask, other=0).to(tl.int32)
    q = (byte >> ((1 - idx % 2) * 4)) & 0xF  # element 0 of a byte in its high nibble
    v = tl.load(code_ptr + q, mask=mask, other=0.0)
    scale = block_scales(
        idx // BLOCKSIZE, mask, absmax_ptr, nested_ptr, nested_code_ptr, offset, DOUBLE, HAS_OFFSET
    )
    return v * scale


@triton.jit
def quant_rows(
    rows,
    col0,
    ncols,
    mask,
    packed_ptr,
    code_ptr,
    absmax_ptr,
    nested_ptr,
    nested_code_ptr,
    offset,
    BLOCKSIZE: tl.constexpr,
    DOUBLE: tl.constexpr,
    HAS_OFFSET: tl.constexpr,
    COLS: tl.constexpr,
):
    """float32 tile ``W[rows, col0 : col0 + COLS]`` (len(rows), COLS) of a 4-bit W with ``ncols``
    columns, each byte read once and each row's scale decoded once. Needs every row's COLS
    values in one quantization block: ``ncols`` and ``col0`` multiples of COLS, and COLS
    dividing BLOCKSIZE (the caller checks); ``mask`` masks rows."""
    start = rows.to(tl.int64) * ncols + col0  # (rows,) even: the first element of each row
    j = tl.arange(0, COLS // 2)
    byte = tl.load(packed_ptr + start[:, None] // 2 + j[None, :], mask=mask[:, None], other=0)
    byte = byte.to(tl.int32)
    high = tl.load(code_ptr + (byte >> 4))
    low = tl.load(code_ptr + (byte & 0xF))
    scale = block_scales(
        start // BLOCKSIZE, mask, absmax_ptr, nested_ptr, nested_code_ptr, offset, DOUBLE,
        HAS_OFFSET,
    )  # fmt: skip
    return tl.interleave(high, low) * scale[:, None]  # element 2j from the high nibble


@triton.jit
def _dequantize_kernel(
    out_ptr,
    n,
    packed_ptr,
    code_ptr,
    absmax_ptr,
    nested_ptr,
    nested_code_ptr,
    offset,
    BLOCKSIZE: tl.constexpr,
    DOUBLE: tl.constexpr,
    HAS_OFFSET: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """BLOCK elements a program (a whole number of 4-bit blocks): each byte read once and both
    its codes decoded, the values interleaved back into element order, each block's scale
    decoded once and broadcast over its BLOCKSIZE values."""
    pid = tl.program_id(0).to(tl.int64)
    b = pid * (BLOCK // 2) + tl.arange(0, BLOCK // 2)
    byte = tl.load(packed_ptr + b, mask=b < (n + 1) // 2, other=0).to(tl.int32)
    high = tl.load(code_ptr + (byte >> 4))
    low = tl.load(code_ptr + (byte & 0xF))
    v = tl.interleave(high, low)  # (BLOCK,): element 2i from the high nibble of byte i
    blk = pid * (BLOCK // BLOCKSIZE) + tl.arange(0, BLOCK // BLOCKSIZE)
    scale = block_scales(
        blk, blk < tl.cdiv(n, BLOCKSIZE), absmax_ptr, nested_ptr, nested_code_ptr, offset,
        DOUBLE, HAS_OFFSET,
    )  # fmt: skip
    v = tl.reshape(tl.reshape(v, (BLOCK // BLOCKSIZE, BLOCKSIZE)) * scale[:, None], (BLOCK,))
    idx = pid * BLOCK + tl.arange(0, BLOCK)
    store_as(out_ptr + idx, v, idx < n)


def weight_args(weight: QuantizedWeight) -> tuple:
    """The tensors and constants a kernel reads a 4-bit weight from, in ``quant_values``'s
    order: (packed, code, absmax, nested_absmax, nested_code, offset) and the constexpr
    dict (BLOCKSIZE, DOUBLE, HAS_OFFSET). Raises QuantError for a weight the kernels cannot read."""
    if weight.quant_type not in FOUR_BIT:
        raise QuantError(
            f"the 4-bit kernels read NF4 or FP4 weights, not {weight.quant_type!r}; "
            "use QuantizedWeight.dequantize for it"
        )
    if hasattr(weight.packed, "placements"):
        raise QuantError("this weight is sharded by FSDP; decode it inside its unit's forward")
    packed = weight.packed.reshape(-1)
    absmax = weight.absmax
    nested = weight.nested_absmax if weight.double_quant else absmax
    nested_code = weight.nested_code if weight.double_quant else weight.code
    offset = float(weight.offset or 0.0)
    consts = dict(BLOCKSIZE=weight.blocksize, DOUBLE=weight.double_quant, HAS_OFFSET=offset != 0.0)
    return (packed, weight.code, absmax, nested, nested_code, offset), consts


def dequantize(weight: QuantizedWeight, dtype: torch.dtype | None = None) -> torch.Tensor:
    """The weight as a dense tensor of its shape in ``dtype`` (default: its own), the same bits
    as ``weight.dequantize(dtype)``."""
    dtype = dtype or weight.dtype
    if dtype not in FLOATS:
        raise QuantError(f"dequantize to float32, bfloat16 or float16, not {dtype}")
    tensors, consts = weight_args(weight)
    n = weight.numel()
    out = torch.empty(weight.shape, dtype=dtype, device=weight.device)
    block = max(1024, weight.blocksize)  # whole 4-bit blocks per program
    _dequantize_kernel[(triton.cdiv(n, block),)](
        out, n, *tensors, **consts, BLOCK=block, enable_fp_fusion=False
    )
    return out


class _DequantizedMatmul(torch.autograd.Function):
    """``x Wᵀ + bias`` on the codes; backward ``dx = dy W`` decodes the tiles again (nothing
    weight-sized is kept, as ``lorakit.quant.linear`` does with whole weights)."""

    @staticmethod
    def forward(ctx, x, bias, weight):
        from .gemm import gemm

        ctx.weight = weight
        return gemm(x, weight, bias=bias)

    @staticmethod
    @once_differentiable
    def backward(ctx, dy):
        from .gemm import gemm

        dy = dy.contiguous()
        grad_x = gemm(dy, ctx.weight, transpose=False) if ctx.needs_input_grad[0] else None
        grad_bias = dy.sum(0) if ctx.needs_input_grad[1] else None
        return grad_x, grad_bias, None


def dequantize_matmul(
    x: torch.Tensor, weight: QuantizedWeight, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """``x Wᵀ + bias`` with W read from its 4-bit codes (tile by tile for few rows), computed in
    ``weight.compute_dtype`` and returned in ``x``'s dtype, as ``quantized_linear`` does;
    differentiable in x and bias."""
    dtype = weight.compute_dtype
    if bias is not None and bias.dtype != dtype:
        bias = bias.to(dtype)
    flat = x.reshape(-1, x.shape[-1]).to(dtype).contiguous()
    out = _DequantizedMatmul.apply(flat, bias, weight)
    out = out.view(*x.shape[:-1], out.shape[-1])
    return out if out.dtype == x.dtype else out.to(x.dtype)
