"""Small pieces the kernels share: rounding to bfloat16, launch options, input checks.

Two habits of Triton's interpreter (triton 3.9 on the CPU) shape these: a float32 → bfloat16
cast truncates instead of rounding to nearest even, and ``tl.dot`` on bfloat16 tiles returns
wrong values. So bfloat16 results are rounded here by integer arithmetic (the same bits as
torch's ``.to(torch.bfloat16)`` for finite values, compiled or interpreted), and under the
interpreter the GEMM tiles are widened to float32 before ``tl.dot`` (``dot_f32``); compiled on
a GPU they stay in their own dtype for the tensor cores.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import interpreting


@triton.jit
def bf16_bits(v):
    """float32 → the 16 bits of the nearest bfloat16 (ties to even), as uint16."""
    bits = v.to(tl.uint32, bitcast=True)
    bits = bits + 0x7FFF + ((bits >> 16) & 1)
    return (bits >> 16).to(tl.uint16)


@triton.jit
def to_dtype(v, dtype: tl.constexpr):
    """float32 ``v`` rounded to ``dtype`` (to nearest even, also under the interpreter)."""
    if dtype == tl.bfloat16:
        return bf16_bits(v).to(tl.bfloat16, bitcast=True)
    else:
        return v.to(dtype)


@triton.jit
def store_as(ptr, v, mask):
    """Store float32 ``v`` at ``ptr`` in the pointer's dtype, rounded to nearest even."""
    if ptr.dtype.element_ty == tl.bfloat16:
        tl.store(ptr.to(tl.pointer_type(tl.uint16)), bf16_bits(v), mask=mask)
    else:
        tl.store(ptr, v.to(ptr.dtype.element_ty), mask=mask)


@triton.jit
def dot(a, b, acc, DOT_F32: tl.constexpr, IEEE: tl.constexpr):
    """``acc + a b``: float32 tiles in IEEE precision (torch's default on CUDA is no TF32),
    widened first under the interpreter."""
    if DOT_F32:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    if IEEE:
        return tl.dot(a, b, acc, input_precision="ieee")
    else:
        return tl.dot(a, b, acc)


def dot_f32() -> bool:
    """Widen GEMM tiles to float32 before ``tl.dot`` (the interpreter's bf16 dot is wrong)."""
    return interpreting()


def block(n: int, lo: int = 16, hi: int = 64) -> int:
    """A power-of-two tile size for an axis of length ``n``, between ``lo`` and ``hi``.

    Compiled: ``lo`` for a short axis, else ``hi`` (two sizes per axis, so few variants of each
    kernel are compiled). Interpreted: the smallest covering ``n``, which is fastest there."""
    if not interpreting():
        return lo if n <= lo else hi
    return max(lo, min(hi, triton.next_power_of_2(max(int(n), 1))))


FLOATS = (torch.float32, torch.bfloat16, torch.float16)
