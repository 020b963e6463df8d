"""A linear map on a quantized weight: the functional, its autograd rule, and ``QuantLinear``.

    y = x Wᵀ + bias,   W = dequantize(codes, scales)   (out, in), recomputed on every use

QLoRA trains adapters on top of a frozen quantized base (QLoRA paper, section 3), so the base
needs gradients for its input only, never for W. The backward pass therefore needs neither the
input nor W from the forward pass: it dequantizes W again, ``dx = dy W``, and nothing the size of
a weight is kept alive between forward and backward. Activation memory does not grow with the
base weights. (On CPU one scratch buffer per thread, the size of the largest weight, is reused
for every decode.)
"""

from __future__ import annotations

import threading

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable

from ..errors import QuantError
from .weight import QuantizedWeight, hand_over_packed

_scratch = threading.local()


def _dense(weight: QuantizedWeight, dtype: torch.dtype) -> torch.Tensor:
    """W for one matmul, dequantized into a scratch buffer that the next call overwrites.

    On CPU a fresh buffer the size of a weight costs page faults on every call (allocations of
    this size are mapped anew each time), as much as the decoding itself; so each thread keeps one
    float32 buffer, as large as the largest weight it decoded, and reuses it. It never outlives
    the matmul that reads it: nothing is saved for backward, which decodes again. Other devices
    (where the caching allocator already reuses memory) and compiled graphs get a new tensor.
    """
    buffer = None
    if weight.device.type == "cpu" and not torch.compiler.is_compiling():
        buffer = getattr(_scratch, "buffer", None)
        if buffer is None or buffer.numel() < weight.dense_size:
            buffer = _scratch.buffer = torch.empty(weight.dense_size)
    return weight.dequantize(torch.float32, out=buffer).to(dtype)


class _DequantizedMatmul(torch.autograd.Function):
    """``x Wᵀ + bias`` with W dequantized in forward and again in backward (never saved)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, bias: torch.Tensor | None, weight: QuantizedWeight):
        ctx.weight = weight  # the module, not a tensor: backward rebuilds W from its codes
        return F.linear(x, _dense(weight, x.dtype), bias)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: torch.Tensor):
        grad_x = grad_bias = None
        if ctx.needs_input_grad[0]:
            grad_x = grad @ _dense(ctx.weight, grad.dtype)  # (..., out) @ (out, in)
        if ctx.needs_input_grad[1]:
            grad_bias = grad.reshape(-1, grad.shape[-1]).sum(0)
        return grad_x, grad_bias, None


def quantized_linear(
    x: torch.Tensor, weight: QuantizedWeight, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """``F.linear`` for a quantized weight, computed in ``weight.compute_dtype``.

    The input (and bias) are cast to the compute dtype, the weight is dequantized to it, and the
    output is cast back to the input's dtype (bitsandbytes' ``Linear4bit`` does the same).
    """
    dtype = weight.compute_dtype
    xc = x if x.dtype == dtype else x.to(dtype)
    if bias is not None and bias.dtype != dtype:
        bias = bias.to(dtype)
    out = _DequantizedMatmul.apply(xc, bias, weight)
    return out if out.dtype == x.dtype else out.to(x.dtype)


class QuantLinear(nn.Module):
    """A frozen ``nn.Linear`` whose weight is a :class:`QuantizedWeight`.

    State-dict keys are the linear layer's own (``weight``, ``bias``) plus bitsandbytes' quant
    state beside ``weight``, so a quantized checkpoint looks like one bitsandbytes wrote.
    """

    def __init__(self, weight: QuantizedWeight, bias: nn.Parameter | None = None) -> None:
        super().__init__()
        if weight.dim() != 2:
            raise QuantError(f"a linear weight has 2 dimensions, got shape {tuple(weight.shape)}")
        self.out_features, self.in_features = weight.shape
        self.weight = weight
        self.register_parameter("bias", bias)

    @classmethod
    def from_linear(cls, linear: nn.Linear, quant_type: str = "nf4", **options) -> QuantLinear:
        """Quantize ``linear``'s weight (``options`` as for :meth:`QuantizedWeight.quantize`);
        its bias is kept, frozen, as it is."""
        weight = QuantizedWeight.quantize(linear.weight, quant_type, **options)
        bias = linear.bias
        if bias is not None:
            bias.requires_grad_(False)
        return cls(weight, bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return quantized_linear(x, self.weight, self.bias)

    def dequantized(self) -> nn.Linear:
        """A plain ``nn.Linear`` holding the dequantized weight (in its original dtype)."""
        weight = self.weight
        linear = nn.Linear(
            self.in_features, self.out_features, self.bias is not None, device="meta"
        )
        linear.weight = nn.Parameter(weight.dequantize(), requires_grad=False)
        if self.bias is not None:
            linear.bias = self.bias
        return linear

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        hand_over_packed(self, state_dict, prefix)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"bias={self.bias is not None}"
        )
