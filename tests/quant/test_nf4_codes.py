"""Bit-compatibility with bitsandbytes' 4-bit quantization, against the real package on CPU.

For float32 inputs lorakit's packed codes, block absmax values and the nested (double-quantized)
statistics must equal ``bitsandbytes.functional.quantize_4bit``'s exactly, for NF4 and FP4, with
and without double quantization, at block sizes 64 and 128, on shapes that are not multiples of
the block size; dequantization must equal bitsandbytes' to the last bit.
"""

from __future__ import annotations

import pytest
import torch

from lorakit.errors import QuantError
from lorakit.quant import NF4, QuantizedWeight, codebook
from lorakit.quant import blockwise as bw

F = pytest.importorskip("bitsandbytes.functional")

QUANT_TYPES = ("nf4", "fp4")
BLOCKS = (64, 128)
# element counts that are not multiples of the block size (a short last block), odd counts
# (a padded last byte), a single element, more than 256 blocks (two nested blocks)
SHAPES = [(130, 70), (33, 257), (7, 9), (1, 1), (3, 64), (520, 33)]
# bitsandbytes 0.50's CPU dequantization kernel reads the wrong block scale for some shapes
# whose rows are not a whole number of blocks (e.g. 1000 x 64 at block 128); on these shapes its
# output agrees with its own codes and scales, which is what lorakit's is compared with here.
BNB_DEQUANT_SHAPES = [(130, 70), (33, 257), (7, 9), (1, 1), (96, 128)]


def weight(shape, scale=1.0):
    w = torch.randn(shape) * scale
    flat = w.view(-1)
    flat[: min(3, flat.numel())] = 0.0  # an exact zero and, for tiny shapes, a zero block
    if flat.numel() > 64:
        flat[64:128] = 0.0  # an all-zero block: bitsandbytes scales it by 1e-38
    return w


def lorakit_weight(w, quant_type, blocksize, double_quant):
    return QuantizedWeight.quantize(w, quant_type, blocksize=blocksize, double_quant=double_quant)


@pytest.mark.parametrize("double_quant", [False, True], ids=["plain", "double"])
@pytest.mark.parametrize("blocksize", BLOCKS)
@pytest.mark.parametrize("quant_type", QUANT_TYPES)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_codes_and_statistics_equal_bitsandbytes(shape, quant_type, blocksize, double_quant):
    w = weight(shape, scale=0.02)
    packed, state = F.quantize_4bit(
        w, blocksize=blocksize, quant_type=quant_type, compress_statistics=double_quant
    )
    ours = lorakit_weight(w, quant_type, blocksize, double_quant)
    assert torch.equal(ours.packed, packed)
    assert torch.equal(ours.absmax, state.absmax)
    assert torch.equal(ours.code, state.code)
    if double_quant:
        assert torch.equal(ours.nested_absmax, state.state2.absmax)
        assert torch.equal(ours.nested_code, state.state2.code)
        assert ours.offset == state.offset.item()
    else:
        assert not ours.double_quant and state.state2 is None


