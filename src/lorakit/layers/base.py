"""``LoraLayer``: the one way a layer holds its adapters.

A LoRA layer replaces a base layer (``nn.Linear``, ``nn.Embedding``, ...) in the model. It owns the
base ``weight`` and ``bias`` under their original names, so the base model's state-dict keys do not
change, and holds any number of adapters beside them:

    lora_A[name]   (r, in)    starts random (kaiming-uniform or gaussian)
    lora_B[name]   (out, r)   starts at zero, so the adapted layer starts equal to the base
    h = base(x) + s · B A x   with s = alpha / r   (LoRA paper, section 4.1)

One code path serves every use:

* one active adapter: ``forward`` looks up one name, precomputed when the adapter is switched, and
  adds its low-rank update (two small matmuls, the add fused into the second);
* a batch whose rows use different adapters: adapters are stacked, padded to a common rank (the
  padding rows are zero and contribute nothing) and each row gathers its own by index, one batched
  matmul per layer instead of a loop over adapters (the idea of Punica's BGMV and S-LoRA);
* several adapters trained at once: the same gathered path, with each adapter receiving gradient
  only from its own rows.

Subclasses say how the base computes (``base_forward``), how an input reaches rank ``r``
(``lora_forward``) and how ``B A`` maps onto the base weight's layout (``delta_weight``).
Merging is an explicit call and safe to repeat; ``train()``/``eval()``/``forward()`` never change
weights.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import AdapterError, MergeError
from ..quant import QuantizedWeight, QuantLinear, requantize
from ..quant.weight import hand_over_packed


def _no_autograd(out: torch.Tensor, a: torch.Tensor) -> bool:
    """Whether autograd records nothing here, so the base output may be updated in place."""
    return not (torch.is_grad_enabled() and (out.requires_grad or a.requires_grad))


class LoraLayer(nn.Module):
    """Base class of every LoRA layer; see the module docstring."""

    #: short name of the base layer kind ("linear", "conv1d_gpt2", "embedding", "conv")
    kind: str = ""
    #: whether ``effective_B`` builds B from the stored one (fused slices) or returns it as it is
    expands_B: bool = False

    def __init__(self, base: nn.Module) -> None:
        super().__init__()
        self.weight = base.weight
        self.register_parameter("bias", getattr(base, "bias", None))
        self.lora_A = nn.ParameterDict()
        self.lora_B = nn.ParameterDict()
        self.r: dict[str, int] = {}
        self.alpha: dict[str, float] = {}
        self.scaling: dict[str, float] = {}
        self.dropout: dict[str, float] = {}
        self.active_adapter: str | None = None
        self.merged_adapters: list[str] = []
        self.disabled = False
        # What forward adds: the name of one adapter, or None for the base alone. Derived from
        # active/merged/disabled by _update_route(), so forward pays one attribute read.
        self._route: str | None = None
        # Per-row adapter slots for a mixed batch (0 = base); None outside adapter_per_row().
        self._row_slots: torch.Tensor | None = None
        self._rows_active = False  # whether any row's slot is not 0 (the base)
        self._row_groups: list | None = None  # [(adapter, row indices)] for the grouped path
        # Inference caches of the mixed-batch path. The stack of all adapters is kept while no
        # adapter tensor changes (one extra copy of this layer's adapters, built on the first
        # mixed batch); each row's pick from it is kept from a block's second call to its end.
        self._stack_cache: tuple | None = None  # (key, (A stack, B stack))
        self._rows_cache: tuple | None = None  # (A stack, A per row or None, B per row or None)
        # The base module, kept without its tensors, to give back on unload (same class, hooks,
        # attributes). Not registered: it is not part of the module tree or the state dict.
        if isinstance(self.weight, QuantizedWeight):
            base._modules["weight"] = None
        else:
            base._parameters["weight"] = None
        if "bias" in base._parameters:
            base._parameters["bias"] = None
        object.__setattr__(self, "_shell", base)

    # The dicts the ParameterDicts store their parameters in, read directly by forward (a decoded
    # token calls hundreds of layers; ``self.lora_A[name]`` goes through two ``__getattr__``
    # calls). Looked up afresh on every read, never kept in an attribute: ``torch.export`` and
    # other tracers swap a module's tensor-holding attributes while they trace, and a kept alias
    # would then point at the tracer's copies (the live model silently losing its adapters).
    @property
    def _A(self) -> dict[str, nn.Parameter]:
        return self._modules["lora_A"]._parameters

    @property
    def _B(self) -> dict[str, nn.Parameter]:
        return self._modules["lora_B"]._parameters

    # -- what subclasses provide ---------------------------------------------------------------
    def base_forward(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError  # pragma: no cover - every subclass defines it

    def lora_forward(
        self, x: torch.Tensor, out: torch.Tensor, a: torch.Tensor, b: torch.Tensor, s: float
    ) -> torch.Tensor:
        """``out + s · B A x`` for one adapter; ``x`` already passed through dropout."""
        raise NotImplementedError  # pragma: no cover

    def delta_weight(self, name: str) -> torch.Tensor:
        """``s · B A`` in float32, laid out like ``self.weight``."""
        raise NotImplementedError  # pragma: no cover

    def adapter_shapes(self, r: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """Shapes of ``lora_A`` and ``lora_B`` for rank ``r``."""
        raise NotImplementedError  # pragma: no cover

    def effective_B(self, name: str) -> torch.Tensor:
        """The ``B`` the math uses; a fused-slice layer expands its compact B here."""
        return self.lora_B[name]

    def dense_weight(self) -> torch.Tensor:
        """The base weight as a tensor: dequantized to float32 when it is quantized."""
        weight = self.weight
        return weight.dequantize(torch.float32) if isinstance(weight, QuantizedWeight) else weight

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        hand_over_packed(self, state_dict, prefix)  # a quantized weight's codes sit at "weight"
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def init_adapter(self, a: torch.Tensor, b: torch.Tensor, init: str, r: int) -> None:
        """A random, B zero (LoRA paper 4.1; kaiming-uniform with a=sqrt(5) as PEFT does)."""
        if init == "gaussian":
            nn.init.normal_(a, std=1.0 / r)
        else:
            nn.init.kaiming_uniform_(a, a=math.sqrt(5))
        nn.init.zeros_(b)

    # -- adapters ------------------------------------------------------------------------------
    @property
    def adapter_names(self) -> list[str]:
        return list(self.lora_A.keys())

    def add_adapter(
        self,
        name: str,
        r: int,
        alpha: float,
        scaling: float,
        dropout: float = 0.0,
        init: str = "kaiming",
        dtype: torch.dtype | None = None,
    ) -> None:
        if name in self.lora_A:
            raise AdapterError(f"{self._where()}: adapter {name!r} already exists")
        dtype = dtype or self.weight.dtype
        if not dtype.is_floating_point:
            dtype = torch.float32
        shape_a, shape_b = self.adapter_shapes(r)
        device = self.weight.device
        a = nn.Parameter(torch.empty(shape_a, device=device, dtype=dtype))
        b = nn.Parameter(torch.empty(shape_b, device=device, dtype=dtype))
        if device.type != "meta":
            with torch.no_grad():
                self.init_adapter(a, b, init, r)
        self.lora_A[name] = a
        self.lora_B[name] = b
        self.r[name], self.alpha[name], self.scaling[name] = r, alpha, scaling
        self.dropout[name] = float(dropout)

    def delete_adapter(self, name: str) -> None:
        self._require(name)
        if name in self.merged_adapters:
            raise MergeError(f"{self._where()}: adapter {name!r} is merged; unmerge it first")
        del self.lora_A[name], self.lora_B[name]
        self._stack_cache = None
        for table in (self.r, self.alpha, self.scaling, self.dropout):
            del table[name]
        if self.active_adapter == name:
            self.active_adapter = None
        self._update_route()

    def set_adapter(self, name: str | None) -> None:
        """Make ``name`` the adapter forward adds (None: none). A layer without it adds none."""
        if self.merged_adapters and name not in (None, *self.merged_adapters):
            raise MergeError(
                f"{self._where()}: adapter(s) {self.merged_adapters} are merged into the weight; "
                f"unmerge before switching to {name!r}"
            )
        self.active_adapter = name if name in self.lora_A else None
        self._update_route()

    def _update_route(self) -> None:
        name = self.active_adapter
        if self.disabled or name is None or name in self.merged_adapters:
            self._route = None
        else:
            self._route = name

    def _require(self, name: str) -> None:
        if name not in self.lora_A:
            known = ", ".join(self.adapter_names) or "none"
            raise AdapterError(f"{self._where()}: no adapter {name!r} (adapters here: {known})")

    def _where(self) -> str:
        return getattr(self, "_path", None) or type(self).__name__

    # -- forward -------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base_forward(x)
        if self._row_slots is not None:
            return self._forward_rows(x, out)
        name = self._route
        if name is None:
            return out
        # Plain dict reads: the ParameterDicts' own storage (see __init__), not __getattr__ chains.
        a = self._A[name]
        b = self.effective_B(name) if self.expands_B else self._B[name]
        p = self.dropout[name]
        if p > 0.0 and self.training:
            x = F.dropout(x, p, True)
        return self.lora_forward(x, out, a, b, self.scaling[name])

    # -- mixed batches -------------------------------------------------------------------------
    def slot_of(self, name: str | None) -> int:
        """Row slot of an adapter in this layer's stack: 0 = base, i + 1 = i-th adapter."""
        if name is None or name not in self.lora_A or self.disabled:
            return 0
        return self.adapter_names.index(name) + 1

    def stacked(self) -> tuple[torch.Tensor, torch.Tensor]:
        """All adapters stacked and zero-padded to a common rank, slot 0 a zero adapter.

        Returns ``A`` (n + 1, R, *a_rest) and ``B`` (n + 1, out, R) with each adapter's scale
        folded into its B. Built from the parameters (differentiable), so the same stack serves
        inference and training several adapters at once.
        """
        names = self.adapter_names
        params = [*self._A.values(), *self._B.values()]
        if torch.is_grad_enabled() and any(p.requires_grad for p in params):
            return self._build_stack(names)  # training: differentiable, built every call
        if torch.compiler.is_compiling():
            return self._build_stack(names)
        # Inference: reuse the stack while no adapter tensor changed (same object, storage and
        # in-place version) and the scales are the same.
        key = (
            tuple(names),
            tuple((id(p), p.data_ptr(), p._version) for p in params),
            tuple(self.scaling[n] for n in names),
        )
        cached = self._stack_cache
        if cached is not None and cached[0] == key:
            return cached[1]
        with torch.no_grad():
            stack = self._build_stack(names)
        self._stack_cache = (key, stack)
        return stack

    def _build_stack(self, names: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        rank = max(self.lora_A[n].shape[0] for n in names)
        a0 = self.lora_A[names[0]]
        b0 = self.effective_B(names[0])
        zero_a = a0.new_zeros((rank, *a0.shape[1:]))
        zero_b = b0.new_zeros((b0.shape[0], rank, *b0.shape[2:]))
        a_list, b_list = [zero_a], [zero_b]
        for n in names:
            a, b = self.lora_A[n], self.effective_B(n) * self.scaling[n]
            pad = rank - a.shape[0]
            if pad:
                a = torch.cat([a, a.new_zeros((pad, *a.shape[1:]))], 0)
                b = torch.cat([b, b.new_zeros((b.shape[0], pad, *b.shape[2:]))], 1)
            a_list.append(a)
            b_list.append(b)
        return torch.stack(a_list), torch.stack(b_list)

    #: a mixed batch with at most this many distinct adapters in a layer is computed group by group
    #: (rows gathered per adapter, two plain matmuls each, one index_add); more adapters use the
    #: padded stack and two batched matmuls. Few groups: no padding, no per-row copies of A and B.
    GROUPED_MAX_ADAPTERS = 4
    #: layer kinds whose update is a plain pair of matmuls on the last axis (groupable)
    _GROUPABLE = ("linear", "conv1d_gpt2")

    def set_rows(self, names: Sequence[str | None]) -> None:
        """Enter a mixed batch: row i adds adapter ``names[i]`` (None or absent here: nothing)."""
        slots = [self.slot_of(n) for n in names]
        self._rows_cache = None
        device = self.weight.device
        self._row_slots = torch.tensor(slots, dtype=torch.long, device=device)
        self._rows_active = any(slots)
        distinct = sorted(set(slots) - {0})
        self._row_groups = None
        if self.kind in self._GROUPABLE and len(distinct) <= self.GROUPED_MAX_ADAPTERS:
            names_here = self.adapter_names
            self._row_groups = [
                (
                    names_here[slot - 1],
                    torch.tensor([i for i, x in enumerate(slots) if x == slot], device=device),
                )
                for slot in distinct
            ]

    def clear_rows(self) -> None:
        """Leave a mixed batch and drop what it cached."""
        self._row_slots = None
        self._rows_active = False
        self._row_groups = None
        self._rows_cache = None  # the stack itself is kept for the next block (same adapters)

    def _grouped_rows(self, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """Mixed batch, few adapters: each adapter's rows gathered, updated by plain matmuls."""
        rows, deltas = [], []
        for name, index in self._row_groups:
            xs = x.index_select(0, index)
            p = self.dropout[name]
            if p > 0.0 and self.training:
                xs = F.dropout(xs, p, True)
            a = self._A[name]
            b = self.effective_B(name) if self.expands_B else self._B[name]
            deltas.append(F.linear(F.linear(xs.to(a.dtype), a), b) * self.scaling[name])
            rows.append(index)
        index = rows[0] if len(rows) == 1 else torch.cat(rows)
        delta = deltas[0] if len(deltas) == 1 else torch.cat(deltas)
        if delta.dtype == out.dtype:
            return out.index_add(0, index, delta)
        # mixed precision: each row's sum formed in the adapter's dtype and rounded once, as the
        # one-adapter path does (every row sits in one group, so the index has no repeats)
        summed = out.index_select(0, index).to(delta.dtype) + delta
        return out.index_copy(0, index, summed.to(out.dtype))

    def _checked_row_slots(self, x: torch.Tensor) -> torch.Tensor:
        """The per-row slots, after checking there is one for every row of the batch.

        A linear layer may also see the batch flattened to (rows × tokens, features), as OPT's
        MLP does; each row's tokens are then taken to follow one another (row-major flattening).
        """
        slots = self._row_slots
        n = slots.shape[0]
        if x.shape[0] != n and not self._flattened_rows(x, n):
            raise AdapterError(
                f"{self._where()}: adapter_per_row was given {n} names but the batch has "
                f"{x.shape[0]} rows"
            )
        return slots

    def _flattened_rows(self, x: torch.Tensor, n: int) -> bool:
        return self.kind in self._GROUPABLE and x.dim() == 2 and x.shape[0] % n == 0

    def _forward_rows(self, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """Mixed batch: each row adds the adapter of its slot (a gathered batched matmul)."""
        slots = self._checked_row_slots(x)
        if not self._rows_active:  # decided in Python when the slots were set: no graph break
            return out
        n = slots.shape[0]
        if x.shape[0] != n:  # (rows × tokens, features): computed as (rows, tokens, features)
            rows_x, rows_out = x.reshape(n, -1, x.shape[-1]), out.reshape(n, -1, out.shape[-1])
            return self._add_rows(rows_x, rows_out, slots).reshape(out.shape)
        return self._add_rows(x, out, slots)

    def _add_rows(self, x: torch.Tensor, out: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
        """``out`` plus each row's update; x and out have one entry per row on their first axis."""
        if self._row_groups is not None:
            return self._grouped_rows(x, out)
        if self.training and any(p > 0 for p in self.dropout.values()):
            # per-row dropout probabilities: drop with each row's own p
            probs = torch.tensor([0.0, *self.dropout.values()], device=x.device)[slots]
            keep = 1.0 - probs.view(-1, *([1] * (x.dim() - 1)))
            mask = torch.rand_like(x, dtype=torch.float32) < keep
            x = x * mask.to(x.dtype) / keep.to(x.dtype)
        a, b = self.stacked()
        if a.requires_grad:  # training: gathered afresh, differentiable
            return self.rows_forward(x, out, a[slots], b[slots])
        # Inference: each row's A and B are gathered afresh on a block's first call and freed
        # after it (a single forward keeps no activation-sized copies alive across layers); from
        # the second call on (generation steps) they are kept until the block ends.
        cached = self._rows_cache
        seen = cached is not None and cached[0] is a  # this block already used this stack
        if seen and cached[1] is not None:
            return self.rows_forward(x, out, cached[1], cached[2])
        picks = a[slots], b[slots]
        self._rows_cache = (a, *picks) if seen else (a, None, None)
        return self.rows_forward(x, out, *picks)

    def rows_forward(
        self, x: torch.Tensor, out: torch.Tensor, a: torch.Tensor, b: torch.Tensor
    ) -> torch.Tensor:
        """``out[i] + B_i A_i x[i]`` per row for linear-like layers; a (N, R, in), b (N, out, R)."""
        n = x.shape[0]
        xs = x.reshape(n, -1, x.shape[-1]).to(a.dtype)  # (N, tokens, in)
        xa = torch.bmm(xs, a.transpose(1, 2))  # (N, tokens, R)
        flat = out.reshape(n, -1, out.shape[-1])
        if flat.dtype == xa.dtype:  # the add fused into the batched GEMM: out is read once
            if _no_autograd(out, a):  # into the base output itself: no new (N, tokens, out)
                return flat.baddbmm_(xa, b.transpose(1, 2)).view(out.shape)
            return torch.baddbmm(flat, xa, b.transpose(1, 2)).view(out.shape)
        delta = torch.bmm(xa, b.transpose(1, 2))  # (N, tokens, out)
        # mixed precision: the sum formed in the adapter's dtype and rounded once into out's
        if _no_autograd(out, a):
            return flat.add_(delta).view(out.shape)
        return (flat + delta).to(out.dtype).view(out.shape)

    # -- merging -------------------------------------------------------------------------------
    def merge(self, name: str | None = None) -> bool:
        """Fold ``s · B A`` of the active adapter (or ``name``) into the weight. Repeat: no-op.

        The delta is computed in float32 and cast to the weight's dtype once. A merge that would
        write a non-finite value raises :class:`MergeError` and leaves the weight unchanged.
        On a quantized weight the merged weight (dequantized base + delta) is held in full
        precision and the quantized original is kept aside: ``unmerge`` restores it exactly.
        Returns whether the weight changed.
        """
        name = name or self.active_adapter
        if name is None:
            return False
        self._require(name)
        if name in self.merged_adapters:
            return False
        if self._row_slots is not None:
            raise MergeError(f"{self._where()}: cannot merge inside adapter_per_row()")
        with torch.no_grad():
            new = self.dense_weight().float() + self.delta_weight(name).to(self.weight.device)
            new = new.to(self.weight.dtype)  # checked as written: float16 can overflow here
            self._check_finite(new, f"merging adapter {name!r}")
            if isinstance(self.weight, QuantizedWeight):
                object.__setattr__(self, "_quantized_base", self.weight)  # not in the state dict
                self.weight = nn.Parameter(new, requires_grad=False)
            else:
                self.weight.copy_(new)
        self.merged_adapters.append(name)
        self._update_route()
        return True

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

    def extra_repr(self) -> str:
        items = ", ".join(f"{n}: r={self.r[n]}" for n in self.adapter_names)
        state = f", merged={self.merged_adapters}" if self.merged_adapters else ""
        return f"adapters=[{items}], active={self.active_adapter!r}{state}"
