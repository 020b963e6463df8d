"""Blockwise absmax quantization, nibble packing and double quantization, on flat tensors.

A weight is flattened (row-major) and cut into blocks of ``blocksize`` elements (the last block
may be shorter). Each block is scaled by its largest magnitude, ``absmax``, into [-1, 1]; each
scaled value is stored as the index of the nearest codebook value (QLoRA paper, section 2,
"block-wise k-bit quantization"):

    w (n,) -> blocks (n / B, B) -> s = w / absmax  in [-1, 1] -> code index q (n,)
    dequantized w = codebook[q] · absmax(block)

Everything here reproduces bitsandbytes (0.50) bit for bit on float32 inputs:

* 4-bit codes are the "nearest" value in the sense of ``torch.bucketize`` over the midpoints of
  the sorted codebook (a value exactly on a midpoint takes the lower code); full blocks are scaled
  by ``w · (1 / absmax)``, the short last block by ``w / absmax``; an all-zero block is scaled by
  1e-38 instead of 0 (and the short block stores that clamped absmax);
* two codes share a byte, the first element in the high nibble; an odd count is padded with
  the code of 0.0;
* double quantization (QLoRA section 3) subtracts the mean of the absmax values and quantizes
  them with the 8-bit dynamic map in blocks of 256, as bitsandbytes' CPU kernel does: scaled by
  ``1 / absmax``, snapped to a grid of 65,536 points, each point mapped to its nearest code.

The search for a 4-bit code avoids a per-element binary search: the top 16 bits of a float32
(sign, exponent, 7 mantissa bits) decide its code through a 65,536-entry table, except in the
few table cells a midpoint falls into, which are settled by ``torch.bucketize``.
"""

from __future__ import annotations

import functools

import torch

from ..errors import QuantError
from .codebooks import _codebook

BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)
NESTED_BLOCKSIZE = 256
_TINY = 1e-38  # bitsandbytes scales an all-zero block by this instead of 0
_UNSETTLED = 255  # table entry: the cell holds a midpoint; settle its elements by bucketize


def check_blocksize(blocksize: int) -> int:
    if blocksize not in BLOCKSIZES:
        raise QuantError(
            f"block size {blocksize} is not supported; choose one of "
            f"{', '.join(map(str, BLOCKSIZES))}"
        )
    return blocksize


def flat_float32(weight: torch.Tensor) -> torch.Tensor:
    """The weight as a contiguous flat float32 tensor (no copy when it is one already)."""
    if not weight.is_floating_point():
        raise QuantError(f"only floating-point weights can be quantized, got {weight.dtype}")
    return weight.detach().reshape(-1).to(torch.float32).contiguous()


