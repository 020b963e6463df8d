"""Codebooks: the values a 4-bit or 8-bit code stands for, scaled to [-1, 1].

A blockwise-quantized weight stores, per element, the index of the nearest codebook value to
``w / absmax(block)``; dequantization is ``codebook[index] · absmax(block)``.

* **NF4** (QLoRA paper, section 3 and appendix E): the 16 values are quantiles of N(0, 1), scaled
  to [-1, 1], with an exact zero. Each bin holds about the same probability mass of a normally
  distributed weight, so NF4 is the information-theoretically sensible 4-bit type for weights.
  The values are bitsandbytes' table, to the last bit.
* **FP4**: a float with 1 sign, 2 exponent and 1 mantissa bit, in bitsandbytes' bit order
  (index = sign·8 + the 3 bits) and its exponent bias, normalised by its largest value (12).
  Index 0 is +0 and index 8 is -0.
* **int8**: linear levels ``k / 127`` for ``k`` in -127..127 (index ``k + 127``); absmax int8 as
  used for comparison (the QLoRA paper's Int8 baseline scaled per block).
* **dynamic** (8-bit; Dettmers, "8-Bit Approximations for Parallelism in Deep Learning", 2016):
  a signed dynamic-exponent type. bitsandbytes uses it to quantize the per-block absmax values a
  second time ("double quantization", QLoRA section 3); it is rebuilt here exactly as
  ``bitsandbytes.functional.create_dynamic_map()`` builds it, in float32.
"""

from __future__ import annotations

import functools

import torch

from ..errors import QuantError

#: bitsandbytes' NF4 table, code 0 to 15 (``create_normal_map(offset=0.9677083)``).
NF4 = (
    -1.0,
    -0.6961928009986877,
    -0.5250730514526367,
    -0.39491748809814453,
    -0.28444138169288635,
    -0.18477343022823334,
    -0.09105003625154495,
    0.0,
    0.07958029955625534,
    0.16093020141124725,
    0.24611230194568634,
    0.33791524171829224,
    0.44070982933044434,
    0.5626170039176941,
    0.7229568362236023,
    1.0,
)

#: FP4 before normalisation: 0b000 = 0, 0b001 = 0.0625 (subnormal), then 8, 12, 4, 6, 2, 3;
#: the high bit of the index is the sign.
FP4_RAW = (0.0, 0.0625, 8.0, 12.0, 4.0, 6.0, 2.0, 3.0)
FP4_RAW = FP4_RAW + tuple(-v for v in FP4_RAW)

#: The 4-bit types bitsandbytes can read, and every type ``quantize`` accepts.
FOUR_BIT = ("nf4", "fp4")
QUANT_TYPES = ("nf4", "fp4", "int8")


def bits_of(quant_type: str) -> int:
    """Bits per stored code: 4 for NF4/FP4, 8 for int8."""
    check_quant_type(quant_type)
    return 4 if quant_type in FOUR_BIT else 8


def check_quant_type(quant_type: str) -> str:
    if quant_type not in QUANT_TYPES:
        raise QuantError(
            f"unknown quantization type {quant_type!r}; choose one of {', '.join(QUANT_TYPES)}"
        )
    return quant_type


@functools.cache
def _codebook(name: str) -> torch.Tensor:
    if name == "nf4":
        return torch.tensor(NF4, dtype=torch.float32)
    if name == "fp4":
        raw = torch.tensor(FP4_RAW, dtype=torch.float32)
        return raw / raw.abs().max()  # float32 division, as bitsandbytes normalises it
    if name == "int8":
        levels = torch.arange(-127, 128, dtype=torch.float32) / 127
        return torch.cat([levels, levels.new_zeros(1)])  # index 255 is never written
    if name == "dynamic":
        return _dynamic_map()
    raise QuantError(f"no codebook named {name!r}")


def codebook(name: str, device: torch.device | str | None = None) -> torch.Tensor:
    """The float32 codebook ``name`` ("nf4", "fp4", "int8", "dynamic"); a fresh copy."""
    return _codebook(name).to(device=device, copy=True)


def _dynamic_map(max_exponent_bits: int = 7) -> torch.Tensor:
    """bitsandbytes' signed 8-bit dynamic map: 256 sorted float32 values in [-0.993, 1].

    For each exponent e = 0..6 the interval [0.1, 1] is cut into 2^e equal bins, whose midpoints,
    times 10^(e-6), give 2^e positive and 2^e negative values (254 in all); 0 and 1 complete it.
    The arithmetic (float32 linspace, midpoints, the product with a Python float) is the one
    bitsandbytes performs, so every value matches bit for bit.
    """
    values: list[float] = []
    for e in range(max_exponent_bits):
        edges = torch.linspace(0.1, 1, 2**e + 1, dtype=torch.float32)
        means = (edges[:-1] + edges[1:]) / 2.0
        scaled = (10 ** (-(max_exponent_bits - 1) + e)) * means
        values += scaled.tolist() + (-scaled).tolist()
    values += [0.0, 1.0]
    return torch.tensor(sorted(values), dtype=torch.float32)
