"""transformers' adapter methods on a model lorakit adapted, answered by lorakit.

A transformers model carries PEFT's adapter methods (``PeftAdapterMixin``: ``set_adapter``,
``active_adapters``, ``load_adapter``, ...), which look for PEFT's layers and know nothing of
lorakit's: on a lorakit-adapted model ``model.set_adapter("b")`` said "No adapter loaded", and
``model.save_pretrained(dir)`` wrote the whole model (base and adapters) as ``model.safetensors``,
which ``from_pretrained`` then read as the bare base, dropping the adapter keys with a warning.

``apply_lora`` therefore gives a transformers model its own versions of these methods (set on the
instance, so the model's class and every other model are untouched):

===========================  ==============================================================
``model.save_pretrained(d)``  the adapters in PEFT's layout (``integrations.adapter_dirs``): what
                              ``PeftModel.save_pretrained`` writes, read back by
                              ``lorakit.load_adapter``, ``model.load_adapter`` and PEFT
``model.set_adapter(name)``   ``lorakit.set_adapter(model, name)``
``model.active_adapters()``   ``[lorakit.active_adapter(model)]`` (``[]`` when none is active)
``model.delete_adapter(n)``   ``lorakit.delete_adapter(model, n)`` for each name
the others                    an ``AdapterError`` naming the lorakit call that does it
===========================  ==============================================================

Once the model has no lorakit adapter left (``merge_and_unload``, ``remove_lora``), each method
is transformers' own again: ``save_pretrained`` then writes the whole (merged) model.
"""

from __future__ import annotations

import functools
import sys
from typing import Any

from torch import nn

from ..errors import AdapterError, AdapterFileError
from ..model import active_adapter, delete_adapter, list_adapters, set_adapter


def is_transformers_model(model: nn.Module) -> bool:
    """Whether ``model`` has transformers' adapter methods (checked without importing it)."""
    peft_mixin = getattr(
        sys.modules.get("transformers.integrations.peft"), "PeftAdapterMixin", None
    )
    return peft_mixin is not None and isinstance(model, peft_mixin)


def install(model: nn.Module) -> None:
    """Give a transformers model lorakit's versions of its adapter methods (no-op otherwise)."""
    if not is_transformers_model(model):
        return
    for name, method in _METHODS.items():
        model.__dict__[name] = functools.partial(_dispatch, model, name, method)


def _dispatch(model: nn.Module, name: str, method, *args: Any, **kwargs: Any) -> Any:
    if not list_adapters(model):  # no lorakit adapter (any more): transformers' own method
        return getattr(type(model), name)(model, *args, **kwargs)
    return method(model, *args, **kwargs)


def _save_pretrained(
    model: nn.Module,
    save_directory: Any,
    *args: Any,
    is_main_process: bool = True,
    push_to_hub: bool = False,
    **kwargs: Any,
) -> None:
    """Write the adapters (not the base) in PEFT's layout. The adapters are read from the model's
    layers; a ``state_dict`` (the Trainer passes one under DeepSpeed or FSDP) is not consulted,
    and other options of transformers' ``save_pretrained`` do not apply to adapter files."""
    from .adapter_dirs import write_adapters

    if push_to_hub:
        raise AdapterFileError(
            "save_pretrained(push_to_hub=True): lorakit writes adapters locally only; save to a "
            "directory and upload it with huggingface_hub's upload_folder"
        )
    if is_main_process:
        write_adapters(model, save_directory)


def _set_adapter(model: nn.Module, adapter_name: str | list[str]) -> None:
    if isinstance(adapter_name, (list, tuple)):
        if len(adapter_name) != 1:
            raise AdapterError(
                f"set_adapter({list(adapter_name)!r}): lorakit makes one adapter active at a "
                "time; lorakit.adapter_per_row(model, names) gives each row of a batch its own, "
                "and lorakit.combine(model, names, ...) makes one adapter of several"
            )
        adapter_name = adapter_name[0]
    set_adapter(model, adapter_name)


def _active_adapters(model: nn.Module) -> list[str]:
    active = active_adapter(model)
    return [] if active is None else [active]


def _delete_adapter(model: nn.Module, adapter_names: str | list[str]) -> None:
    names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
    for name in names:
        delete_adapter(model, name)


class _Refuse:
    """transformers' method ``call``, refused in favour of ``lorakit_call`` (a class, not a
    closure, so that a model carrying it still pickles)."""

    def __init__(self, call: str, lorakit_call: str) -> None:
        self.call, self.lorakit_call = call, lorakit_call

    def __call__(self, model: nn.Module, *args: Any, **kwargs: Any) -> None:
        raise AdapterError(
            f"model.{self.call} is transformers' method for PEFT adapters; this model carries "
            f"lorakit adapters ({', '.join(list_adapters(model))}): use {self.lorakit_call}"
        )


_METHODS = {
    "save_pretrained": _save_pretrained,
    "set_adapter": _set_adapter,
    "active_adapters": _active_adapters,
    "delete_adapter": _delete_adapter,
    "load_adapter": _Refuse("load_adapter", "lorakit.load_adapter(model, directory, adapter_name)"),
    "add_adapter": _Refuse("add_adapter", "lorakit.apply_lora(model, config, adapter_name)"),
    "disable_adapters": _Refuse(
        "disable_adapters", "`with lorakit.disable_adapters(model):` (the base alone inside)"
    ),
    "enable_adapters": _Refuse(
        "enable_adapters", "`with lorakit.disable_adapters(model):`, which enables them on exit"
    ),
    "get_adapter_state_dict": _Refuse(
        "get_adapter_state_dict",
        "lorakit.save_adapter(model, directory, adapter_name), or "
        "lorakit.adapter_parameters(model, adapter_name) for the tensors",
    ),
    "enable_peft_hotswap": _Refuse(
        "enable_peft_hotswap", "lorakit.pad_adapter_rank and lorakit.hotswap_adapter"
    ),
}
