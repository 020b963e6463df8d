"""Merged state dicts: from an adapted model (``merged_state_dict``), or with no model at all.

``merged_state_dict(model)`` gives the base model's state dict with the active adapter folded in,
under the base's own keys; the model is not changed.

Merging an adapter into a base state dict, with no model: ``W' = W + s · B A`` on tensors.

``merge_state_dict(base, adapter, config)`` takes the base model's tensors (a state dict, or one
safetensors shard of it), an adapter's tensors in PEFT's file layout (``read_adapter(dir).tensors``:
``base_model.model.<path>.lora_A.weight`` ...) and its ``LoraConfig``, and gives the base's keys
with the adapter folded in: the same numbers ``lorakit.merged_state_dict`` gives for a model with
that adapter active (torchtune's ``get_merged_lora_ckpt``). Nothing is loaded into a module, so
a base far larger than memory merges one shard at a time (``strict=False``, then check that every
module was found in some shard with :func:`adapter_modules`).

A DoRA adapter (``lora_magnitude_vector``) merges as ``m / ‖W + s B A‖ ⊙ (W + s B A)`` per
output row. Per module, by the base weight's layout: a linear weight (out, in) gets ``s · B A``;
transformers' ``Conv1D`` (in, out) (``fan_in_fan_out``) and an embedding (num, dim) its transpose; a
convolution (out, in, *k) ``s · (B A)`` reshaped to its kernel. ``s`` is the config's scale for the
module's rank and alpha (its ``rank_pattern`` / ``alpha_pattern``, rsLoRA). A trained copy of a
module (``modules_to_save``) and a trained bias replace the base's tensors.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from ..config import LoraConfig
from ..errors import AdapterFileError, ConfigError
from ..layers import SavedModule
from ..model import wrapper_modules
from ..quant import QuantizedWeight
from .adapter import AdapterFile
from .peft_format import PREFIX, _lookup

_FACTORS = {
    "lora_A.weight": "A",
    "lora_B.weight": "B",
    "lora_embedding_A": "A",
    "lora_embedding_B": "B",
    "lora_magnitude_vector": "M",
}


def adapter_modules(adapter: Mapping[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    """``{module path: {"A": tensor, "B": tensor}}`` for the LoRA factors in an adapter's tensors,
    and ``{key: tensor}`` under the path ``""`` for whole tensors (saved modules, biases)."""
    modules: dict[str, dict[str, torch.Tensor]] = {"": {}}
    for key, tensor in adapter.items():
        if not key.startswith(PREFIX):
            raise AdapterFileError(f"{key}: not a key of PEFT's layout (expected {PREFIX}...)")
        rest = key[len(PREFIX) :]
        for suffix, role in _FACTORS.items():
            if rest.endswith("." + suffix):
                factors = modules.setdefault(rest[: -len(suffix) - 1], {})
                factors[role] = tensor
                if suffix.startswith("lora_embedding"):
                    factors["embedding"] = tensor  # marks the layout: weight (num, dim)
                break
        else:
            modules[""][rest.replace(".base_layer.", ".")] = tensor
    return modules


def merge_state_dict(
    base: Mapping[str, torch.Tensor],
    adapter: AdapterFile | Mapping[str, torch.Tensor],
    config: LoraConfig | None = None,
    *,
    fan_in_fan_out: bool | None = None,
    strict: bool = True,
) -> dict[str, torch.Tensor]:
    """The base's tensors with the adapter merged in; ``base`` is not changed.

    ``adapter``: what ``read_adapter`` returns (its config and ``fan_in_fan_out`` are then the
    defaults), or the tensors alone with ``config`` given. ``fan_in_fan_out``: the linear
    weights are stored (in, out), as transformers' ``Conv1D`` (GPT-2) stores them. ``strict``:
    every module the adapter targets must have its weight in ``base`` (False for one shard of a
    larger base: modules elsewhere are skipped). The delta is formed in float32 and the sum
    cast once to the base weight's dtype, as ``lorakit.merge`` does.
    """
    if isinstance(adapter, AdapterFile):
        config = config or adapter.lora_config()
        if fan_in_fan_out is None:
            fan_in_fan_out = bool(adapter.config.get("fan_in_fan_out", False))
        adapter = adapter.tensors
    if config is None:
        raise ConfigError("merge_state_dict: give the adapter's LoraConfig (or an AdapterFile)")
    modules = adapter_modules(adapter)
    whole = modules.pop("")
    out = dict(base)
    problems = []
    for path, factors in modules.items():
        key = f"{path}.weight"
        embedding = factors.pop("embedding", None) is not None
        if set(factors) - {"M"} != {"A", "B"} or ("M" in factors and embedding):
            problems.append(
                f"{path}: the adapter has {sorted(factors)} of its factors, not A and B "
                "(and a DoRA magnitude M on a linear layer)"
            )
            continue
        if key not in base:
            if strict:
                problems.append(f"{key}: targeted by the adapter, not in the base state dict")
            continue
        weight = base[key]
        if not weight.is_floating_point():
            problems.append(f"{key}: a {weight.dtype} weight (quantized?) cannot be merged here")
            continue
        r = _lookup(config.rank_pattern, path, config.r)
        alpha = _lookup(config.alpha_pattern, path, config.alpha)
        try:
            flip = embedding or bool(fan_in_fan_out)
            delta = _delta(weight, factors["A"], factors["B"], flip, path)
        except AdapterFileError as exc:
            problems.append(str(exc))
            continue
        merged = weight.float() + delta.to(weight.device) * config.scaling(r, alpha)
        if "M" in factors:  # DoRA: each output row rescaled to its magnitude, m / ‖W + s B A‖
            rows = merged.t() if fan_in_fan_out else merged
            m = factors["M"].float().to(weight.device)
            if m.shape != rows.shape[:1]:
                problems.append(f"{path}: magnitude {tuple(m.shape)}, {rows.shape[0]} outputs")
                continue
            rows = rows * (m / torch.linalg.vector_norm(rows, dim=1))[:, None]
            merged = rows.t() if fan_in_fan_out else rows
        out[key] = merged.to(weight.dtype)
    for key, tensor in whole.items():
        if key in base:
            out[key] = tensor.to(base[key].dtype)
        elif strict:
            problems.append(f"{key}: in the adapter, not in the base state dict")
    if problems:
        lines = "\n".join(f"  - {p}" for p in problems)
        raise AdapterFileError(f"cannot merge the adapter into the state dict:\n{lines}")
    return out


def _delta(weight, a, b, flip: bool, path: str) -> torch.Tensor:
    """``B A`` laid out like ``weight``, float32; ``flip``: the weight is stored (in, out)."""
    a, b = a.float(), b.float()
    if weight.dim() > 2:  # a convolution: A (r, in, *k), B (out, r, 1, ...)
        delta = b.flatten(1) @ a.flatten(1)
        if delta.numel() == weight.numel():
            delta = delta.view(weight.shape)
    else:
        delta = b @ a  # (out, in) for linear layers; (dim, num) for embeddings
        if flip:
            delta = delta.t()
    if delta.shape != weight.shape:
        raise AdapterFileError(
            f"{path}: B A has shape {tuple(delta.shape)}, the base weight {tuple(weight.shape)}"
        )
    return delta


def merged_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The base model's state dict with the active adapter folded in; the model is not changed.

    Keys are the base model's own (LoRA layers keep them; a saved module contributes its active
    trained copy under the original path), so ``base.load_state_dict(merged_state_dict(m))`` on a
    fresh base gives the merged model.
    """
    wrappers = dict(wrapper_modules(model))
    out: dict[str, torch.Tensor] = {}
    written: set[str] = set()
    # In the model's own key order: a wrapper's entries (its adapters left out) replace its keys
    # where they first appear; "" is the path when the model itself is a wrapper.
    for key, value in model.state_dict().items():
        owner = _owner(key, wrappers)
        if owner is None:
            out[key] = value
        elif owner not in written:
            written.add(owner)
            out.update(_merged_entries(owner, wrappers[owner]))
    return out


def _owner(key: str, wrappers: dict[str, nn.Module]) -> str | None:
    """The path of the wrapper a state-dict key belongs to, or None."""
    if "" in wrappers:
        return ""
    parts = key.split(".")
    for i in range(1, len(parts)):
        path = ".".join(parts[:i])
        if path in wrappers:
            return path
    return None


def _merged_entries(path: str, module: nn.Module) -> dict[str, torch.Tensor]:
    """A wrapper's base entries with the active adapter folded in, under the base's keys."""
    prefix = f"{path}." if path else ""
    if isinstance(module, SavedModule):
        return {prefix + k: v for k, v in module.unload().state_dict().items()}
    name = module._route
    if name is None and isinstance(module.weight, QuantizedWeight):  # unchanged: as stored
        stored = module.weight.state_dict(prefix="weight.")
        out = {prefix + k: v.detach() for k, v in stored.items()}
    elif name is None:
        out = {prefix + "weight": module.weight.detach()}
    else:  # a quantized base merges in full precision
        with torch.no_grad():
            out = {prefix + "weight": module.merged_weight(name)}
    if module.bias is not None:
        out[prefix + "bias"] = module.bias.detach()
    return out
