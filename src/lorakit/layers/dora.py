"""DoRA, weight-decomposed LoRA (Liu et al. 2024): a magnitude per output beside ``A`` and ``B``.

    W' = m ⊙ (W + s B A) / n,    n = ‖W + s B A‖ per output row    (paper, eq. 5)
    m  (out,)   trained, starts at ‖W‖ per row, so W' = W at the start
    n  (out,)   detached from the graph (paper, section 4.3): a constant for the backward

With ``g = m / n`` the layer computes ``y = g ⊙ (W x + s B A x) + b``, which is the LoRA layer's
own output ``u = W x + b + s B A x`` rescaled: ``y = g ⊙ u + (1 - g) ⊙ b``: one multiply (and an
add with a bias) after the plain LoRA update. With dropout on the adapter input ``x_d`` PEFT's
form holds, ``y = u + (g - 1) ⊙ W x_d`` with ``u`` from ``x_d``, and costs one more matmul.

The norm is never formed from ``W + s B A``. Per output row ``o``,

    n_o² = ‖W_o‖² + 2 s Σ_k B_ok (W Aᵀ)_ok + s² B_o (A Aᵀ) B_oᵀ

``‖W_o‖²`` is kept per layer (the base is frozen), ``W Aᵀ`` is one (r, in) × (in, out) product
(the cost of passing r tokens through the layer) and ``A Aᵀ`` is (r, r). Training computes it on
every forward under ``no_grad`` (no activation is kept for it); inference keeps ``g`` (and
``(1 - g) ⊙ b``) while no tensor it depends on changes, so an unmerged DoRA adapter costs one
elementwise pass more than LoRA. PEFT forms ``B A`` from an identity matrix and the norm of
``W + s B A`` on every forward.

Rows of a mixed batch each use their own adapter's ``g`` (1 for the base and for plain LoRA
adapters): DoRA adapters mix per row with any others. DoRA is for linear layers (``nn.Linear``,
a quantized linear, transformers' ``Conv1D``), not for embeddings, convolutions or fused slices.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import AdapterError
from ..quant import QuantizedWeight, quantized_linear

DORA = "dora"


class Dora:
    """The DoRA half of ``LoraLayer``: magnitudes, the norm, the rescaled output, the merge."""

    # -- the magnitudes ------------------------------------------------------------------------
    @property
    def _M(self) -> dict[str, nn.Parameter]:
        """The magnitude vectors by adapter name (empty for a layer without DoRA adapters)."""
        module = self._modules.get("lora_magnitude")
        return module._parameters if module is not None else {}

    def dora_problem(self) -> str | None:
        """Why this layer cannot carry a DoRA adapter, or None."""
        if not getattr(self, "linear_like", False):
            return f"{self._where()}: DoRA is for linear layers, not {self.describes} layers"
        if getattr(self, "slices", None) is not None:
            return f"{self._where()}: DoRA does not apply to fused slices"
        return None

    def add_magnitude(self, name: str, dtype: torch.dtype) -> None:
        """``m = ‖W‖`` per output row: the same sum the norm forms, so ``g`` is exactly 1."""
        problem = self.dora_problem()
        if problem:
            raise AdapterError(problem)
        if "lora_magnitude" not in self._modules:
            self.lora_magnitude = nn.ParameterDict()
        weight = self.weight
        if weight.device.type == "meta":
            m = torch.empty(self.out_features, dtype=dtype, device="meta")
        else:
            with torch.no_grad():
                m = self._row_norms_squared().sqrt().to(dtype)
        self.lora_magnitude[name] = nn.Parameter(m)

    def drop_magnitude(self, name: str) -> None:
        if name in self._M:
            del self.lora_magnitude[name]
        self.__dict__.get("_dora_merged", {}).pop(name, None)

    # -- the norm ------------------------------------------------------------------------------
    def _out_in(self) -> torch.Tensor:
        """The dense base weight as (out, in), float32 at least (a quantized one dequantized)."""
        weight = self.weight
        if isinstance(weight, QuantizedWeight):
            dense = weight.dequantize(torch.float32)
        else:
            dense = weight.detach()
        dense = dense.t() if self.fan_in_fan_out else dense
        return dense.to(torch.promote_types(dense.dtype, torch.float32))

    def _row_norms_squared(self) -> torch.Tensor:
        """``‖W_o‖²`` per output row, float32 at least; kept while the weight is the same."""
        weight = self.weight
        key = (id(weight), weight.data_ptr() if isinstance(weight, torch.Tensor) else 0)
        key += (getattr(weight, "_version", 0),)
        kept = self.__dict__.get("_dora_w2")
        if kept is not None and kept[0] == key:
            return kept[1]
        with torch.no_grad():
            w2 = self._out_in().square().sum(1)
        self.__dict__["_dora_w2"] = (key, w2)
        return w2

    def _base_times(self, a: torch.Tensor) -> torch.Tensor:
        """``A Wᵀ`` (r, out), i.e. ``(W Aᵀ)ᵀ``: the rows of A passed through the base weight."""
        weight = self.weight
        if isinstance(weight, QuantizedWeight):
            return quantized_linear(a.to(weight.dtype), weight, None).float()
        if self.fan_in_fan_out:
            return (a.to(weight.dtype) @ weight).float()
        return F.linear(a.to(weight.dtype), weight).float()

    def weight_norm(self, name: str) -> torch.Tensor:
        """``n = ‖W + s B A‖`` per output row, float32, detached (see the module docstring)."""
        with torch.no_grad():
            a = self._A[name].detach().float()
            b = self._B[name].detach().float()
            s = self.records[name].scale
            w2 = self._row_norms_squared().float()
            cross = (b * self._base_times(a).t()).sum(1)  # Σ_k B_ok (W Aᵀ)_ok
            ba2 = ((b @ (a @ a.t())) * b).sum(1)  # ‖(B A)_o‖²
            return (w2 + (2.0 * s) * cross + (s * s) * ba2).clamp_min(0.0).sqrt()

    def dora_factors(self, name: str) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``(g, c)``: ``g = m / n`` (out,) and ``c = (1 - g) ⊙ b`` (None without a bias), in the
        magnitude's dtype. Differentiable in ``m`` while it trains; kept in inference while
        A, B, m, the weight and the scale are the same."""
        m = self._M[name]
        train = torch.is_grad_enabled() and m.requires_grad
        if train or torch.compiler.is_compiling():
            return self._factors(name, m)
        a, b, weight = self._A[name], self._B[name], self.weight
        key = tuple((id(t), t.data_ptr(), t._version) for t in (a, b, m))
        key += (id(weight), self.records[name].scale, self.bias is None)
        cache = self.__dict__.setdefault("_dora_cache", {})
        kept = cache.get(name)
        if kept is not None and kept[0] == key:
            return kept[1]
        with torch.no_grad():
            factors = self._factors(name, m)
        cache[name] = (key, factors)
        return factors

    def _factors(self, name: str, m: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        g = m / self.weight_norm(name).to(m.dtype)
        bias = self.bias
        return g, None if bias is None else (1.0 - g) * bias.to(g.dtype)

    # -- forward -------------------------------------------------------------------------------
    def _linear_only(self, x: torch.Tensor) -> torch.Tensor:
        """``W x`` without the bias."""
        weight = self.weight
        if isinstance(weight, QuantizedWeight):
            return quantized_linear(x, weight, None)
        if self.fan_in_fan_out:
            return x @ weight
        return F.linear(x.to(weight.dtype), weight)

    def dora_forward(
        self, x: torch.Tensor, out: torch.Tensor, name: str, dropped: torch.Tensor
    ) -> torch.Tensor:
        """DoRA for one adapter: ``out = W x + b``; ``dropped`` the adapter's input after
        dropout (``x`` itself without it)."""
        a = self._A[name]
        b = self._B[name]
        g, c = self.dora_factors(name)
        u = self.lora_forward(dropped, out, a, b, self.records[name].scale)
        y = rescale(u, g, c)
        if dropped is not x:  # y = u + (g - 1) W x_d with u from x_d (PEFT's form)
            y = y + ((g - 1.0) * self._linear_only(dropped - x).to(g.dtype)).to(y.dtype)
        return y

    # -- merging -------------------------------------------------------------------------------
    def dora_merged(self, name: str) -> torch.Tensor:
        """``g ⊙ (W + s B A)`` in float32 (rows scaled; laid out like ``self.weight``), ``g``
        from the direct norm of the sum, and kept for ``unmerge``."""
        weight = self.dense_weight().float()
        summed = weight + self.delta_weight(name).to(weight.device)
        rows = summed.t() if self.fan_in_fan_out else summed
        g = self._M[name].detach().float() / torch.linalg.vector_norm(rows, dim=1)
        self.__dict__.setdefault("_dora_merged", {})[name] = g
        return (rows * g[:, None]).t() if self.fan_in_fan_out else rows * g[:, None]

    def dora_unmerged(self, name: str) -> torch.Tensor:
        """``W`` from a weight ``name`` is merged into: ``W' / g - s B A``, float32."""
        g = self.__dict__.get("_dora_merged", {}).get(name)
        if g is None:
            raise AdapterError(f"{self._where()}: no record of how {name!r} was merged")
        merged = self.weight.float()
        rows = merged.t() if self.fan_in_fan_out else merged
        rows = rows / g.to(rows.device)[:, None]
        rows = rows.t() if self.fan_in_fan_out else rows
        return rows - self.delta_weight(name).to(rows.device)


def rescale(u: torch.Tensor, g: torch.Tensor, c: torch.Tensor | None) -> torch.Tensor:
    """``g ⊙ u + c`` on the last axis, in ``u``'s dtype, formed in ``g``'s; in place when
    autograd records nothing and the dtypes agree."""
    if u.dtype == g.dtype:
        if not (torch.is_grad_enabled() and (u.requires_grad or g.requires_grad)):
            if not torch.compiler.is_compiling():
                u = u.mul_(g)
                return u if c is None else u.add_(c)
        y = u * g
        return y if c is None else y + c
    y = u.to(g.dtype) * g
    return (y if c is None else y + c).to(u.dtype)
