"""The merging half of ``LoraLayer``: fold an adapter into the weight and take it out again.

``W' = W + s · B A``, the sum formed in float32 and cast once to the weight's dtype
(``merged_weight``, the one place it is computed). Merging is an explicit call and safe to repeat;
a quantized base is merged in full precision and its quantized original kept aside, so
``unmerge`` restores it bit for bit; ``unload`` gives the base module back.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ..errors import MergeError
from ..quant import QuantizedWeight, QuantLinear, requantize


class Merging:
    """Merging, unmerging and unloading, for ``LoraLayer``."""

    def dense_weight(self) -> torch.Tensor:
        """The base weight as a tensor: dequantized to float32 when it is quantized."""
        weight = self.weight
        return weight.dequantize(torch.float32) if isinstance(weight, QuantizedWeight) else weight

    def merged_weight(self, name: str) -> torch.Tensor:
        """``W + s · B A`` for adapter ``name``: the sum in float32, cast once to W's dtype.
        A DoRA adapter's rows are rescaled by ``m / ‖W + s B A‖`` (layers/dora.py)."""
        if self.records[name].variant is not None:
            return self.dora_merged(name).to(self.weight.dtype)
        weight = self.dense_weight()
        merged = weight.float() + self.delta_weight(name).to(weight.device)
        return merged.to(self.weight.dtype)

    def merge(self, name: str | None = None) -> bool:
        """Fold ``s · B A`` of the active adapter (or ``name``) into the weight. Repeat: no-op.

        The merged weight is computed once (``merged_weight``). A merge that would write a
        non-finite value raises :class:`MergeError` and leaves the weight unchanged. On a
        quantized weight the merged weight is held in full precision and the quantized
        original is kept aside: ``unmerge`` restores it exactly. Returns whether it changed.
        """
        name = name or self.active_adapter
        if name is None:
            return False
        self._require(name)
        if name in self.merged_adapters:
            return False
        with torch.no_grad():
            new = self.merged_weight(name)
            self._check_finite(new, f"merging adapter {name!r}")
            if isinstance(self.weight, QuantizedWeight):
                object.__setattr__(self, "_quantized_base", self.weight)  # not in the state dict
                self.weight = nn.Parameter(new, requires_grad=False)
            else:
                self.weight.copy_(new)
        self.merged_adapters.append(name)
        self._update_route()
        return True

    def merge_problem(self, name: str) -> str | None:
        """Why merging ``name`` would write a non-finite or out-of-range value, or None.

        Cheap when the answer is clearly no: every tensor finite and a bound on ``|W| + |s B A|``
        (``max|W| + |s| · max row norm of B · max column norm of A``, by Cauchy-Schwarz) within
        the weight dtype's range. Only when the bound is inconclusive is the merged weight
        itself computed.
        """
        record = self.record(name)
        with torch.no_grad():
            weight = self.dense_weight()
            a = self._A[name].detach().float()
            b = self.effective_B(name).detach().float()
            tensors = (weight, a, b)
            if not all(bool(torch.isfinite(t).all()) for t in tensors):
                return f"merging {name!r} would write non-finite values"
            top = torch.finfo(self.weight.dtype).max
            if record.variant is not None:  # DoRA rescales rows: no cheap bound, compute it
                merged = self.merged_weight(name)
                if not bool(torch.isfinite(merged).all()):
                    return f"merging {name!r} would write non-finite or out-of-range values"
                return None
            bound = float(weight.abs().max()) + abs(record.scale) * float(
                b.flatten(1).norm(dim=1).max()
            ) * float(a.flatten(1).norm(dim=0).max())
            if math.isfinite(bound) and bound < top:
                return None
            merged = self.dense_weight().float() + self.delta_weight(name).to(weight.device)
            if not bool(torch.isfinite(merged).all()):
                return f"merging {name!r} would write non-finite values"
            if not bool(torch.isfinite(merged.to(self.weight.dtype)).all()):
                return f"merging {name!r} overflows {self.weight.dtype} (values beyond its range)"
        return None

    def unmerge(self) -> bool:
        """Subtract every merged adapter's delta again (exact up to float rounding).

        A quantized base gets its original quantized weight back, bit for bit.
        """
        original = self.__dict__.pop("_quantized_base", None)
        if original is not None:
            device = self.weight.device
            del self._parameters["weight"]  # the merged full-precision weight goes
            self.weight = original.to(device)
            self.merged_adapters.clear()
            self._update_route()
            return True
        changed = False
        with torch.no_grad():
            while self.merged_adapters:
                name = self.merged_adapters[-1]
                if self.records[name].variant is not None:  # DoRA: W' / g - s B A
                    new = self.dora_unmerged(name).to(self.weight.dtype)
                else:
                    new = self.weight.float() - self.delta_weight(name).to(self.weight.device)
                    new = new.to(self.weight.dtype)
                self._check_finite(new, f"unmerging adapter {name!r}")
                self.weight.copy_(new)
                self.merged_adapters.pop()
                changed = True
        self._update_route()
        return changed

    def _check_finite(self, new: torch.Tensor, what: str) -> None:
        if not bool(torch.isfinite(new).all()):
            bad = int((~torch.isfinite(new)).sum())
            raise MergeError(
                f"{self._where()}: {what} would write {bad} non-finite value(s) into the "
                f"{self.weight.dtype} weight; the weight was left unchanged"
            )

    def requantize_merged(self):
        """Quantize a weight merged into full precision again, in its original format.

        Only after ``merge`` on a quantized base; the result cannot be unmerged. Returns the
        :class:`~lorakit.quant.RequantError` it introduced, or None when there is nothing to do.
        """
        original = self.__dict__.pop("_quantized_base", None)
        if original is None:
            return None
        new, error = requantize(self.weight, original)
        del self._parameters["weight"]
        self.weight = new
        return error

    def unload(self) -> nn.Module:
        """The base module again (its own class), holding this layer's current weight and bias.

        A quantized base merged into full precision comes back as a plain ``nn.Linear``.
        """
        shell = self._shell
        if isinstance(self.weight, QuantizedWeight):
            shell._modules["weight"] = self.weight
            return self._with_bias(shell)
        if isinstance(shell, QuantLinear):
            shell = nn.Linear(
                shell.in_features, shell.out_features, self.bias is not None, device="meta"
            )
        shell._parameters["weight"] = self.weight
        return self._with_bias(shell)

    def _with_bias(self, shell: nn.Module) -> nn.Module:
        if "bias" in shell._parameters:
            shell._parameters["bias"] = self.bias
        return shell
