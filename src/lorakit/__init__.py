"""lorakit: LoRA and QLoRA fine-tuning for PyTorch and transformers models.

Importing lorakit imports torch only; transformers, peft and bitsandbytes are loaded lazily by the
functions that need them.
"""

from ._version import __version__
from .combine import combine
from .config import LoraConfig
from .errors import (
    AdapterError,
    AdapterFileError,
    ConfigError,
    LorakitError,
    MergeError,
    QuantError,
    TargetError,
)
from .io import (
    export_gguf,
    export_merged,
    hotswap_adapter,
    inspect_adapter,
    load_adapter,
    merge_shards,
    merge_state_dict,
    merged_state_dict,
    pad_adapter_rank,
    save_adapter,
)
from .model import (
    active_adapter,
    adapter_configs,
    adapter_parameters,
    adapter_per_row,
    apply_lora,
    count_parameters,
    delete_adapter,
    disable_adapters,
    list_adapters,
    lora_layers,
    merge,
    merge_and_unload,
    print_trainable_parameters,
    remove_lora,
    set_adapter,
    unmerge,
)
from .quant import quantize
from .targeting import Plan, PlanRow, parameter_line, plan

__all__ = [
    "AdapterError",
    "AdapterFileError",
    "ConfigError",
    "LoraConfig",
    "LorakitError",
    "MergeError",
    "Plan",
    "PlanRow",
    "QuantError",
    "TargetError",
    "__version__",
    "active_adapter",
    "adapter_configs",
    "adapter_parameters",
    "adapter_per_row",
    "apply_lora",
    "combine",
    "count_parameters",
    "delete_adapter",
    "disable_adapters",
    "export_gguf",
    "export_merged",
    "hotswap_adapter",
    "inspect_adapter",
    "list_adapters",
    "load_adapter",
    "lora_layers",
    "merge",
    "merge_and_unload",
    "merge_shards",
    "merge_state_dict",
    "merged_state_dict",
    "pad_adapter_rank",
    "parameter_line",
    "plan",
    "print_trainable_parameters",
    "quantize",
    "remove_lora",
    "save_adapter",
    "set_adapter",
    "unmerge",
]
