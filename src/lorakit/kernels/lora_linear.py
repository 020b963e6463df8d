"""LoRA linear forward and backward on the fused GEMM (:mod:`.gemm`), W dense or 4-bit.

Forward, for x (M, K), W (N, K), A (r, K), B (N, r), scale s (LoRA paper, section 4.1):

    xa = x Aᵀ                                   (M, r)   one small GEMM (the "shrink")
    y  = x Wᵀ + bias + s · xa Bᵀ                (M, N)   one GEMM, the low-rank term in its epilogue

Backward, from dy (M, N), W frozen (unsloth's LoRA_MLP / LoRA_QKV derivation):

    dyb = dy B                                  (M, r)
    dx  = dy W + s · dyb A                      (M, K)   one GEMM, the low-rank term in its epilogue
    dA  = s · dybᵀ x                            (r, K)
    dB  = s · dyᵀ xa                            (N, r)

Only x and xa (M, r) are kept for backward besides the adapters, and nothing weight-sized is
saved: a dense W is only read, and a 4-bit W is decoded again in the backward (QLoRA, section 3),
tile by tile inside both GEMMs for few rows and whole, for the time of one product, for many
(``gemm.DECODE_PER_TILE_MAX_ROWS``). The sums are float32 and each output is rounded once.

:func:`lora_linear` is the whole layer; :func:`lora_linear_group` several layers that read the
same input (q/k/v, gate/up: unsloth's LoRA_QKV), with one shrink ``x [A_1; ...; A_n]ᵀ`` for all
and ``dx = Σ_i dy_i W_i + s_i (dy_i B_i) A_i`` accumulated in the GEMMs' epilogues (each GEMM
starts from the previous partial sum); :func:`lora_add` is the low-rank term alone added to a
base output computed elsewhere, ``out + s (x Aᵀ) Bᵀ``, which is what ``LoraLinear`` dispatches
to when kernels are switched on (``lorakit.kernels.use_kernels``). The eager reference is
``lorakit.layers.linear._add_low_rank`` with ``F.linear`` / ``quantized_linear`` for the base.
"""

from __future__ import annotations

from collections.abc import Sequence

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


Weight = torch.Tensor | QuantizedWeight


class _LoraGroup(torch.autograd.Function):
    """Several ``x W_iᵀ + bias_i + s_i (x A_iᵀ) B_iᵀ`` on one 2-D x; inputs after ``x`` and the
    scales: (W, bias, A, B) per projection."""

    @staticmethod
    def forward(ctx, x, scales, *parts):
        quads = [parts[i : i + 4] for i in range(0, len(parts), 4)]
        ranks = [a.shape[0] for _, _, a, _ in quads]
        xa_all = gemm(x, torch.cat([a for _, _, a, _ in quads]))  # (M, Σr): one shrink
        xas = [part.contiguous() for part in xa_all.split(ranks, 1)]
        outs = tuple(
            gemm(x, w, low=xa, right=b, scale=s, bias=bias)
            for (w, bias, _, b), xa, s in zip(quads, xas, scales)
        )
        ctx.save_for_backward(x, *xas, *(t for _, _, a, b in quads for t in (a, b)))
        ctx.weights, ctx.scales = [w for w, _, _, _ in quads], scales
        return outs

    @staticmethod
    @once_differentiable
    def backward(ctx, *dys):
        n = len(dys)
        x, xas, ab = ctx.saved_tensors[0], ctx.saved_tensors[1 : 1 + n], ctx.saved_tensors[1 + n :]
        needs = ctx.needs_input_grad
        grad_x, grads = None, []
        for i, (dy, xa, w, s) in enumerate(zip(dys, xas, ctx.weights, ctx.scales)):
            a, b = ab[2 * i], ab[2 * i + 1]
            dy = dy.contiguous()  # an unused output's gradient comes as zeros
            dyb = gemm(dy, b, transpose=False)
            if needs[0]:  # this projection's dy W + s·dyb A added to the partial sum
                grad_x = gemm(
                    dy, w, transpose=False, low=dyb, right=a, right_transpose=False, scale=s,
                    acc=grad_x, n=x.shape[1],
                )  # fmt: skip
            k = 2 + 4 * i  # this projection's (W, bias, A, B) among the inputs
            grads += [
                None,
                dy.sum(0) if needs[k + 1] else None,
                (dyb.t() @ x).mul_(s) if needs[k + 2] else None,
                (dy.t() @ xa).mul_(s) if needs[k + 3] else None,
            ]
        return (grad_x, None, *grads)


def lora_linear_group(
    x: torch.Tensor,
    parts: Sequence[
        tuple[
            torch.Tensor | QuantizedWeight, torch.Tensor | None, torch.Tensor, torch.Tensor, float
        ]
    ],
) -> list[torch.Tensor]:
    """``[x W_iᵀ + bias_i + s_i (x A_iᵀ) B_iᵀ for each (W_i, bias_i, A_i, B_i, s_i)]``: the
    projections of one input (q/k/v, or gate/up) in one autograd node, as :func:`lora_linear`
    computes each; every A_i reads the same x (same ``in``), ranks may differ."""
    if not parts:
        raise AdapterError("lora_linear_group: no projections given")
    dtype = parts[0][2].dtype
    flat = x.reshape(-1, x.shape[-1]).to(dtype).contiguous()
    tensors, scales = [], []
    for weight, bias, a, b, s in parts:
        _check(x, a, b)
        if a.dtype != dtype:
            raise AdapterError(f"lora_linear_group: adapters in {a.dtype} and {dtype}")
        tensors += [weight, None if bias is None else bias.to(dtype), a, b]
        scales.append(float(s))
    outs = _LoraGroup.apply(flat, tuple(scales), *tensors)
    return [y.view(*x.shape[:-1], y.shape[-1]) for y in outs]
