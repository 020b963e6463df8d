"""A ``peft.LoraConfig`` object as lorakit's ``LoraConfig``.

Code written for PEFT builds its adapter as ``LoraConfig(r=16, lora_alpha=32, target_modules=...,
task_type="CAUSAL_LM")`` with PEFT's class; ``apply_lora`` takes that object too. It is read
through the same path as PEFT's ``adapter_config.json`` (``LoraConfig.from_peft_dict``): every
field lorakit computes is converted, PEFT features lorakit lacks (QA-LoRA, EVA, aLoRA, ...) are an
error naming the field, and nothing is dropped silently. Two things PEFT decides from the model
when it injects, and not in the config, are decided here the same way:

* ``target_modules=None``: PEFT's per-architecture default (``q_proj`` and ``v_proj`` for Llama,
  ``c_attn`` for GPT-2, from ``peft.utils.TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING``
  by the model's ``config.model_type``);
* ``task_type="SEQ_CLS"`` / ``"TOKEN_CLS"``: the classification head the model has
  (``classifier`` or ``score``) is trained fully beside the adapter (``modules_to_save``).

peft is never imported here unless such an object is handed in (it is then already imported).
"""

from __future__ import annotations

from typing import Any

from torch import nn

from ..config import LoraConfig
from ..errors import ConfigError
from ..targeting import suffix_match


def is_peft_config(config: Any) -> bool:
    """Whether ``config`` is one of PEFT's config objects (checked without importing peft)."""
    return type(config).__module__.partition(".")[0] == "peft" and callable(
        getattr(config, "to_dict", None)
    )


def from_peft_config(config: Any, model: nn.Module | None = None) -> LoraConfig:
    """lorakit's ``LoraConfig`` for a ``peft.LoraConfig`` object, for ``model`` when given.

    Raises ``ConfigError`` naming each PEFT field whose feature lorakit does not implement, or
    ``target_modules=None`` when the model's architecture has no PEFT default.
    """
    data = dict(config.to_dict())
    source = f"peft.{type(config).__name__}"
    if data.get("init_lora_weights") is False:  # in a file it does not matter; here it would
        raise ConfigError(
            f"{source}: init_lora_weights=False (B random, so the adapted model does not start "
            "as the base) is not an initialisation lorakit has; use True (lorakit's 'kaiming') "
            "or 'gaussian'"
        )
    kind = data.get("peft_type")
    data["peft_type"] = getattr(kind, "value", kind)  # PEFT's enum, as its JSON file writes it
    if data.get("target_modules") is None and data["peft_type"] in ("LORA", None):
        data["target_modules"] = _default_targets(model, source)
    task = getattr(data.get("task_type"), "value", data.get("task_type"))
    data["task_type"] = task
    heads = _task_heads(model, task)
    if heads:
        saved = list(data.get("modules_to_save") or [])
        data["modules_to_save"] = saved + [h for h in heads if h not in saved]
    return LoraConfig.from_peft_dict(data, source=source)


def _default_targets(model: nn.Module | None, source: str) -> list[str]:
    """PEFT's default target modules for the model's architecture."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    from peft.utils import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as defaults

    if model_type not in defaults:
        raise ConfigError(
            f"{source}: target_modules=None, and PEFT has no default target modules for "
            f"model_type={model_type!r}; name them (target_modules=[...]), or use lorakit's "
            "LoraConfig, whose default is 'all-linear'"
        )
    return list(defaults[model_type])


def _task_heads(model: nn.Module | None, task: Any) -> list[str]:
    """The head modules PEFT's wrapper for ``task`` trains beside the adapter, where present."""
    from ..io.peft_format import TASK_MODULES  # data only: the heads PEFT's task wrappers save

    if model is None or task not in TASK_MODULES:
        return []
    paths = [p for p, _ in model.named_modules() if p]
    return [h for h in TASK_MODULES[task] if any(suffix_match(p, h) for p in paths)]
