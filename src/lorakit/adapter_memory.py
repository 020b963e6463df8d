"""How much memory adapters need, checked before any is allocated, and allocation failures.

``apply_lora`` refuses up front adapters that need more than their device has in all (physical
RAM for the CPU, the card's memory for CUDA), naming the module that needs the most; an
allocation that still fails on the way is turned into a ``ConfigError`` naming the module, r and
the size it tried to allocate. ``r`` costs ``r · (in + out)`` values per adapted linear layer.
"""

from __future__ import annotations

import math
import os

import torch
from torch import nn

from .config import LoraConfig
from .errors import ConfigError
from .layers import AdapterRecord
from .targeting import Plan, PlanRow


def adapter_dtype_on(weight, wanted: torch.dtype | None) -> torch.dtype:
    """The adapters' dtype on a base weight (float32 on a float16/bfloat16 base by default)."""
    dtype = wanted
    if dtype is None:
        dtype = torch.float32 if weight.dtype in (torch.float16, torch.bfloat16) else weight.dtype
    return dtype if dtype.is_floating_point else torch.float32


def add_adapter(layer: nn.Module, row: PlanRow, config: LoraConfig, name: str, wanted) -> None:
    """``layer.add_adapter`` for a plan row; an allocation that fails is a ConfigError."""
    dtype = adapter_dtype_on(layer.weight, wanted)
    try:
        variant = "dora" if config.use_dora else None
        record = AdapterRecord(row.r, row.alpha, row.scaling, float(config.dropout), variant)
        layer.add_adapter(name, record, config.init, dtype)
    except (RuntimeError, MemoryError) as exc:
        if not isinstance(exc, (MemoryError, torch.OutOfMemoryError)) and not any(
            word in str(exc) for word in ("allocate", "out of memory")
        ):
            raise
        shape_a, shape_b = layer.adapter_shapes(row.r)
        size = (math.prod(shape_a) + math.prod(shape_b)) * dtype.itemsize
        reason = str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__
        kind = str(dtype).removeprefix("torch.")
        raise ConfigError(
            f"{row.path or '(root)'}: cannot allocate adapter {name!r} with r={row.r:,}: "
            f"lora_A {tuple(shape_a)} and lora_B {tuple(shape_b)} in {kind} "
            f"need {human_bytes(size)} on {layer.weight.device} "
            f"({reason}); lower r or rank_pattern, or target fewer modules"
        ) from exc


def memory_of(device: torch.device) -> int | None:
    """Bytes of memory a device has in all (None when unknown): physical RAM for the CPU."""
    try:
        if device.type == "cpu":
            return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        if device.type == "cuda":
            return torch.cuda.get_device_properties(device).total_memory
    except (ValueError, OSError, AttributeError, RuntimeError):
        pass
    return None


def check_memory(model: nn.Module, the_plan: Plan, adapter_dtype: torch.dtype | None) -> None:
    """Refuse, before anything changes, adapters that need more than the device has in all."""
    need: dict[torch.device, list] = {}  # device -> [(bytes, row)]
    for row in the_plan.rows:
        weight = (model.get_submodule(row.path) if row.path else model).weight
        size = row.params * adapter_dtype_on(weight, adapter_dtype).itemsize
        need.setdefault(weight.device, []).append((size, row))
    for device, sizes in need.items():
        total, memory = sum(s for s, _ in sizes), memory_of(device)
        if memory is None or total <= memory:
            continue
        size, row = max(sizes, key=lambda item: item[0])
        raise ConfigError(
            f"the adapters need {human_bytes(total)} on {device}, "
            f"which has {human_bytes(memory)} in all: "
            f"{row.path or '(root)'} alone needs {human_bytes(size)} with r={row.r:,} "
            f"({row.params:,} parameters); lower r or rank_pattern, or target fewer modules"
        )


def human_bytes(n: int) -> str:
    """``768.0 GB``: decimal units, as allocators and disk tools print sizes."""
    units = (("EB", 10**18), ("PB", 10**15), ("TB", 10**12), ("GB", 10**9), ("MB", 10**6))
    for unit, scale in (*units, ("kB", 10**3)):
        if n >= scale:
            return f"{n / scale:,.1f} {unit}"
    return f"{n} bytes"
