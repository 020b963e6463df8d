"""Merged-model export: base + adapter written as a plain transformers model directory.

The result is what the base's own ``save_pretrained`` writes (safetensors shards, ``config.json``,
``generation_config.json``) plus the tokenizer files, with ``W + s·BA`` folded into every adapted
weight and each ``modules_to_save`` module replaced by its trained copy. It loads with
``from_pretrained`` and no lorakit installed, and runs at the base model's speed.

The merge is computed in float32 (the base is loaded in float32) and cast once to the export
``dtype``. The directory appears atomically: it is written beside the target and renamed into
place (see ``safety``).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..model import merge_and_unload
from ..models import load_model
from . import safety
from .adapter import load_adapter, read_adapter
from .base_models import recorded_dtype


def export_merged(
    base: nn.Module | str | os.PathLike | None,
    adapter: str | os.PathLike,
    out: str | os.PathLike,
    *,
    tokenizer: Any = None,
    dtype: torch.dtype | str | None = None,
    overwrite: bool = False,
    allow_base_mismatch: bool = False,
    max_shard_size: int | str = "2GB",
) -> Path:
    """Write ``base`` with the adapter directory ``adapter`` merged into it to ``out``.

    ``base``: a transformers directory, a ``.gguf`` file, ``None`` or ``"default"`` (the embedded
    model), or a transformers model object, which is changed in place (the adapter is merged into
    it). ``tokenizer``: saved beside the model (a base loaded from a path brings its own).
    ``dtype``: of the exported weights (default: the dtype the base's config records, else
    float32). ``out`` is replaced only with ``overwrite=True``, and only if it holds a model.
    Returns ``out``.
    """
    target = Path(out)
    replace = safety.check_target(target, overwrite, kind="model")
    read_adapter(adapter, tensors=False).lora_config()  # a bad adapter fails before the base loads
    if isinstance(base, nn.Module):
        model = base
        recorded = getattr(getattr(model, "config", None), "dtype", None)
    else:
        recorded = recorded_dtype(base)
        model, loaded_tokenizer = load_model(base, dtype=torch.float32)
        tokenizer = tokenizer if tokenizer is not None else loaded_tokenizer
    model = load_adapter(model, adapter, "export", allow_base_mismatch=allow_base_mismatch)
    model = merge_and_unload(model)
    out_dtype = _dtype(dtype if dtype is not None else recorded)
    if out_dtype is not None:
        model = model.to(out_dtype)
    _drop_gguf_quantizer(model)

    staged = safety.staging_dir(target)
    try:
        model.save_pretrained(staged, max_shard_size=max_shard_size)
        if tokenizer is not None:
            tokenizer.save_pretrained(staged)
        safety.default_modes(staged)
        safety.publish(staged, target, replace)
    finally:
        if staged.exists():
            safety.discard(staged)
    return target


def _dtype(dtype: torch.dtype | str | None) -> torch.dtype | None:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype is None or dtype == "auto":
        return None
    value = getattr(torch, str(dtype).removeprefix("torch."), None)
    if not isinstance(value, torch.dtype) or not value.is_floating_point:
        from ..errors import ConfigError

        raise ConfigError(f"dtype={dtype!r}: expected a floating dtype such as 'bfloat16'")
    return value


def _drop_gguf_quantizer(model: nn.Module) -> None:
    """A model read from a GGUF file holds dequantized float weights but still carries the GGUF
    "quantizer", which makes ``save_pretrained`` refuse; the export is a plain float model."""
    quantizer = getattr(model, "hf_quantizer", None)
    method = getattr(getattr(quantizer, "quantization_config", None), "quant_method", None)
    if quantizer is not None and str(getattr(method, "value", method)) == "gguf":
        model.hf_quantizer = None
        config = getattr(model, "config", None)
        if config is not None and hasattr(config, "quantization_config"):
            del config.quantization_config
