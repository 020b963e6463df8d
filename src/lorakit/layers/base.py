"""``LoraLayer``: the one way a layer holds its adapters.

A LoRA layer replaces a base layer (``nn.Linear``, ``nn.Embedding``, ...) in the model. It owns the
base ``weight`` and ``bias`` under their original names, so the base model's state-dict keys do not
change, and holds any number of adapters beside them:

    lora_A[name]   (r, in)    starts random (kaiming-uniform or gaussian)
    lora_B[name]   (out, r)   starts at zero, so the adapted layer starts equal to the base
    records[name]  AdapterRecord: rank, alpha, scale s, dropout (and a variant to come)
    h = base(x) + s · B A x   with s = alpha / r   (LoRA paper, section 4.1)

One code path serves every use:

* one active adapter: ``forward`` looks up one name, precomputed when the adapter is switched, and
  adds its low-rank update (two small matmuls, the add fused into the second);
* a batch whose rows use different adapters: a row plan (``layers/rows.py``) read by every layer;
* several adapters trained at once: the same mixed-batch path, each adapter receiving gradient only
  from its own rows.

Subclasses say how the base computes (``base_forward``), how an input reaches rank ``r``
(``lora_forward``) and how ``B A`` maps onto the base weight's layout (``delta_weight``); as a
kind (``layers/kinds.py``) they say which base modules they adapt. Whatever changes an adapter's
shape or scale is a method here (``pad_rank``, ``fit_tensor``), so no other module writes a
layer's fields. Merging is an explicit call and safe to repeat; ``train()``/``eval()``/
``forward()`` never change weights.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import AdapterError, MergeError
from ..quant import QuantizedWeight
from ..quant.weight import hand_over_packed
from .dora import DORA, Dora
from .merging import Merging
from .record import AdapterRecord, pad_rank
from .rows import MixedRows, SlotTable, active_plan


class LoraLayer(Merging, MixedRows, Dora, nn.Module):
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
        self.records: dict[str, AdapterRecord] = {}
        self.active_adapter: str | None = None
        self.merged_adapters: list[str] = []
        self.disabled = False
        # What forward adds: the name of one adapter, or None for the base alone. Derived from
        # active/merged/disabled by _update_route(), so forward pays one attribute read.
        self._route: str | None = None
        # The model's slot table (layers/rows.py), shared by its layers; set by the model.
        self.table: SlotTable | None = None
        # The stack of all adapters for mixed batches, kept while no adapter tensor changes.
        self._stack_cache: tuple | None = None
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

    # -- what a kind says about its base modules (layers/kinds.py) -----------------------------
    #: the base modules this kind adapts, in words, for error messages
    describes: str = ""
    #: the keys of A and B under the module's path in PEFT's files
    peft_keys: tuple[str, str] = ("lora_A.weight", "lora_B.weight")
    #: whether the base weight is stored (in, out), PEFT's ``fan_in_fan_out``
    fan_in_fan_out: bool = False

    @classmethod
    def accepts(cls, module: nn.Module) -> bool | str:
        """True if this kind adapts ``module``; False if it is not of this kind; else the reason
        it cannot be adapted although it is."""
        return False  # pragma: no cover - every kind defines it

    @staticmethod
    def base_shape(module: nn.Module) -> tuple[int, int, str]:
        """(in, out, shape text) of a base module of this kind; works on the meta device."""
        w = module.weight
        return w.shape[1], w.shape[0], f"{w.shape[1]}->{w.shape[0]}"

    @classmethod
    def count_params(cls, module: nn.Module, in_f: int, out_f: int, r: int, slices) -> int:
        """Parameters one adapter of rank r adds to ``module``."""
        return r * (in_f + out_f)

    @classmethod
    def around(cls, module: nn.Module, slices=None) -> LoraLayer:
        """A new layer of this kind around ``module`` (which gives up its tensors to it)."""
        return cls(module)

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
        return self._B[name]

    def compact_B(self, full: torch.Tensor, r: int) -> torch.Tensor:
        """The inverse of ``effective_B`` for a B of rank ``r`` (a plain layer: unchanged)."""
        return full

    def init_adapter(self, a: torch.Tensor, b: torch.Tensor, init: str, r: int) -> None:
        """A random, B zero (LoRA paper 4.1; kaiming-uniform with a=sqrt(5) as PEFT does)."""
        if init == "gaussian":
            nn.init.normal_(a, std=1.0 / r)
        else:
            nn.init.kaiming_uniform_(a, a=math.sqrt(5))
        nn.init.zeros_(b)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        hand_over_packed(self, state_dict, prefix)  # a quantized weight's codes sit at "weight"
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    # -- adapters ------------------------------------------------------------------------------
    @property
    def adapter_names(self) -> list[str]:
        return list(self.records)

    def record(self, name: str) -> AdapterRecord:
        self._require(name)
        return self.records[name]

    def adapter_tensors(self, name: str) -> list[nn.Parameter]:
        """The tensors adapter ``name`` trains in this layer: A and B (and DoRA's magnitude)."""
        self._require(name)
        m = self._M.get(name)
        return [self._A[name], self._B[name]] + ([] if m is None else [m])

    def add_adapter(
        self,
        name: str,
        record: AdapterRecord,
        init: str = "kaiming",
        dtype: torch.dtype | None = None,
    ) -> None:
        if name in self.records:
            raise AdapterError(f"{self._where()}: adapter {name!r} already exists")
        if record.variant == DORA and self.dora_problem():
            raise AdapterError(self.dora_problem())
        if record.variant not in (None, DORA):
            raise AdapterError(f"{self._where()}: unknown LoRA variant {record.variant!r}")
        dtype = dtype or self.weight.dtype
        if not dtype.is_floating_point:
            dtype = torch.float32
        shape_a, shape_b = self.adapter_shapes(record.rank)
        device = self.weight.device
        a = nn.Parameter(torch.empty(shape_a, device=device, dtype=dtype))
        b = nn.Parameter(torch.empty(shape_b, device=device, dtype=dtype))
        if device.type != "meta":
            with torch.no_grad():
                self.init_adapter(a, b, init, record.rank)
        self.lora_A[name] = a
        self.lora_B[name] = b
        self.records[name] = record
        if record.variant == DORA:
            self.add_magnitude(name, dtype)

    def delete_adapter(self, name: str) -> None:
        self._require(name)
        if name in self.merged_adapters:
            raise MergeError(f"{self._where()}: adapter {name!r} is merged; unmerge it first")
        del self.lora_A[name], self.lora_B[name], self.records[name]
        self.drop_magnitude(name)
        self._stack_cache = None
        if self.active_adapter == name:
            self.active_adapter = None
        self._update_route()

    def pad_rank(self, name: str, rank: int, alpha: float) -> bool:
        """Zero-pad adapter ``name`` to rank ``rank`` with ``alpha`` restated; exact.

        ``A`` gets zero rows and ``B`` zero columns, so ``B A`` does not change; the scale is
        kept. The padded A and B are new Parameters. Returns whether anything changed.
        """
        record = self.record(name)
        if record.rank == rank:
            return False
        a, b = self._A[name], self._B[name]
        blocks = a.shape[0] // record.rank  # fused slices: one rank-r block per adapted slice
        with torch.no_grad():
            new_a = pad_rank(a.detach(), 0, blocks, rank)
            new_b = pad_rank(b.detach(), 1, 1, rank)
        self.lora_A[name] = nn.Parameter(new_a, requires_grad=a.requires_grad)
        self.lora_B[name] = nn.Parameter(new_b, requires_grad=b.requires_grad)
        self.records[name] = record.replace(rank=rank, alpha=alpha)
        return True

    def fit_tensor(
        self, name: str, role: str, value: torch.Tensor, rank: int, scale: float
    ) -> torch.Tensor:
        """A file's ``lora_A``/``lora_B`` of rank ``rank`` and scale ``scale`` in the layout of
        adapter ``name`` here: its rank zero-padded, and ``B`` times ``scale / s`` so this
        adapter's own scale gives the file's update (hot swapping into a compiled model)."""
        record = self.record(name)
        blocks = self._A[name].shape[0] // record.rank
        if role == "lora_A":
            return pad_rank(value, 0, blocks, record.rank)
        value = pad_rank(self.compact_B(value, rank), 1, 1, record.rank)
        if scale == record.scale:
            return value
        wide = torch.promote_types(value.dtype, torch.float32)  # the product in float32 at least
        return value.to(wide) * (scale / record.scale)

    def set_adapter(self, name: str | None) -> None:
        """Make ``name`` the adapter forward adds (None: none). A layer without it adds none."""
        if self.merged_adapters and name not in (None, *self.merged_adapters):
            raise MergeError(
                f"{self._where()}: adapter(s) {self.merged_adapters} are merged into the weight; "
                f"unmerge before switching to {name!r}"
            )
        self.active_adapter = name if name in self.records else None
        self._update_route()

    def set_disabled(self, disabled: bool) -> None:
        """While disabled the layer computes the base alone."""
        self.disabled = bool(disabled)
        self._update_route()

    def _update_route(self) -> None:
        name = self.active_adapter
        if self.disabled or name is None or name in self.merged_adapters:
            self._route = None
        else:
            self._route = name

    def _require(self, name: str) -> None:
        if name not in self.records:
            known = ", ".join(self.adapter_names) or "none"
            raise AdapterError(f"{self._where()}: no adapter {name!r} (adapters here: {known})")

    def _where(self) -> str:
        return getattr(self, "_path", None) or type(self).__name__

    # -- forward -------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base_forward(x)
        plan = active_plan(self.table)
        if plan is not None:
            return self.forward_rows(x, out, plan)
        name = self._route
        if name is None:
            return out
        # Plain dict reads: the ParameterDicts' own storage (see _A), not __getattr__ chains.
        a = self._A[name]
        b = self.effective_B(name) if self.expands_B else self._B[name]
        record = self.records[name]
        dropped = x
        if record.dropout > 0.0 and self.training:
            dropped = F.dropout(x, record.dropout, True)
        if record.variant is not None:  # DoRA (layers/dora.py)
            return self.dora_forward(x, out, name, dropped)
        return self.lora_forward(dropped, out, a, b, record.scale)

    def extra_repr(self) -> str:
        items = ", ".join(f"{n}: r={r.rank}" for n, r in self.records.items())
        state = f", merged={self.merged_adapters}" if self.merged_adapters else ""
        return f"adapters=[{items}], active={self.active_adapter!r}{state}"
