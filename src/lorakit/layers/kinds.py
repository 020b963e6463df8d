"""Layer kinds, registered by class: which base modules each LoRA layer class adapts.

Each kind is a ``LoraLayer`` subclass that says, as class methods, whether it adapts a base module
(``accepts``: True, False, or the reason it cannot although the module is of its kind), the base
module's shape (``base_shape``) and how many parameters an adapter adds (``count_params``).
Registering the class (``@register``) is all a new kind needs here; ``targeting.py`` plans with
it, ``model.py`` wraps with it. Kinds are tried in the order they were registered.
"""

from __future__ import annotations

from torch import nn

from .base import LoraLayer

KINDS: dict[str, type[LoraLayer]] = {}


def register(cls: type[LoraLayer]) -> type[LoraLayer]:
    """Class decorator: make ``cls`` a layer kind, under ``cls.kind``."""
    if not cls.kind or cls.kind in KINDS:
        raise ValueError(f"{cls.__name__}: layer kind {cls.kind!r} is empty or taken")
    KINDS[cls.kind] = cls
    return cls


def kind_class(kind: str) -> type[LoraLayer]:
    return KINDS[kind]


def kind_of(module: nn.Module) -> tuple[str | None, str]:
    """(kind, reason): the LoRA kind for a base module, or None and why it cannot be adapted."""
    if isinstance(module, LoraLayer):
        return module.kind, ""
    for cls in KINDS.values():
        verdict = cls.accepts(module)
        if verdict is True:
            return cls.kind, ""
        if isinstance(verdict, str):
            return None, verdict
    adaptable = ", ".join(cls.describes for cls in KINDS.values())
    return None, f"{type(module).__name__} is not a layer kind lorakit adapts ({adaptable})"


def shape_of(module: nn.Module, kind: str) -> tuple[int, int, str]:
    """(in, out, shape text) of a base module of a given kind; works on the meta device."""
    return KINDS[kind].base_shape(module)


def adapter_params(kind: str, in_f: int, out_f: int, r: int, module: nn.Module, slices) -> int:
    """Parameters one adapter of rank r adds to a module of this kind."""
    return KINDS[kind].count_params(module, in_f, out_f, r, slices)


def wrap(module: nn.Module, kind: str, slices=None, *, path: str = "", table=None) -> LoraLayer:
    """A new LoRA layer of the given kind around ``module`` (which gives up its tensors to it),
    at ``path`` in its model, sharing the model's slot ``table`` (``layers/rows.py``)."""
    layer = KINDS[kind].around(module, slices)
    layer._path = path
    layer.table = table
    return layer
