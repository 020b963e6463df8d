"""The model-level API in one place: apply, switch, merge, unmerge, unload and disable adapters,
mixed-adapter batches, and walking a model for lorakit's layers.

Each piece lives in its own module and is re-exported here, so ``lorakit.model`` stays the one
import for all of it: ``registry`` (the adapters on a model, walking and counting), ``injection``
(``apply_lora``), ``switching`` (which adapter is added; delete, disable), ``row_batches``
(``adapter_per_row``, ``kept_tokens``) and ``folding`` (merge, unmerge, unload). The adapter math
lives in ``lorakit.layers``.
"""

from __future__ import annotations

from .folding import merge, merge_and_unload, remove_lora, unmerge
from .injection import apply_lora
from .registry import (
    AdapterRegistry,
    adapter_configs,
    adapter_parameters,
    check_adapter_name,
    count_parameters,
    list_adapters,
    lora_layers,
    move_registry,
    print_trainable_parameters,
    registry,
    require_adapter,
    wrapper_modules,
)
from .row_batches import adapter_per_row, kept_tokens
from .switching import active_adapter, delete_adapter, disable_adapters, set_adapter

__all__ = [
    "AdapterRegistry",
    "active_adapter",
    "adapter_configs",
    "adapter_parameters",
    "adapter_per_row",
    "apply_lora",
    "check_adapter_name",
    "count_parameters",
    "delete_adapter",
    "disable_adapters",
    "kept_tokens",
    "list_adapters",
    "lora_layers",
    "merge",
    "merge_and_unload",
    "move_registry",
    "print_trainable_parameters",
    "registry",
    "remove_lora",
    "require_adapter",
    "set_adapter",
    "unmerge",
    "wrapper_modules",
]
