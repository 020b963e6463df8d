"""The adapters on a model: their names and configs (``AdapterRegistry``, kept on the adapted
model), and walking a model for lorakit's own layers, found by type, never by a substring of a
parameter name; parameter counts."""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator

from torch import nn

from . import layers as L
from .config import LoraConfig
from .errors import AdapterError
from .quant import quantized_weights
from .targeting import parameter_line

_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_\-]{0,99}")
REGISTRY_ATTR = "lorakit_registry"  # attribute on the adapted model: its AdapterRegistry


def check_adapter_name(name: object) -> str:
    """Adapter names are also directory and state-dict key parts: letters, digits, ``_``, ``-``."""
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise AdapterError(
            f"adapter name {name!r} is not allowed: use 1-100 letters, digits, '_' or '-' "
            "(no dots, slashes or spaces), not starting with '-'"
        )
    if hasattr(nn.ParameterDict, name) or name in nn.Module().__dict__:
        raise AdapterError(
            f"adapter name {name!r} is reserved: it is an attribute of torch.nn.Module "
            "(adapters are stored as module parameters); choose another name"
        )
    return name


class AdapterRegistry:
    """The adapters on one model: their configs by name, in the order they were added, and the
    slot table its layers share for mixed batches (``layers/rows.py``).

    One per adapted model, kept on it as ``lorakit_registry``; every change of which adapters a
    model has goes through it (apply, load, combine, delete, unload), and a failed change rolls
    back through ``transaction``.
    """

    def __init__(self) -> None:
        self.configs: dict[str, LoraConfig] = {}
        self.table = L.SlotTable()
        self.merged: list[str] = []  # paths of layers with a merged adapter (model.merge)

    def require(self, name: str, doing: str = "") -> LoraConfig:
        """The config of adapter ``name``, or the one "no adapter named ..." error."""
        if name not in self.configs:
            known = ", ".join(self.configs) or "none"
            what = f" to {doing}" if doing else ""
            raise AdapterError(f"no adapter named {name!r}{what} (adapters: {known})")
        return self.configs[name]

    def set(self, name: str, config: LoraConfig) -> None:
        """Add adapter ``name`` (at the end) or give it a new config (in place)."""
        self.configs[name] = config
        self.table.renumber(list(self.configs))

    def remove(self, name: str) -> None:
        del self.configs[name]
        self.table.renumber(list(self.configs))

    @contextlib.contextmanager
    def transaction(self) -> Iterator[AdapterRegistry]:
        """Within the block, changes are undone if it raises."""
        before = dict(self.configs)
        try:
            yield self
        except BaseException:
            self.configs = before
            self.table.renumber(list(before))
            raise


def registry(model: nn.Module, create: bool = False) -> AdapterRegistry:
    """The model's adapter registry (an empty one, not attached, when it has none and ``create``
    is false; attached to the model when ``create``)."""
    found = model.__dict__.get(REGISTRY_ATTR)
    if found is None:
        found = AdapterRegistry()
        if create:
            model.__dict__[REGISTRY_ATTR] = found
    return found


def move_registry(old: nn.Module, new: nn.Module) -> None:
    """The model object changed (its root was wrapped or unwrapped): the registry goes along."""
    if old is not new and REGISTRY_ATTR in old.__dict__:
        new.__dict__[REGISTRY_ATTR] = old.__dict__.pop(REGISTRY_ATTR)


def require_adapter(model: nn.Module, name: str, doing: str = "") -> LoraConfig:
    """The config of adapter ``name`` on ``model``, or an AdapterError listing the adapters."""
    return registry(model).require(name, doing)


def adapter_configs(model: nn.Module) -> dict[str, LoraConfig]:
    """The configs of the adapters on a model, by name, in the order they were added."""
    return dict(registry(model).configs)


def list_adapters(model: nn.Module) -> list[str]:
    return list(registry(model).configs)


def lora_layers(model: nn.Module) -> Iterator[tuple[str, L.LoraLayer]]:
    """(path, layer) for every LoRA layer in the model."""
    for path, module in model.named_modules():
        if isinstance(module, L.LoraLayer):
            yield path, module


def wrapper_modules(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """(path, module) for every LoRA layer and saved module (``modules_to_save``) in the model."""
    for path, module in model.named_modules():
        if isinstance(module, (L.LoraLayer, L.SavedModule)):
            yield path, module


def adapter_parameters(model: nn.Module, adapter_name: str | None = None) -> Iterator[nn.Parameter]:
    """The parameters that belong to adapters (all, or one adapter's): A, B and saved copies."""
    for _, module in wrapper_modules(model):
        names = module.adapter_names if adapter_name is None else [adapter_name]
        for n in names:
            if n in module.adapter_names:
                yield from module.adapter_tensors(n)


def replace_module(model: nn.Module, path: str, new: nn.Module) -> None:
    parent_path, _, child = path.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    setattr(parent, child, new)


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameters, each shared tensor counted once.

    A quantized weight counts as the elements it stands for (frozen), not the frozen parameters
    its codes and scales are stored in.
    """
    seen = {id(p) for _, w in quantized_weights(model) for p in w.parameters()}
    trainable = 0
    total = sum(w.numel() for _, w in quantized_weights(model))
    for p in model.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        total += p.numel()
        if p.requires_grad:
            trainable += p.numel()
    return trainable, total


def print_trainable_parameters(model: nn.Module) -> str:
    """Print and return ``trainable 65,536 / 16,842,752 (0.39%)``."""
    line = parameter_line(*count_parameters(model))
    print(line)
    return line
