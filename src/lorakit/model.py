"""The model-level API: apply, switch, merge, unmerge, unload and disable adapters.

Everything here walks the model for lorakit's own layers (found by type, never by a substring of a
parameter name) and calls their methods; the adapter math lives in ``lorakit.layers``.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import nn

from . import layers as L
from .adapter_memory import add_adapter, check_memory
from .base_change import check_base_init, check_restorable
from .config import LoraConfig
from .errors import AdapterError, ConfigError, MergeError, gather
from .layers import init as base_init
from .quant import quantized_weights
from .targeting import parameter_line, plan

_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_\-]{0,99}")
_REGISTRY = "lorakit_registry"  # attribute on the adapted model: its AdapterRegistry


def check_adapter_name(name: object) -> str:
    """Adapter names are also directory and state-dict key parts: letters, digits, ``_``, ``-``."""
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise AdapterError(
            f"adapter name {name!r} is not allowed: use 1-100 letters, digits, '_' or '-' "
            "(no dots, slashes or spaces), not starting with '-'"
        )
    if hasattr(nn.ParameterDict, name) or name in nn.Module().__dict__:
        raise AdapterError(
            f"adapter name {name!r} is reserved: it is an attribute of torch.nn.Module "
            "(adapters are stored as module parameters); choose another name"
        )
    return name


class AdapterRegistry:
    """The adapters on one model: their configs by name, in the order they were added, and the
    slot table its layers share for mixed batches (``layers/rows.py``).

    One per adapted model, kept on it as ``lorakit_registry``; every change of which adapters a
    model has goes through it (apply, load, combine, delete, unload), and a failed change rolls
    back through ``transaction``.
    """

    def __init__(self) -> None:
        self.configs: dict[str, LoraConfig] = {}
        self.table = L.SlotTable()
        self.merged: list[str] = []  # paths of layers with a merged adapter (model.merge)

    def require(self, name: str, doing: str = "") -> LoraConfig:
        """The config of adapter ``name``, or the one "no adapter named ..." error."""
        if name not in self.configs:
            known = ", ".join(self.configs) or "none"
            what = f" to {doing}" if doing else ""
            raise AdapterError(f"no adapter named {name!r}{what} (adapters: {known})")
        return self.configs[name]

    def set(self, name: str, config: LoraConfig) -> None:
        """Add adapter ``name`` (at the end) or give it a new config (in place)."""
        self.configs[name] = config
        self.table.renumber(list(self.configs))

    def remove(self, name: str) -> None:
        del self.configs[name]
        self.table.renumber(list(self.configs))

    @contextlib.contextmanager
    def transaction(self) -> Iterator[AdapterRegistry]:
        """Within the block, changes are undone if it raises."""
        before = dict(self.configs)
        try:
            yield self
        except BaseException:
            self.configs = before
            self.table.renumber(list(before))
            raise


def registry(model: nn.Module, create: bool = False) -> AdapterRegistry:
    """The model's adapter registry (an empty one, not attached, when it has none and ``create``
    is false; attached to the model when ``create``)."""
    found = model.__dict__.get(_REGISTRY)
    if found is None:
        found = AdapterRegistry()
        if create:
            model.__dict__[_REGISTRY] = found
    return found


def move_registry(old: nn.Module, new: nn.Module) -> None:
    """The model object changed (its root was wrapped or unwrapped): the registry goes along."""
    if old is not new and _REGISTRY in old.__dict__:
        new.__dict__[_REGISTRY] = old.__dict__.pop(_REGISTRY)


def require_adapter(model: nn.Module, name: str, doing: str = "") -> LoraConfig:
    """The config of adapter ``name`` on ``model``, or an AdapterError listing the adapters."""
    return registry(model).require(name, doing)


def adapter_configs(model: nn.Module) -> dict[str, LoraConfig]:
    """The configs of the adapters on a model, by name, in the order they were added."""
    return dict(registry(model).configs)


def list_adapters(model: nn.Module) -> list[str]:
    return list(registry(model).configs)


def lora_layers(model: nn.Module) -> Iterator[tuple[str, L.LoraLayer]]:
    """(path, layer) for every LoRA layer in the model."""
    for path, module in model.named_modules():
        if isinstance(module, L.LoraLayer):
            yield path, module


def wrapper_modules(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """(path, module) for every LoRA layer and saved module (``modules_to_save``) in the model."""
    for path, module in model.named_modules():
        if isinstance(module, (L.LoraLayer, L.SavedModule)):
            yield path, module


def adapter_parameters(model: nn.Module, adapter_name: str | None = None) -> Iterator[nn.Parameter]:
    """The parameters that belong to adapters (all, or one adapter's): A, B and saved copies."""
    for _, module in wrapper_modules(model):
        names = module.adapter_names if adapter_name is None else [adapter_name]
        for n in names:
            if n in module.adapter_names:
                yield from module.adapter_tensors(n)


def _replace(model: nn.Module, path: str, new: nn.Module) -> None:
    parent_path, _, child = path.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    setattr(parent, child, new)


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
        self.had_registry = _REGISTRY in model.__dict__

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
                    _replace(self.model, path, back)
        for p, flag in self.grads:
            p.requires_grad_(flag)
        for module, name in self.active:
            module.set_adapter(name)
        if not self.had_registry:
            self.model.__dict__.pop(_REGISTRY, None)

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
                    _replace(root, path, layer)
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
            _replace(root, path, saved)
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
            _replace(model, path, module.unload())
    adapters.remove(adapter_name)
    if adapters.configs:
        move_registry(model, root)
    else:
        model.__dict__.pop(_REGISTRY, None)
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


@contextlib.contextmanager
def adapter_per_row(model: nn.Module, names: Sequence[str | None]) -> Iterator[nn.Module]:
    """Within the block, row ``i`` of every batch uses adapter ``names[i]`` (None: the base).

    The rows' assignment is one plan (``lorakit.layers.RowPlan``) built here once and read by
    every layer, so entering a block costs the same for any number of layers; the plan is in force
    for this model in this thread only (two threads may run different plans on one model).
    Adapters may differ in rank and in the modules they target (a layer without a row's adapter
    adds nothing for that row). Works for training: each adapter gets gradient only from its own
    rows. A linear layer that sees the batch flattened to (rows × tokens, features), as OPT's MLP
    does, takes each row's tokens to be consecutive. A layer whose adapter is merged refuses.

    Memory, in inference: with more than ``LoraLayer.GROUPED_MAX_ADAPTERS`` distinct adapters a
    layer stacks its adapters into one tensor (a second copy of them), kept for later blocks
    while none of them changes and dropped by ``delete_adapter``; each row's pick from it is
    freed after use on the block's first call and kept from its second call on (generation
    steps) until the block ends. Fewer adapters are applied group by group from the parameters
    themselves, with no copy.
    """
    adapters = registry(model)
    unknown = sorted({n for n in names if n is not None and n not in adapters.configs})
    if unknown:
        raise AdapterError(
            f"adapter_per_row: unknown adapter(s) {unknown}; adapters: "
            f"{', '.join(adapters.configs) or 'none'}"
        )
    if adapters.merged:
        raise MergeError(f"adapter_per_row needs unmerged adapters; {adapters.merged[0]} is merged")
    plan_ = L.RowPlan(adapters.table, names)
    # The model's own input says how many rows a batch has; inside, a layer may see them
    # flattened with their tokens (OPT's MLP), so the count is checked here, once per call.
    check = model.register_forward_pre_hook(_rows_checker(len(names)), with_kwargs=True)
    try:
        with L.rows_in_force(plan_):
            yield model
    finally:
        check.remove()


def kept_tokens(model: nn.Module, keep: torch.Tensor) -> contextlib.AbstractContextManager:
    """Within an ``adapter_per_row`` block: a forward given transformers' boolean
    ``logits_to_keep=keep`` ((rows, seq) mask) projects ``hidden[keep]``, the kept tokens of every
    row flattened; inside this block the output head (a LoRA layer or a saved ``lm_head``) gives
    each of those tokens its own row's adapter. Outside a row plan it does nothing."""
    return L.kept_tokens(registry(model).table, keep)


#: keyword inputs whose first axis is the batch, in the order they are looked for
_BATCH_INPUTS = (
    "input_ids",
    "inputs_embeds",
    "pixel_values",
    "input_values",
    "input_features",
    "decoder_input_ids",
)


def _rows_checker(n: int):
    """A forward pre-hook refusing a batch whose row count is not the number of names given."""

    def check(module, args, kwargs):
        found = [(k, kwargs.get(k)) for k in _BATCH_INPUTS] + [("input", a) for a in args]
        for key, value in found:
            if isinstance(value, torch.Tensor) and value.dim() > 0:
                if value.shape[0] != n:
                    raise AdapterError(
                        f"adapter_per_row was given {n} names but the batch has "
                        f"{value.shape[0]} rows ({key} of shape {tuple(value.shape)})"
                    )
                return None
        return None

    return check


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
    model.__dict__.pop(_REGISTRY, None)
    for path, module in reversed(list(wrapper_modules(model))):
        plain = module.unload()
        if not path:
            model = plain
        else:
            _replace(model, path, plain)
    model.__dict__.pop(_REGISTRY, None)
    return model


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameters, each shared tensor counted once.

    A quantized weight counts as the elements it stands for (frozen), not the frozen parameters
    its codes and scales are stored in.
    """
    seen = {id(p) for _, w in quantized_weights(model) for p in w.parameters()}
    trainable = 0
    total = sum(w.numel() for _, w in quantized_weights(model))
    for p in model.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        total += p.numel()
        if p.requires_grad:
            trainable += p.numel()
    return trainable, total


def print_trainable_parameters(model: nn.Module) -> str:
    """Print and return ``trainable 65,536 / 16,842,752 (0.39%)``."""
    line = parameter_line(*count_parameters(model))
    print(line)
    return line
