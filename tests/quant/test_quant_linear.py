"""QuantLinear and quantized_linear: forward, the input-only backward, dtypes, devices, models.

References are plain ``F.linear`` calls on the dequantized weight (in float64 where the result
is compared at default tolerances).
"""

from __future__ import annotations

import copy
import gc
import weakref

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lorakit
from lorakit.errors import QuantError
from lorakit.quant import QuantizedWeight, QuantLinear, dequantize, quantize, quantized_linear

IN, OUT, TOKENS = 96, 40, 5


def quant_linear(bias=True, **options) -> tuple[nn.Linear, QuantLinear]:
    linear = nn.Linear(IN, OUT, bias=bias)
    return linear, QuantLinear.from_linear(copy.deepcopy(linear), **options)


def reference(layer: QuantLinear, x: torch.Tensor) -> torch.Tensor:
    w = layer.weight.dequantize(torch.float64)
    b = None if layer.bias is None else layer.bias.double()
    return F.linear(x.double(), w, b)


@pytest.mark.parametrize("quant_type", ["nf4", "fp4", "int8"])
def test_forward_is_a_linear_map_on_the_dequantized_weight(quant_type):
    _, layer = quant_linear(quant_type=quant_type)
    x = torch.randn(3, TOKENS, IN)
    torch.testing.assert_close(layer(x), reference(layer, x).float())


def test_backward_gives_input_and_bias_gradients_of_the_dequantized_map():
    _, layer = quant_linear()
    layer.bias.requires_grad_(True)
    x = torch.randn(2, TOKENS, IN, dtype=torch.float64, requires_grad=True)
    layer.weight.compute_dtype = torch.float64  # the gradient compared in float64
    grad_out = torch.randn(2, TOKENS, OUT, dtype=torch.float64)
    layer(x).backward(grad_out)

    x_ref = x.detach().clone().requires_grad_(True)
    bias_ref = layer.bias.detach().double().clone().requires_grad_(True)
    F.linear(x_ref, layer.weight.dequantize(torch.float64), bias_ref).backward(grad_out)
    torch.testing.assert_close(x.grad, x_ref.grad)
    torch.testing.assert_close(layer.bias.grad.double(), bias_ref.grad)


