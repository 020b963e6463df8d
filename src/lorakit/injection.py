"""``apply_lora``: wrap the planned modules in LoRA layers and add an adapter to each, all or
nothing (``_Undo`` puts back whatever a failed application changed)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from . import layers as L
from .adapter_memory import add_adapter, check_memory
from .base_change import check_base_init
from .config import LoraConfig
from .errors import AdapterError, ConfigError
from .layers import init as base_init
from .registry import (
    REGISTRY_ATTR,
    adapter_parameters,
    check_adapter_name,
    move_registry,
    registry,
    replace_module,
    wrapper_modules,
)
from .switching import set_adapter
from .targeting import plan


def apply_lora(
    model: nn.Module,
    config: LoraConfig | Any,
    adapter_name: str = "default",
    *,
    adapter_dtype: torch.dtype | None = None,
    quantize_base: bool = False,
) -> nn.Module:
    """Add a LoRA adapter to ``model`` in place, freeze every base parameter, return the model.

    The targeted modules are replaced by LoRA layers that keep the base's state-dict keys
    (``q_proj.weight`` stays ``q_proj.weight``); adapters are added beside them as
    ``q_proj.lora_A.<adapter_name>`` (r, in) and ``q_proj.lora_B.<adapter_name>`` (out, r).
    Applying a second adapter adds it beside the first (layers are reused) and makes it active.

    Adapters live in the base weight's dtype, except on float16/bfloat16 bases where they are kept
    in float32 for stable training (override with ``adapter_dtype``). If the model itself is the
    only targeted layer (a bare ``nn.Linear``), the returned object is its LoRA replacement.
    Raises ``TargetError`` if a target matches nothing, naming the closest module names, and
    ``ConfigError`` if the adapters cannot fit in the device's memory.

    ``init`` "pissa", "pissa_niter_K", "olora" or "loftq" start A and B from each base weight
    and rewrite that weight (``lorakit/layers/init.py`` has the math): the layer computes the
    base's output at step 0 all the same. LoftQ needs a full-precision base and quantizes the
    adapted layers itself (NF4, double quantization, blocks of 64); PiSSA and OLoRA on a
    quantized base quantize the residual again, from the dequantized W (as PEFT does: the two
    roundings add up); ``quantize_base=True`` on a full-precision base quantizes the residual
    of the full-precision W as LoftQ does (QPiSSA as its paper makes it). ``save_adapter``
    converts such an adapter to a plain LoRA of the untouched base; ``remove_lora`` and
    ``delete_adapter`` give a float base its original weights back (a quantized residual cannot
    be: they refuse).

    All or nothing: if anything fails on the way (an allocation, a switch refused at the end),
    every module replaced is put back, every adapter added is dropped and every
    ``requires_grad`` flag restored before the error propagates.

    ``config`` may also be a ``peft.LoraConfig``: it is converted as PEFT's adapter files are
    (``lorakit.integrations.peft_config``), PEFT features lorakit lacks refused by name. On a
    transformers model, ``model.save_pretrained``, ``model.set_adapter`` and
    ``model.active_adapters`` then work with lorakit's adapters
    (``lorakit.integrations.transformers_methods``).
    """
    check_adapter_name(adapter_name)
    config = _lorakit_config(config, model)
    if adapter_name in registry(model).configs:
        raise AdapterError(f"the model already has an adapter named {adapter_name!r}")
    _refuse_unbuilt(config)
    the_plan = plan(model, config)
    if quantize_base and not config.changes_base:
        raise ConfigError(
            f"quantize_base=True is for inits that rewrite the base, not init={config.init!r}; "
            "quantize the model with lorakit.quantize before apply_lora instead"
        )
    if config.changes_base:
        check_base_init(model, the_plan, config, quantize_base)
    check_memory(model, the_plan, adapter_dtype)
    undo = _Undo(model)
    adapters = registry(model, create=True)
    try:
        with adapters.transaction():
            root, new_layers = _inject(
                model, the_plan, config, adapter_name, adapter_dtype, undo, adapters.table
            )
            if config.changes_base:
                for layer in new_layers:
                    saved = base_init.initialise(
                        layer, adapter_name, config.init, config.loftq_iter, quantize_base
                    )
                    undo.base(layer, adapter_name, saved)
            _set_trainable(root, config, adapter_name, new_layers)
            move_registry(model, root)
            adapters.set(adapter_name, config)
            set_adapter(root, adapter_name)
    except BaseException:
        undo.rollback()
        raise
    from .integrations import transformers_methods  # the bridge to transformers' own methods

    transformers_methods.install(root)
    return root


def _lorakit_config(config: Any, model: nn.Module) -> LoraConfig:
    """lorakit's config as given, or converted from PEFT's config object."""
    if isinstance(config, LoraConfig):
        return config
    from .integrations import peft_config

    if peft_config.is_peft_config(config):
        return peft_config.from_peft_config(config, model)
    raise ConfigError(
        f"apply_lora: config is a {type(config).__module__}.{type(config).__qualname__}; "
        "expected a lorakit.LoraConfig (or a peft.LoraConfig)"
    )


def _refuse_unbuilt(config: LoraConfig) -> None:
    """Variants the config names but the layers do not compute yet: an error, never ignored."""
    unbuilt: dict[str, bool] = {}  # every variant the config names is computed now
    problems = [f"{key}={getattr(config, key)!r}" for key, on in unbuilt.items() if on]
    if problems:
        raise ConfigError(f"{', '.join(problems)}: not available in this version of lorakit")


class _Undo:
    """What ``apply_lora`` changed so far, to put back in reverse order if it fails.

    Kept as plain records (no closures), and dropped on success: ``apply_lora`` runs on models
    with thousands of modules, and every object it allocates is more work for the collector.
    """

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.steps: list[tuple] = []  # ("put_back", layer, paths, original) | ("drop", m, name)
        self.grads = [(p, p.requires_grad) for p in model.parameters()]
        self.active = [(m, m.active_adapter) for _, m in wrapper_modules(model)]
        self.had_registry = REGISTRY_ATTR in model.__dict__

    def rollback(self) -> None:
        for kind, module, *rest in reversed(self.steps):
            if kind == "base":
                base_init.put_back(module, *rest)
                continue
            if kind == "drop":
                module.delete_adapter(rest[0])
                continue
            paths, original = rest
            back = original if original is not None else module.unload()
            for path in paths:
                if path and self.model.get_submodule(path) is module:
                    replace_module(self.model, path, back)
        for p, flag in self.grads:
            p.requires_grad_(flag)
        for module, name in self.active:
            module.set_adapter(name)
        if not self.had_registry:
            self.model.__dict__.pop(REGISTRY_ATTR, None)

    def put_back(self, layer: nn.Module, paths: list[str], original: nn.Module | None = None):
        """``layer`` replaced the module now at ``paths``: give that module back (a LoRA layer
        hands its base's tensors back with ``unload``)."""
        self.steps.append(("put_back", layer, paths, original))

    def drop(self, module: nn.Module, adapter_name: str) -> None:
        self.steps.append(("drop", module, adapter_name))

    def base(self, layer: nn.Module, adapter_name: str, saved) -> None:
        """A base-changing init rewrote ``layer``'s weight: ``saved`` puts it back."""
        self.steps.append(("base", layer, adapter_name, saved))


def _inject(model, the_plan, config, adapter_name, adapter_dtype, undo: _Undo, table):
    """Wrap the planned modules and add the adapter to each; returns (root, the LoRA layers)."""
    # A module object registered at several paths (a shared block) is wrapped once and the same
    # LoRA layer is put at every path, so the sharing survives.
    aliases: dict[int, list[str]] = {}
    for path, module in model.named_modules(remove_duplicate=False):
        aliases.setdefault(id(module), []).append(path)
    root = model
    new_layers = []
    for row in the_plan.rows:
        module = root.get_submodule(row.path) if row.path else root
        if isinstance(module, L.LoraLayer):
            layer = module
        else:
            layer = L.wrap(module, row.kind, row.slices, path=row.path, table=table)
            paths = aliases.get(id(module), [row.path])
            undo.put_back(layer, paths)
            for path in paths:
                if path:
                    replace_module(root, path, layer)
                else:
                    root = layer
        add_adapter(layer, row, config, adapter_name, adapter_dtype)
        if layer is module:
            undo.drop(layer, adapter_name)
        new_layers.append(layer)
    for path, _ in the_plan.saved:
        module = root.get_submodule(path)
        if not isinstance(module, L.SavedModule):
            saved = L.SavedModule(module, table)
            undo.put_back(saved, [path], original=module)
            replace_module(root, path, saved)
            module = saved
        module.add_adapter(adapter_name)
        undo.drop(module, adapter_name)
    return root, new_layers


def _set_trainable(root: nn.Module, config: LoraConfig, adapter_name: str, new_layers) -> None:
    """Freeze everything that is not an adapter; then the bias mode opens some biases again."""
    adapter_ids = {id(p) for p in adapter_parameters(root)}
    for p in root.parameters():
        if id(p) not in adapter_ids:
            p.requires_grad_(False)
    for p in adapter_parameters(root, adapter_name):
        p.requires_grad_(True)
    if config.bias == "all":
        # a saved module's original stays frozen (as in PEFT): its trained copies stand for it
        originals = {
            id(m)
            for s in root.modules()
            if isinstance(s, L.SavedModule)
            for m in s.original_module.modules()
        }
        for module in root.modules():
            if id(module) not in originals and module._parameters.get("bias") is not None:
                module.bias.requires_grad_(True)
    elif config.bias == "lora_only":
        for layer in new_layers:
            if layer.bias is not None:
                layer.bias.requires_grad_(True)
