"""LoRA on linear maps: ``nn.Linear``, transformers' GPT-2 ``Conv1D``, and fused projections.

Shapes: x (..., in) -> A x (..., r) -> B A x (..., out).

* ``LoraLinear`` wraps ``nn.Linear`` (weight (out, in)).
* ``LoraConv1D`` wraps transformers' ``Conv1D`` (GPT-2), whose weight is stored transposed,
  (in, out) ("fan-in-fan-out"); the adapter is the same, only the merge transposes.
* Either may be *fused-sliced*: a fused projection such as GPT-2's ``c_attn`` (q, k, v stacked
  on the output axis) is split into k equal output slices and only some get an adapter, each with
  its own rank-r pair (loralib's MergedLinear; the LoRA paper's GPT-2 experiments adapt q and v
  only). The slice adapters are stored compactly, ``A`` (m·r, in) and ``B`` (m·out/k, r) for m
  adapted slices, and expanded into one block matrix ``B`` (out, m·r) for the math, so a fused
  layer uses the same code path as any other.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .. import kernels
from ..errors import AdapterError
from ..quant import QuantizedWeight, QuantLinear, quantized_linear
from .base import LoraLayer
from .kinds import register
from .rows import _no_autograd


def _add_low_rank(
    x: torch.Tensor, out: torch.Tensor, a: torch.Tensor, b: torch.Tensor, s: float
) -> torch.Tensor:
    """``out + s · (x Aᵀ) Bᵀ``, the sum formed in the adapter's dtype and rounded once.

    ``out`` is the base layer's fresh output and is updated in place (no one else holds it).
    Many tokens: the add and the scale are fused into the second GEMM (``addmm`` with beta=1), so
    the output is read once. Few tokens (decoding): ``out.add_(x Aᵀ Bᵀ, alpha=s)``, the fewest
    dispatches and no new output; in mixed precision the add runs in the adapter's dtype and
    rounds once into ``out``'s. With kernels switched on (``lorakit.kernels``) a fused Triton
    kernel computes the same sum.
    """
    if kernels.wanted(x):
        from ..kernels.lora_linear import lora_add

        return lora_add(x, out, a, b, s)
    if x.dtype != a.dtype:
        x = x.to(a.dtype)
    xa = F.linear(x, a)  # (..., r)
    if xa.numel() > _FEW_TOKENS * a.shape[0] and out.dtype == xa.dtype and out.is_contiguous():
        out2d, xa2d = out.reshape(-1, out.shape[-1]), xa.reshape(-1, xa.shape[-1])
        if _no_autograd(out, a):  # into the base output itself: no new (tokens, out) tensor
            return out2d.addmm_(xa2d, b.t(), alpha=s).view(out.shape)
        return torch.addmm(out2d, xa2d, b.t(), alpha=s).view(out.shape)
    if torch.compiler.is_compiling():
        # Inductor (seen with torch 2.13 on CPU) drops the `alpha` of an add fused after a
        # linear, so compiled graphs scale explicitly, out of place.
        summed = out + F.linear(xa, b) * s
        return summed if summed.dtype == out.dtype else summed.to(out.dtype)
    return out.add_(F.linear(xa, b), alpha=s)


_FEW_TOKENS = 16


class _LinearLike(LoraLayer):
    """Shared by both linear kinds: the adapter math, fused slices, shapes."""

    in_features: int
    out_features: int
    linear_like = True

    def __init__(self, base: nn.Module, in_features: int, out_features: int, slices=None) -> None:
        super().__init__(base)
        self.in_features = in_features
        self.out_features = out_features
        self.slices: tuple[bool, ...] | None = tuple(slices) if slices else None
        self.expands_B = self.slices is not None
        if self.slices is not None:
            k = len(self.slices)
            self._slice_size = out_features // k
            self._n_sliced = sum(self.slices)

    @classmethod
    def count_params(cls, module, in_f, out_f, r, slices) -> int:
        if slices:
            m = sum(slices)
            return m * r * in_f + m * (out_f // len(slices)) * r
        return r * (in_f + out_f)

    @classmethod
    def around(cls, module, slices=None):
        return cls(module, slices)

    def adapter_shapes(self, r: int):
        if self.slices is None:
            return (r, self.in_features), (self.out_features, r)
        m = self._n_sliced
        return (m * r, self.in_features), (m * self._slice_size, r)

    def init_adapter(self, a, b, init, r):
        if self.slices is None:
            return super().init_adapter(a, b, init, r)
        for part in a.split(r, 0):  # each slice adapter initialised as its own (r, in) matrix
            super().init_adapter(part, b, init, r)

    def effective_B(self, name: str) -> torch.Tensor:
        b = self._B[name]
        if self.slices is None:
            return b
        # (m·out/k, r) -> block diagonal (m·out/k, m·r) -> zero rows for slices left alone
        block = torch.block_diag(*b.split(self._slice_size, 0))
        rows, parts = 0, []
        for enabled in self.slices:
            if enabled:
                parts.append(block[rows : rows + self._slice_size])
                rows += self._slice_size
            else:
                parts.append(block.new_zeros(self._slice_size, block.shape[1]))
        return torch.cat(parts, 0)  # (out, m·r)

    def compact_B(self, full: torch.Tensor, r: int) -> torch.Tensor:
        """B from its block form (out, m·r) back to (m·out/k, r), checking the rest of the block
        form is zero (else it is a dense B that the slices cannot express)."""
        if self.slices is None:
            return full
        size = self._slice_size
        rest = full.clone()
        blocks = []
        j = 0
        for i, enabled in enumerate(self.slices):
            if enabled:
                rows, cols = slice(i * size, (i + 1) * size), slice(j * r, (j + 1) * r)
                blocks.append(full[rows, cols])
                rest[rows, cols] = 0
                j += 1
        if bool(rest.any()):
            raise AdapterError(
                f"{self._where()}: B has non-zero entries outside the blocks of its fused slices "
                f"{list(self.slices)}; the tensor does not come from a fused-slice adapter"
            )
        return torch.cat(blocks, 0)

    lora_forward = staticmethod(_add_low_rank)  # one call frame less per adapted layer

    def _delta_out_in(self, name: str) -> torch.Tensor:
        """``s · B A`` as (out, in), float32."""
        a = self._A[name].float()
        b = self.effective_B(name).float()
        return (b @ a) * self.records[name].scale


def is_gpt2_conv1d(module: nn.Module) -> bool:
    """transformers' ``Conv1D`` (GPT-2), recognised without importing transformers."""
    cls = type(module)
    return (
        cls.__name__ == "Conv1D"
        and cls.__module__.startswith("transformers")
        and getattr(module, "weight", None) is not None
        and module.weight.dim() == 2
    )


