"""``SavedModule``: a module trained fully beside the adapters (PEFT's ``modules_to_save``).

A classifier head on a new task must train in full. The original module is kept, frozen, and each
adapter gets its own trainable copy, so switching or disabling adapters switches the head too.
State-dict keys follow PEFT: ``<path>.original_module.*`` and
``<path>.modules_to_save.<adapter>.*``.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from ..errors import AdapterError
from .rows import SlotTable, active_plan


class SavedModule(nn.Module):
    def __init__(self, original: nn.Module, table: SlotTable | None = None) -> None:
        super().__init__()
        self.original_module = original
        self.modules_to_save = nn.ModuleDict()
        self.active_adapter: str | None = None
        self.disabled = False
        self._route: str | None = None
        self.table = table  # the model's slot table (layers/rows.py)

    @property
    def adapter_names(self) -> list[str]:
        return list(self.modules_to_save.keys())

    def adapter_tensors(self, name: str) -> list[nn.Parameter]:
        """The tensors adapter ``name`` trains here: every floating-point parameter of its copy
        (a quantized weight's codes and scales, uint8, stay frozen)."""
        if name not in self.modules_to_save:
            raise AdapterError(f"{type(self.original_module).__name__}: no adapter {name!r}")
        return [p for p in self.modules_to_save[name].parameters() if p.is_floating_point()]

    def add_adapter(self, name: str) -> None:
        if name in self.modules_to_save:
            raise AdapterError(f"{type(self.original_module).__name__}: {name!r} already exists")
        trained = copy.deepcopy(self.original_module)
        for p in trained.parameters():
            if p.is_floating_point():
                p.requires_grad_(True)
        self.modules_to_save[name] = trained

    def delete_adapter(self, name: str) -> None:
        del self.modules_to_save[name]
        if self.active_adapter == name:
            self.active_adapter = None
        self._update_route()

    def set_adapter(self, name: str | None) -> None:
        self.active_adapter = name if name in self.modules_to_save else None
        self._update_route()

    def set_disabled(self, disabled: bool) -> None:
        self.disabled = bool(disabled)
        self._update_route()

    def _update_route(self) -> None:
        self._route = None if self.disabled else self.active_adapter

    def unload(self) -> nn.Module:
        """The module kept after a merge: the active adapter's trained copy, else the original."""
        name = self.active_adapter
        return self.modules_to_save[name] if name is not None else self.original_module

    def forward(self, *args, **kwargs):
        plan = active_plan(self.table)
        if plan is not None:
            x = args[0] if args else next(iter(kwargs.values()), None)
            if isinstance(x, torch.Tensor):
                plan = plan.for_input(x)  # an output head that sees only the kept tokens
            return self._forward_rows(plan.names, *args, **kwargs)
        name = self._route
        module = self.original_module if name is None else self.modules_to_save[name]
        return module(*args, **kwargs)

    def _forward_rows(self, row_names, *args, **kwargs):
        """Mixed batch: run each distinct module once and keep each row's own output."""
        names = [n if n in self.modules_to_save and not self.disabled else None for n in row_names]
        out = self.original_module(*args, **kwargs)
        if not isinstance(out, torch.Tensor):
            raise AdapterError(
                f"{type(self.original_module).__name__}: a saved module in a mixed-adapter batch "
                "must return one tensor"
            )
        if out.dim() == 0 or out.shape[0] != len(names):
            raise AdapterError(
                f"{type(self.original_module).__name__}: a saved module in a mixed-adapter batch "
                f"needs one entry per row ({len(names)}) on its output's first axis, got shape "
                f"{tuple(out.shape)}"
            )
        result = out.clone()
        for name in dict.fromkeys(n for n in names if n is not None):
            rows = torch.tensor([i for i, n in enumerate(names) if n == name], device=out.device)
            result[rows] = self.modules_to_save[name](*args, **kwargs)[rows]
        return result
