"""Which adapter a model adds: switch (``set_adapter``), ask (``active_adapter``), delete one,
or turn them all off for a block (``disable_adapters``)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from torch import nn

from .base_change import check_restorable
from .errors import MergeError
from .layers import init as base_init
from .registry import (
    REGISTRY_ATTR,
    lora_layers,
    move_registry,
    registry,
    replace_module,
    require_adapter,
    wrapper_modules,
)


def set_adapter(model: nn.Module, adapter_name: str | None) -> None:
    """Make ``adapter_name`` the adapter every layer adds (None: none, the base alone)."""
    if adapter_name is not None:
        require_adapter(model, adapter_name)
    # Every layer is checked before any switches, so a refusal leaves the model as it was.
    merged = [
        f"{path} ({', '.join(layer.merged_adapters)})"
        for path, layer in lora_layers(model)
        if layer.merged_adapters and adapter_name not in (None, *layer.merged_adapters)
    ]
    if merged:
        raise MergeError(
            f"cannot switch to {adapter_name!r} while adapters are merged into "
            f"{', '.join(merged[:3])}{', ...' if len(merged) > 3 else ''}; call unmerge first"
        )
    for _, module in wrapper_modules(model):
        module.set_adapter(adapter_name)


def active_adapter(model: nn.Module) -> str | None:
    """The adapter forward adds, or None."""
    for _, module in wrapper_modules(model):
        if module.active_adapter is not None:
            return module.active_adapter
    return None


def delete_adapter(model: nn.Module, adapter_name: str) -> nn.Module:
    """Remove an adapter and free its parameters; layers left with no adapter become plain again.

    An adapter whose init rewrote the base (PiSSA, OLoRA) gives the original weight back,
    W_res + s B₀ A₀ (exact to float rounding); one that left a quantized residual (QPiSSA,
    LoftQ) cannot, and is refused (``merge_and_unload`` gives the trained model instead).
    """
    adapters = registry(model)
    adapters.require(adapter_name)
    check_restorable(model, [adapter_name], "delete_adapter")
    root = model
    for path, module in list(wrapper_modules(model)):
        if adapter_name in module.adapter_names:
            if base_init.base_change(module, adapter_name) is not None:
                if adapter_name in module.merged_adapters:
                    raise MergeError(f"{path}: adapter {adapter_name!r} is merged; unmerge first")
                base_init.restore(module, adapter_name)
            module.delete_adapter(adapter_name)
        if not module.adapter_names:
            if not path:
                root = module.unload()
                continue
            replace_module(model, path, module.unload())
    adapters.remove(adapter_name)
    if adapters.configs:
        move_registry(model, root)
    else:
        model.__dict__.pop(REGISTRY_ATTR, None)
    return root


@contextlib.contextmanager
def disable_adapters(model: nn.Module) -> Iterator[nn.Module]:
    """Within the block the model computes exactly the base output (no adapter, original heads).

    Refuses while an adapter is merged into the weights (the base output would need an unmerge,
    which changes weights: call ``unmerge`` first).
    """
    merged = [p for p, layer in lora_layers(model) if layer.merged_adapters]
    if merged:
        raise MergeError(
            f"cannot disable adapters while merged into {len(merged)} module(s) "
            f"({', '.join(merged[:3])}{', ...' if len(merged) > 3 else ''}); call unmerge first"
        )
    modules = [m for _, m in wrapper_modules(model)]
    before = [m.disabled for m in modules]
    try:
        for m in modules:
            m.set_disabled(True)
        yield model
    finally:
        for m, state in zip(modules, before, strict=True):
            m.set_disabled(state)