@register
class LoraLinear(_LinearLike):
    """LoRA around ``nn.Linear``: ``y = x Wᵀ + bias + s · (x Aᵀ) Bᵀ``.

    Also around a :class:`~lorakit.quant.QuantLinear` (QLoRA): W is then a quantized weight,
    dequantized on the fly in its compute dtype; the adapter math is the same.
    """

    kind = "linear"
    describes = "nn.Linear"

    @classmethod
    def accepts(cls, module):
        if isinstance(module, QuantLinear):  # a quantized base (lorakit.quant): as on nn.Linear
            return True
        if isinstance(module, nn.modules.linear.NonDynamicallyQuantizableLinear):
            return "it is the out_proj of nn.MultiheadAttention, which bypasses its forward"
        return isinstance(module, nn.Linear)

    def __init__(self, base: nn.Linear, slices=None) -> None:
        super().__init__(base, base.in_features, base.out_features, slices)

    def base_forward(self, x):
        weight = self.weight
        if isinstance(weight, QuantizedWeight):  # the one branch a quantized base needs
            if kernels.wanted(x) and weight.quant_type != "int8":  # 4-bit codes read per tile
                from ..kernels.nf4 import dequantize_matmul

                return dequantize_matmul(x, weight, self.bias)
            return quantized_linear(x, weight, self.bias)
        return F.linear(x, weight, self.bias)

    def delta_weight(self, name):
        return self._delta_out_in(name)


@register
class LoraConv1D(_LinearLike):
    """LoRA around transformers' ``Conv1D`` (GPT-2): weight (in, out), ``y = x W + bias``."""

    kind = "conv1d_gpt2"
    describes = "transformers Conv1D"
    fan_in_fan_out = True

    @classmethod
    def accepts(cls, module):
        return is_gpt2_conv1d(module)

    @staticmethod
    def base_shape(module):
        w = module.weight
        return w.shape[0], w.shape[1], f"{w.shape[0]}->{w.shape[1]}"

    def __init__(self, base: nn.Module, slices=None) -> None:
        in_features, out_features = base.weight.shape
        super().__init__(base, in_features, out_features, slices)

    def base_forward(self, x):
        shape = x.shape[:-1] + (self.out_features,)
        flat = x.reshape(-1, x.shape[-1])
        if self.bias is None:
            return torch.mm(flat, self.weight).view(shape)
        return torch.addmm(self.bias, flat, self.weight).view(shape)

    def delta_weight(self, name):
        return self._delta_out_in(name).t()