def test_nothing_is_saved_for_backward():
    """The dequantized weight (and the input) are recomputed or not needed: no saved tensor."""
    _, layer = quant_linear(bias=False)
    x = torch.randn(4, IN, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        out = layer(x)
    assert saved == []
    out.sum().backward()
    assert x.grad is not None


def test_layers_share_one_scratch_buffer_and_outputs_do_not_alias_it():
    _, small = quant_linear()
    big = QuantLinear.from_linear(nn.Linear(2 * IN, 3 * OUT))
    x, x_big = torch.randn(2, IN), torch.randn(2, 2 * IN)
    first = small(x)
    out_big = big(x_big)
    again = small(x)  # overwrites the scratch the big layer used
    torch.testing.assert_close(first, reference(small, x).float())
    torch.testing.assert_close(again, first, rtol=0, atol=0)
    torch.testing.assert_close(out_big, reference(big, x_big).float())
    assert again.data_ptr() != first.data_ptr()


def test_weight_is_frozen_and_has_no_gradient():
    _, layer = quant_linear()
    assert [n for n, p in layer.named_parameters() if p.requires_grad] == []
    x = torch.randn(4, IN, requires_grad=True)
    layer(x).sum().backward()
    assert all(b.grad is None for b in layer.buffers())


@pytest.mark.parametrize("compute_dtype", [torch.bfloat16, torch.float16])
def test_compute_dtype(compute_dtype):
    _, layer = quant_linear(compute_dtype=compute_dtype)
    x = torch.randn(3, IN)
    out = layer(x)
    assert out.dtype == torch.float32  # back in the input's dtype
    w = layer.weight.dequantize(compute_dtype)
    expected = F.linear(x.to(compute_dtype), w, layer.bias.to(compute_dtype)).float()
    torch.testing.assert_close(out, expected)


def test_dtype_casts_leave_codes_and_scales_alone():
    _, layer = quant_linear()
    before = {k: v.clone() for k, v in layer.state_dict().items() if k != "bias"}
    layer.half()
    assert layer.bias.dtype == torch.float16
    after = layer.state_dict()
    for key, value in before.items():
        assert after[key].dtype == value.dtype and torch.equal(after[key], value), key
    layer.to("meta")
    assert layer.weight.device.type == "meta" and layer.weight.absmax.dtype == torch.uint8


def test_deepcopy_and_repr():
    _, layer = quant_linear()
    twin = copy.deepcopy(layer)
    assert twin.weight is not layer.weight
    assert torch.equal(twin.weight.dequantize(), layer.weight.dequantize())
    assert "QuantizedWeight(nf4, 40x96, block 64, double quant, compute float32)" in repr(layer)


def test_quantized_weight_answers_like_a_tensor():
    _, layer = quant_linear(blocksize=32, double_quant=False)
    w = layer.weight
    assert w.shape == (OUT, IN) and w.dtype == torch.float32 and w.numel() == OUT * IN
    assert w.device.type == "cpu" and w.dim() == 2
    assert w.nbytes == OUT * IN // 2 + 4 * OUT * IN // 32 + 4 * 16


def test_quantized_linear_functional_matches_the_module():
    _, layer = quant_linear()
    x = torch.randn(2, IN)
    torch.testing.assert_close(quantized_linear(x, layer.weight, layer.bias), layer(x))


def test_dequantized_gives_a_plain_linear_back():
    _, layer = quant_linear()
    plain = layer.dequantized()
    assert type(plain) is nn.Linear and not plain.weight.requires_grad
    x = torch.randn(2, IN)
    torch.testing.assert_close(plain(x), layer(x))


class Tiny(nn.Module):
    """Embedding, two blocks sharing a projection, a tied output head."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(11, 64)
        self.up = nn.Linear(64, 128)
        self.down = nn.Linear(128, 64, bias=False)
        self.again = self.up  # the same module at two paths
        self.gate = nn.Linear(64, 64)
        self.lm_head = nn.Linear(64, 11, bias=False)
        self.lm_head.weight = self.embed.weight

    def forward(self, ids):
        h = self.embed(ids)
        h = self.down(torch.relu(self.up(h))) * torch.sigmoid(self.gate(h))
        return self.lm_head(h)


def test_quantize_replaces_linear_layers_but_not_the_head():
    model = Tiny()
    ids = torch.randint(0, 11, (2, 7))
    expected = model(ids)
    quantize(model, skip=["gate"])
    assert isinstance(model.up, QuantLinear) and model.again is model.up
    assert isinstance(model.down, QuantLinear)
    assert type(model.gate) is nn.Linear and type(model.lm_head) is nn.Linear
    assert model.lm_head.weight is model.embed.weight
    out = model(ids)
    assert (out - expected).abs().max() < 0.2 * expected.abs().max()  # 4-bit, not exact
    plain = dequantize(model)
    assert type(plain.up) is nn.Linear
    torch.testing.assert_close(plain(ids), out)


def test_quantize_lets_the_float_weights_go():
    model = Tiny()
    weights = [weakref.ref(model.up.weight), weakref.ref(model.down.weight)]
    quantize(model)
    gc.collect()
    assert [w() for w in weights] == [None, None]


def test_quantize_errors():
    with pytest.raises(QuantError, match="skip entry 'nope' matches no module"):
        quantize(Tiny(), skip=["nope"])
    with pytest.raises(QuantError, match="found no nn.Linear layer"):
        quantize(nn.Sequential(nn.Embedding(3, 4)))
    with pytest.raises(QuantError, match="block size 100"):
        quantize(Tiny(), blocksize=100)


def test_quantize_is_exported_and_lazy():
    assert lorakit.quantize is quantize
    assert issubclass(lorakit.QuantError, lorakit.LorakitError)


def test_quantized_weight_checks_its_parts():
    w = QuantizedWeight.quantize(torch.randn(8, 8), double_quant=False)
    with pytest.raises(QuantError, match="absmax should hold 1"):
        QuantizedWeight(
            w.packed,
            torch.zeros(3),
            w.code,
            shape=(8, 8),
            dtype=torch.float32,
            quant_type="nf4",
            blocksize=64,
        )