@pytest.mark.parametrize("double_quant", [False, True], ids=["plain", "double"])
@pytest.mark.parametrize("blocksize", BLOCKS)
@pytest.mark.parametrize("quant_type", QUANT_TYPES)
@pytest.mark.parametrize("shape", BNB_DEQUANT_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_dequantization_equals_bitsandbytes(shape, quant_type, blocksize, double_quant):
    w = weight(shape)
    packed, state = F.quantize_4bit(
        w, blocksize=blocksize, quant_type=quant_type, compress_statistics=double_quant
    )
    ours = lorakit_weight(w, quant_type, blocksize, double_quant)
    expected = F.dequantize_4bit(packed, state).reshape(shape)
    assert torch.equal(ours.dequantize(), expected)


@pytest.mark.parametrize("double_quant", [False, True], ids=["plain", "double"])
@pytest.mark.parametrize("blocksize", (32, 64, 128, 256))
def test_dequantization_is_code_times_scale(blocksize, double_quant):
    """Every shape, including those bitsandbytes' CPU kernel gets wrong: code[q] · absmax."""
    w = weight((1000, 64))
    ours = lorakit_weight(w, "nf4", blocksize, double_quant)
    q = bw.unpack_nibbles(ours.packed, w.numel()).long()
    scales = ours.scales().repeat_interleave(blocksize)[: w.numel()]
    assert torch.equal(ours.dequantize().view(-1), ours.code[q] * scales)


def test_large_weights_and_extreme_scales():
    """Many blocks (several nested blocks), tiny and huge magnitudes, all-positive weights."""
    for w in (torch.randn(300, 1000) * 1e-6, torch.rand(64, 999) * 1e4):
        for quant_type in QUANT_TYPES:
            packed, state = F.quantize_4bit(
                w, blocksize=64, quant_type=quant_type, compress_statistics=True
            )
            ours = lorakit_weight(w, quant_type, 64, True)
            assert torch.equal(ours.packed, packed)
            assert torch.equal(ours.absmax, state.absmax)
            assert torch.equal(ours.nested_absmax, state.state2.absmax)


def test_values_on_and_near_the_midpoints():
    """Values exactly on a midpoint between two codes, and one float step either side."""
    for quant_type in QUANT_TYPES:
        values = codebook(quant_type).sort().values
        mids = (values[:-1] + values[1:]) / 2
        near = torch.cat([mids, mids.nextafter(mids + 1), mids.nextafter(mids - 1)])
        near = torch.cat([near, torch.tensor([1e-30, -1e-30, 0.0, -0.0])])
        w = torch.cat([torch.ones(1), near]).repeat(4)  # absmax 1: s = w exactly
        packed, state = F.quantize_4bit(w, blocksize=64, quant_type=quant_type)
        assert torch.equal(lorakit_weight(w, quant_type, 64, False).packed, packed)


def test_codebooks_are_bitsandbytes_tables():
    assert torch.equal(codebook("nf4"), F.get_4bit_type("nf4", device="cpu"))
    assert torch.equal(codebook("fp4"), F.get_4bit_type("fp4", device="cpu"))
    assert torch.equal(codebook("dynamic"), F.create_dynamic_map())
    assert codebook("nf4").tolist() == list(NF4)


def test_packing_puts_the_first_element_in_the_high_nibble():
    w = torch.zeros(64)
    w[0], w[1] = 1.0, -1.0
    ours = lorakit_weight(w, "nf4", 64, False)
    assert ours.packed.shape == (32, 1) and ours.packed.dtype == torch.uint8
    assert ours.packed[0, 0] == 0xF0  # code 15 (+1.0) high, code 0 (-1.0) low
    assert ours.packed[1, 0] == 0x77  # zeros: code 7


def test_nested_quantization_costs_about_4_127_bits():
    w = torch.randn(4096, 64)
    ours = lorakit_weight(w, "nf4", 64, True)
    stored = ours.packed.numel() + ours.absmax.numel() + 4 * ours.nested_absmax.numel()
    assert stored * 8 / w.numel() == pytest.approx(4.127, abs=0.001)  # QLoRA section 3


def test_int8_absmax_round_trip():
    w = torch.randn(70, 90)
    ours = lorakit_weight(w, "int8", 64, False)
    assert ours.packed.shape == (w.numel(), 1)
    scales = ours.scales().repeat_interleave(64)[: w.numel()].view_as(w)
    # nearest of 255 levels per block: error at most half a step
    assert ((ours.dequantize() - w).abs() <= scales / 127 / 2 * (1 + 1e-5)).all()


def test_quantization_error_matches_bitsandbytes_figures():
    w = torch.randn(512, 512)
    errors = {}
    for quant_type in QUANT_TYPES:
        for blocksize in BLOCKS:
            q = lorakit_weight(w, quant_type, blocksize, True)
            errors[quant_type, blocksize] = float((q.dequantize() - w).norm() / w.norm())
    # ANCHORS: NF4 about 0.092 (block 64), 0.095 (128); FP4 about 0.122, 0.129
    assert errors["nf4", 64] == pytest.approx(0.092, abs=0.003)
    assert errors["nf4", 128] == pytest.approx(0.095, abs=0.003)
    assert errors["fp4", 64] == pytest.approx(0.122, abs=0.004)
    assert errors["fp4", 128] == pytest.approx(0.129, abs=0.004)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(quant_type="nf3"), "unknown quantization type 'nf3'"),
        (dict(blocksize=48), "block size 48 is not supported"),
    ],
)
def test_bad_options_are_errors(kwargs, message):
    with pytest.raises(QuantError, match=message):
        QuantizedWeight.quantize(torch.randn(4, 4), **kwargs)


def test_non_finite_and_non_float_weights_are_errors():
    w = torch.randn(8, 8)
    w[1, 2] = float("inf")
    with pytest.raises(QuantError, match="1 non-finite value"):
        QuantizedWeight.quantize(w)
    with pytest.raises(QuantError, match="only floating-point"):
        QuantizedWeight.quantize(torch.ones(4, 4, dtype=torch.int64))
