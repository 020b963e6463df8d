"""The 4-bit dequantization kernel against lorakit's eager dequantize and bitsandbytes (bit for
bit), and its dequantize-matmul against ``quantized_linear``."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton", reason="triton is not installed (the kernels extra)")

from lorakit.errors import QuantError  # noqa: E402
from lorakit.kernels import nf4  # noqa: E402
from lorakit.quant import QuantizedWeight, quantized_linear  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # else the interpreter (conftest)
BITS = {torch.float32: torch.int32, torch.bfloat16: torch.int16, torch.float16: torch.int16}


def _weight(shape, quant_type="nf4", **options):
    w = torch.randn(shape) * 0.3
    w.view(-1)[5] = 2.5  # one block with a large scale
    return QuantizedWeight.quantize(w, quant_type, **options).to(DEVICE)


@pytest.mark.parametrize("dtype", list(BITS), ids=str)
@pytest.mark.parametrize(
    "shape, quant_type, blocksize, double_quant",
    [
        ((48, 80), "nf4", 64, True),
        ((48, 80), "nf4", 64, False),
        ((33, 71), "nf4", 128, True),  # odd count, a short last block, a padded last byte
        ((33, 71), "nf4", 4096, False),  # one short block larger than a program's 1024
        ((72, 64), "fp4", 64, True),
        ((300, 64), "nf4", 64, True),  # 300 blocks: two nested blocks of absmax codes
    ],
)
def test_dequantize_is_bit_identical_to_eager(shape, quant_type, blocksize, double_quant, dtype):
    weight = _weight(shape, quant_type, blocksize=blocksize, double_quant=double_quant)
    got = nf4.dequantize(weight, dtype)
    want = weight.dequantize(dtype)
    assert got.shape == want.shape and got.dtype == dtype
    assert torch.equal(got.view(BITS[dtype]), want.view(BITS[dtype]))


@pytest.mark.parametrize("shape", [(96, 128), (130, 70)])
def test_dequantize_is_bit_identical_to_bitsandbytes(shape):
    functional = pytest.importorskip("bitsandbytes.functional")
    w = torch.randn(shape) * 0.2
    packed, state = functional.quantize_4bit(
        w, blocksize=64, compress_statistics=True, quant_type="nf4"
    )
    expected = functional.dequantize_4bit(packed, state).reshape(w.shape)
    ours = QuantizedWeight.quantize(w, "nf4", blocksize=64, double_quant=True)
    assert torch.equal(ours.packed.reshape(-1), packed.reshape(-1))  # the same codes to decode
    got = nf4.dequantize(ours.to(DEVICE), torch.float32).cpu()
    assert torch.equal(got.view(torch.int32), expected.view(torch.int32))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("tokens", [1, 13])
def test_dequantize_matmul_matches_quantized_linear(dtype, tokens):
    weight = _weight((40, 96), compute_dtype=dtype)
    bias = torch.randn(40, device=DEVICE)
    x = torch.randn(2, tokens, 96, device=DEVICE, dtype=dtype, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_(True)
    got = nf4.dequantize_matmul(x, weight, bias)
    want = quantized_linear(x_ref, weight, bias)
    torch.testing.assert_close(got, want)
    grad = torch.randn_like(got)
    got.backward(grad)
    want.backward(grad)
    torch.testing.assert_close(x.grad, x_ref.grad)


def test_int8_weights_are_refused_by_name():
    weight = QuantizedWeight.quantize(torch.randn(8, 64), "int8")
    with pytest.raises(QuantError, match="NF4 or FP4.*'int8'"):
        nf4.dequantize(weight)