# -- scales ----------------------------------------------------------------------------------
def scaled_blocks(flat: torch.Tensor, blocksize: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(s, absmax): each block scaled into [-1, 1] as bitsandbytes' 4-bit quantizer does.

    ``s`` (n,) float32, ``absmax`` (ceil(n / B),) float32. Raises QuantError on non-finite input.
    """
    n = flat.numel()
    full = n - n % blocksize
    blocks = flat[:full].view(-1, blocksize)  # (n // B, B)
    lo, hi = torch.aminmax(blocks, dim=-1)  # one pass, no |w| temporary
    absmax = torch.maximum(hi, lo.neg())
    s = torch.empty_like(flat)
    inverse = absmax.clamp(min=_TINY).reciprocal()  # then w · (1 / absmax), not w / absmax
    torch.mul(blocks, inverse.unsqueeze(1), out=s[:full].view_as(blocks))
    if full < n:
        tail = flat[full:].abs().max().clamp(min=_TINY).reshape(1)
        torch.div(flat[full:], tail, out=s[full:])
        absmax = torch.cat([absmax, tail])
    if not bool(torch.isfinite(absmax).all()):
        bad = int((~torch.isfinite(flat)).sum())
        raise QuantError(f"the weight holds {bad} non-finite value(s); it cannot be quantized")
    return s, absmax


# -- 4-bit codes -----------------------------------------------------------------------------
class _Search:
    """Nearest-code search for one 4-bit codebook: midpoints, sort order and the cell table."""

    def __init__(self, code: torch.Tensor) -> None:
        values, order = torch.sort(code, stable=True)  # FP4: +0 (index 0) sorts before -0 (8)
        self.bounds = (values[:-1] + values[1:]) / 2  # midpoints, float32 like bitsandbytes'
        self.order = order.to(torch.uint8)
        # Every float32 whose top 16 bits are u lies between the two floats below (NaN cells
        # aside); if both fall in the same bucket, so does every value in the cell.
        top = torch.arange(65536, dtype=torch.int64) << 16
        bits = torch.stack([top, top | 0xFFFF])
        bits = torch.where(bits >= 2**31, bits - 2**32, bits).to(torch.int32)  # as signed
        ends = bits.view(torch.float32)
        first = torch.bucketize(ends.amin(0), self.bounds)
        last = torch.bucketize(ends.amax(0), self.bounds)
        settled = (first == last) & torch.isfinite(ends).all(0)
        self.table = torch.where(settled, self.order[first], _UNSETTLED).to(torch.uint8)

    def codes(self, s: torch.Tensor, exact_at) -> torch.Tensor:
        """Code index (n,) uint8 of each scaled value in ``s`` (n,) float32, which is used up.

        ``s`` is overwritten by its cell index (no second 64 MiB buffer for a 4096² weight);
        ``exact_at(idx)`` gives the scaled values again at the few positions a table cell cannot
        settle.
        """
        cell = s.view(torch.int32)
        torch.bitwise_right_shift(cell, 16, out=cell)
        cell.bitwise_and_(0xFFFF)  # the top 16 bits as a non-negative index
        q = self.table.index_select(0, cell)
        unsettled = (q == _UNSETTLED).nonzero().squeeze(1)
        if unsettled.numel():
            q[unsettled] = self.order[torch.bucketize(exact_at(unsettled), self.bounds)]
        return q

    def code_of_zero(self) -> int:
        return int(self.order[torch.bucketize(torch.zeros(()), self.bounds)])


@functools.cache
def _search(quant_type: str, device: torch.device) -> _Search:
    search = _Search(_codebook(quant_type))
    for name in ("bounds", "order", "table"):
        setattr(search, name, getattr(search, name).to(device))
    return search


def pack_nibbles(q: torch.Tensor, pad_code: int) -> torch.Tensor:
    """Two 4-bit codes per byte, the first in the high nibble; (ceil(n / 2), 1) uint8."""
    if q.numel() % 2:
        q = torch.cat([q, q.new_full((1,), pad_code)])
    pairs = q.view(-1, 2)
    return torch.bitwise_left_shift(pairs[:, 0], 4).bitwise_or_(pairs[:, 1]).unsqueeze(1)


def unpack_nibbles(packed: torch.Tensor, n: int) -> torch.Tensor:
    """The inverse of :func:`pack_nibbles`: (n,) uint8 codes."""
    flat = packed.reshape(-1)
    return torch.stack([flat >> 4, flat & 0xF], 1).view(-1)[:n]


def quantize_4bit(flat: torch.Tensor, quant_type: str, blocksize: int):
    """(packed (ceil(n/2), 1) uint8, absmax (blocks,) float32) of a flat float32 tensor."""
    s, absmax = scaled_blocks(flat, blocksize)
    search = _search(quant_type, flat.device)

    def exact_at(idx: torch.Tensor) -> torch.Tensor:  # the same float32 operations, a few values
        block = idx // blocksize
        scale = absmax.clamp(min=_TINY)[block]
        in_full = block < flat.numel() // blocksize
        return torch.where(in_full, flat[idx] * scale.reciprocal(), flat[idx] / scale)

    q = search.codes(s, exact_at)
    return pack_nibbles(q, search.code_of_zero()), absmax


def quantize_int8(flat: torch.Tensor, blocksize: int):
    """(codes (n, 1) uint8, absmax): ``round(127 · s) + 127``, the linear int8 levels."""
    s, absmax = scaled_blocks(flat, blocksize)
    q = s.mul_(127).round_().clamp_(-127, 127).add_(127).to(torch.uint8)
    return q.unsqueeze(1), absmax


# -- 8-bit dynamic codes (double quantization) -----------------------------------------------
_GRID = 65535  # bitsandbytes' CPU 8-bit quantizer rounds to a grid of 65,536 points on [-1, 1]


@functools.cache
def _grid_table(device: torch.device) -> torch.Tensor:
    """The dynamic-map code of each grid point ``-1 + 2i / 65535`` (its nearest code)."""
    code = _codebook("dynamic")
    midpoints = (code[:-1] + code[1:]) * 0.5
    points = -1.0 + (2.0 * torch.arange(_GRID + 1, dtype=torch.float32)) / _GRID
    return torch.searchsorted(midpoints, points).to(torch.uint8).to(device)


def quantize_dynamic(x: torch.Tensor, blocksize: int = NESTED_BLOCKSIZE):
    """(codes (m,) uint8, absmax (ceil(m/B),) float32) with the 8-bit dynamic map.

    bitsandbytes' CPU rule: each block is scaled by ``1 / absmax``, the scaled value is snapped
    to the nearest of 65,536 evenly spaced points on [-1, 1] (``trunc((s + 1) / 2 · 65535 +
    0.5)``) and takes that point's nearest code. An all-zero block gets code 0.
    """
    m = x.numel()
    padded = torch.nn.functional.pad(x, (0, -m % blocksize)).view(-1, blocksize)
    absmax = padded.abs().amax(dim=-1)
    zero = absmax == 0
    inverse = (1.0 / absmax).masked_fill_(zero, 0.0)  # an all-zero block scales to 0, not NaN
    s = (padded * inverse.unsqueeze(1)).clamp_(-1, 1)
    point = s.add_(1.0).mul_(0.5).mul_(_GRID).add_(0.5).to(torch.int32)  # truncates: s >= 0
    q = _grid_table(x.device).index_select(0, point.view(-1))
    q = q.view(-1, blocksize).masked_fill_(zero.unsqueeze(1), 0)
    return q.view(-1)[:m], absmax


def dequantize_dynamic(
    q: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor, blocksize: int, offset: float = 0.0
) -> torch.Tensor:
    """``code[q] · absmax(block) + offset`` in float32, (m,): two roundings, as bitsandbytes."""
    values = code.index_select(0, q.reshape(-1).to(torch.int32))
    _scale_blocks_(values, absmax, blocksize)
    return values.add_(offset) if offset else values


def double_quantize(absmax: torch.Tensor):
    """(codes uint8, nested absmax float32, offset 0-dim float32) of per-block absmax values."""
    offset = absmax.mean()
    q, nested = quantize_dynamic(absmax - offset, NESTED_BLOCKSIZE)
    return q, nested, offset


# -- dequantization --------------------------------------------------------------------------
_TABLES: dict[tuple, torch.Tensor] = {}


def _nibble_table(code: torch.Tensor, per_entry: int) -> torch.Tensor:
    """Decoded values of every 1-byte (2 codes) or 2-byte (4 codes) pattern, as one wide element.

    Row ``v`` holds the codes of the bytes of ``v`` in memory order, high nibble first; viewed as
    int64 (2 floats) or complex128 (4 floats) so that one gather moves a whole row. Cached per
    codebook (a handful of tables in a process: NF4 and FP4 on each device).
    """
    key = (tuple(code.tolist()), code.device, per_entry)
    table = _TABLES.get(key)
    if table is None:
        v = torch.arange(256 ** (per_entry // 2), device=code.device)
        byte_values = [(v >> (8 * i)) & 0xFF for i in range(per_entry // 2)]  # little-endian
        nibbles = [part for b in byte_values for part in (b >> 4, b & 0xF)]
        rows = torch.stack([code[n] for n in nibbles], 1).contiguous()  # (entries, per_entry)
        wide = torch.int64 if per_entry == 2 else torch.complex128
        table = _TABLES[key] = rows.view(wide).view(-1)
    return table


def dequantize_codes(
    packed: torch.Tensor,
    absmax: torch.Tensor,
    code: torch.Tensor,
    n: int,
    blocksize: int,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Float32 (n,) values ``code[q] · absmax`` from packed codes (4-bit) or one code a byte.

    4-bit: each pair of bytes (4 codes) is decoded by one gather from a 65,536-row table, then
    each block is scaled in place; two passes over the output in all. ``out``: a contiguous
    float32 buffer of at least :func:`dense_size` elements to write into instead of a new one.
    """
    flat = packed.reshape(-1)
    if out is None:
        out = torch.empty(dense_size(packed, code), dtype=torch.float32, device=flat.device)
    if code.numel() != 16:  # 8-bit codes, one a byte
        torch.index_select(code, 0, flat.to(torch.int32), out=out[:n])
    elif flat.numel() % 2 == 0:
        idx = flat.view(torch.uint16).to(torch.int32)  # 2 bytes = 4 codes per index
        wide = out[: 2 * flat.numel()].view(torch.complex128)
        torch.index_select(_nibble_table(code, 4), 0, idx, out=wide)
    else:
        wide = out[: 2 * flat.numel()].view(torch.int64)
        torch.index_select(_nibble_table(code, 2), 0, flat.to(torch.int32), out=wide)
    return _scale_blocks_(out[:n], absmax, blocksize)


def dense_size(packed: torch.Tensor, code: torch.Tensor) -> int:
    """Elements :func:`dequantize_codes` writes (a 4-bit weight of odd size: one padding)."""
    return packed.numel() * (2 if code.numel() == 16 else 1)


def _scale_blocks_(values: torch.Tensor, absmax: torch.Tensor, blocksize: int) -> torch.Tensor:
    """Multiply each block of ``values`` (n,) by its absmax, in place; the last may be short."""
    n = values.numel()
    full = n - n % blocksize
    values[:full].view(-1, blocksize).mul_(absmax[: full // blocksize].unsqueeze(1))
    if full < n:
        values[full:].mul_(absmax[-1])
    return values
