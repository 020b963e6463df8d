"""Folding adapters into the base weights and taking lorakit's layers out: ``merge``,
``unmerge``, ``merge_and_unload`` and ``remove_lora``."""

from __future__ import annotations

from torch import nn

from .base_change import check_restorable
from .errors import MergeError, gather
from .layers import init as base_init
from .registry import REGISTRY_ATTR, lora_layers, registry, replace_module, wrapper_modules
from .switching import set_adapter


def merge(model: nn.Module, adapter_name: str | None = None) -> list[str]:
    """Fold the active adapter (or ``adapter_name``) into the base weights; returns changed paths.

    ``W' = W + s · B A``, computed in float32 and cast once to the weight's dtype. Merging again is
    a no-op. Every layer is checked before any weight is written: if a merge would produce a
    non-finite value, ``MergeError`` names the module and nothing is changed. The check is cheap
    (a bound from the tensors' norms); each merged weight is computed once, when it is written.
    """
    adapters = registry(model)
    if adapter_name is not None:
        adapters.require(adapter_name)
    owners: dict[int, list[tuple[str, nn.Module]]] = {}
    for path, module in model.named_modules(remove_duplicate=False):
        for pname, param in module._parameters.items():
            if param is not None:
                key = f"{path}.{pname}" if path else pname
                owners.setdefault(id(param), []).append((key, module))
    problems = []
    work = []
    for path, layer in lora_layers(model):
        name = adapter_name or layer.active_adapter
        if name is None or name not in layer.records or name in layer.merged_adapters:
            continue
        others = [key for key, mod in owners.get(id(layer.weight), []) if mod is not layer]
        if others:
            problems.append(
                f"{path}: its weight is tied to {', '.join(others)}; merging would change "
                "those modules too. Keep this adapter unmerged, or untie the weights first"
            )
            continue
        problem = layer.merge_problem(name)
        if problem:
            problems.append(f"{path}: {problem}")
        work.append((path, layer, name))
    gather(problems, MergeError, "merge refused, no weight was changed")
    changed = []
    for path, layer, name in work:
        if layer.merge(name):
            changed.append(path)
    adapters.merged = [p for p, layer in lora_layers(model) if layer.merged_adapters]
    return changed


def unmerge(model: nn.Module) -> list[str]:
    """Subtract every merged adapter from the base weights again; returns changed paths."""
    changed = [path for path, layer in lora_layers(model) if layer.unmerge()]
    registry(model).merged = []
    return changed


def merge_and_unload(
    model: nn.Module, adapter_name: str | None = None, *, requantize: bool = False
) -> nn.Module:
    """Merge the active adapter and give back plain torch modules: no lorakit class is left.

    Each LoRA layer is replaced by its original module (same class) holding the merged weight;
    a saved module (``modules_to_save``) by the adapter's trained copy.

    On a quantized base (``lorakit.quantize``) the merge is ``dequantize(W) + s · B A`` in
    float32. ``requantize=False`` gives back ``nn.Linear`` layers holding it in full precision
    (the weight's original dtype): exact, at full-precision memory. ``requantize=True``
    quantizes it again in the base's format and gives back ``QuantLinear`` layers: small, but
    the rounding can be as large as the adapter's update; each re-quantized weight records the
    error it introduced, listed per layer by ``lorakit.quant.requantization_errors(model)``.
    """
    if adapter_name is not None:
        set_adapter(model, adapter_name)
    merge(model)
    if requantize:
        for _, layer in lora_layers(model):
            layer.requantize_merged()
    return _unload(model)


def remove_lora(model: nn.Module) -> nn.Module:
    """Remove every adapter (unmerging first) and give back the base model's own modules.

    Layers whose base a PiSSA or OLoRA init rewrote get their original weight back; a quantized
    residual (QPiSSA, LoftQ) cannot be undone, and is refused before anything changes.
    """
    check_restorable(model, list(registry(model).configs), "remove_lora")
    unmerge(model)
    set_adapter(model, None)
    for _, layer in lora_layers(model):
        for name in list(layer.records):
            if base_init.base_change(layer, name) is not None:
                base_init.restore(layer, name)
    return _unload(model)


def _unload(model: nn.Module) -> nn.Module:
    model.__dict__.pop(REGISTRY_ATTR, None)
    for path, module in reversed(list(wrapper_modules(model))):
        plain = module.unload()
        if not path:
            model = plain
        else:
            replace_module(model, path, plain)
    model.__dict__.pop(REGISTRY_ATTR, None)
    return model
