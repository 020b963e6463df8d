"""LoRA linear forward and backward on the fused GEMM (:mod:`.gemm`), W dense or 4-bit.

Forward, for x (M, K), W (N, K), A (r, K), B (N, r), scale s (LoRA paper, section 4.1):

    xa = x Aᵀ                                   (M, r)   one small GEMM (the "shrink")
    y  = x Wᵀ + bias + s · xa Bᵀ                (M, N)   one GEMM, the low-rank term in its epilogue

Backward, from dy (M, N), W frozen (unsloth's LoRA_MLP / LoRA_QKV derivation):

    dyb = dy B                                  (M, r)
    dx  = dy W + s · dyb A                      (M, K)   one GEMM, the low-rank term in its epilogue
    dA  = s · dybᵀ x                            (r, K)
    dB  = s · dyᵀ xa                            (N, r)

Only x and xa (M, r) are kept for backward besides the adapters; nothing weight-sized is ever
written: a 4-bit W is decoded tile by tile inside both GEMMs (QLoRA, section 3) and a dense W is
only read. The sums are float32 and each output is rounded once.

:func:`lora_linear` is the whole layer; :func:`lora_add` is the low-rank term alone added to a
base output computed elsewhere, ``out + s (x Aᵀ) Bᵀ``, which is what ``LoraLinear`` dispatches
to when kernels are switched on (``lorakit.kernels.use_kernels``). The eager reference is
``lorakit.layers.linear._add_low_rank`` with ``F.linear`` / ``quantized_linear`` for the base.
"""

from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable

from ..errors import AdapterError
from ..quant.weight import QuantizedWeight
from .gemm import gemm


def _adapter_grads(ctx, dyb, dy, x, xa, s):
    """(dA, dB) where asked: ``s dybᵀ x`` (r, K) and ``s dyᵀ xa`` (N, r); small outputs."""
    grad_a = grad_b = None
    if ctx.needs_input_grad[2]:
        grad_a = (dyb.t() @ x).mul_(s)
    if ctx.needs_input_grad[3]:
        grad_b = (dy.t() @ xa).mul_(s)
    return grad_a, grad_b


class _LoraLinear(torch.autograd.Function):
    """``x Wᵀ + bias + s (x Aᵀ) Bᵀ`` on 2-D x; W never receives a gradient (frozen base)."""

    @staticmethod
    def forward(ctx, x, bias, a, b, weight, s):
        xa = gemm(x, a)  # (M, r)
        y = gemm(x, weight, low=xa, right=b, scale=s, bias=bias)
        ctx.save_for_backward(x, xa, a, b)
        ctx.weight, ctx.s = weight, s  # the weight as given: backward reads it again
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, dy):
        x, xa, a, b = ctx.saved_tensors
        s = ctx.s
        dy = dy.contiguous()
        dyb = gemm(dy, b, transpose=False)  # (M, N)·(N, r)
        grad_x = grad_bias = None
        if ctx.needs_input_grad[0]:  # dy W + s·dyb A: W stored (N, K) read as (N → K)
            grad_x = gemm(
                dy, ctx.weight, transpose=False, low=dyb, right=a, right_transpose=False, scale=s
            )
        if ctx.needs_input_grad[1]:
            grad_bias = dy.sum(0)
        grad_a, grad_b = _adapter_grads(ctx, dyb, dy, x, xa, s)
        return grad_x, grad_bias, grad_a, grad_b, None, None


class _LoraAdd(torch.autograd.Function):
    """``out + s (x Aᵀ) Bᵀ`` on 2-D x and out."""

    @staticmethod
    def forward(ctx, x, out, a, b, s):
        xa = gemm(x, a)  # (M, r)
        ctx.save_for_backward(x, xa, a, b)
        ctx.s = s
        return gemm(None, None, low=xa, right=b, scale=s, acc=out, dtype=out.dtype)

    @staticmethod
    @once_differentiable
    def backward(ctx, dy):
        x, xa, a, b = ctx.saved_tensors
        s = ctx.s
        dy_a = dy.to(a.dtype).contiguous()
        dyb = gemm(dy_a, b, transpose=False)  # (M, r)
        grad_x = None
        if ctx.needs_input_grad[0]:
            grad_x = gemm(
                None, None, low=dyb, right=a, right_transpose=False, scale=s, dtype=x.dtype
            )
        grad_out = dy if ctx.needs_input_grad[1] else None
        grad_a, grad_b = _adapter_grads(ctx, dyb, dy_a, x, xa, s)
        return grad_x, grad_out, grad_a, grad_b, None


def _check(x: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    r, k = a.shape
    if x.shape[-1] != k or b.dim() != 2 or b.shape[1] != r:
        raise AdapterError(
            f"LoRA kernel: x (..., {x.shape[-1]}), A {tuple(a.shape)} and B {tuple(b.shape)} "
            "do not fit x (..., in), A (r, in), B (out, r)"
        )
    if a.dtype != b.dtype:
        raise AdapterError(f"LoRA kernel: A is {a.dtype} but B is {b.dtype}")


def lora_linear(
    x: torch.Tensor,
    weight: torch.Tensor | QuantizedWeight,
    bias: torch.Tensor | None,
    a: torch.Tensor,
    b: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """``x Wᵀ + bias + s (x Aᵀ) Bᵀ`` (..., out), computed in the adapter's dtype.

    ``weight`` (out, in) dense in the adapter's dtype, or a 4-bit ``QuantizedWeight`` (decoded
    to the adapter's dtype tile by tile). Differentiable in x, bias, A and B; the base weight is
    frozen (a dense W that requires grad is refused).
    """
    _check(x, a, b)
    if isinstance(weight, torch.Tensor):
        if weight.requires_grad:
            raise AdapterError("lora_linear: the base weight must be frozen (requires_grad=False)")
        if weight.dtype != a.dtype or tuple(weight.shape) != (b.shape[0], a.shape[1]):
            raise AdapterError(
                f"lora_linear: W {tuple(weight.shape)} {weight.dtype} does not fit A "
                f"{tuple(a.shape)} and B {tuple(b.shape)} in {a.dtype}"
            )
    if bias is not None and bias.dtype != a.dtype:
        bias = bias.to(a.dtype)
    flat = x.reshape(-1, x.shape[-1]).to(a.dtype).contiguous()
    y = _LoraLinear.apply(flat, bias, a, b, weight, float(scale))
    return y.view(*x.shape[:-1], y.shape[-1])


def lora_add(
    x: torch.Tensor, out: torch.Tensor, a: torch.Tensor, b: torch.Tensor, scale: float
) -> torch.Tensor:
    """``out + s (x Aᵀ) Bᵀ`` as a new tensor in ``out``'s dtype, the sum formed in float32 and
    rounded once; x is cast to the adapter's dtype first, as the eager path does."""
    _check(x, a, b)
    flat = x.reshape(-1, x.shape[-1]).to(a.dtype).contiguous()
    out2d = out.reshape(-1, out.shape[-1]).contiguous()
    y = _LoraAdd.apply(flat, out2d, a, b, float(scale))
    return y.view(out.shape)
