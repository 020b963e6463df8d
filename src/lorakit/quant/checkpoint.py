"""Loading a checkpoint in bitsandbytes' 4-bit layout into a full-precision model, all or nothing.

``load_quantized`` works in three steps, and only the last one touches the model:

1. plan: every ``nn.Linear`` whose weight has a quant state in the checkpoint gets its
   :class:`QuantLinear`, built from the checkpoint's entries (each one checked, see
   :mod:`lorakit.quant.bnb_state`) and its shape compared with the model's;
2. rehearse: the whole state dict is loaded, with ``load_state_dict`` itself, into a copy of the
   model's structure on the meta device (new module objects, no data) with the planned layers in
   place, so missing and unexpected keys, shapes and every module's own loading rules are checked
   exactly as the real load will check them;
3. apply: the layers are replaced and the state dict loaded; should that still fail, the
   replaced layers are put back before the error propagates.

A damaged checkpoint therefore raises a :class:`QuantError` naming its entry and leaves the model
as it was: the same modules, the same values.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping

import torch
from torch import nn

from ..errors import QuantError, gather
from .convert import _is_linear
from .linear import QuantLinear
from .weight import QuantizedWeight

_STATE = ".quant_state."


def load_quantized(
    model: nn.Module,
    state_dict: Mapping[str, torch.Tensor],
    *,
    compute_dtype: torch.dtype | None = None,
    strict: bool = True,
    assign: bool = False,
):
    """Load a state dict in bitsandbytes' 4-bit layout into a full-precision model.

    Each ``nn.Linear`` whose weight has a ``quant_state`` entry becomes a :class:`QuantLinear`
    holding the checkpoint's codes as they are (nothing is re-quantized); then the whole state
    dict is loaded (``strict`` and ``assign`` as in ``load_state_dict``). The model may be built
    on the meta device, with ``assign=True``. Returns ``load_state_dict``'s result.

    Everything is checked before the model changes: a missing, malformed or non-finite entry, a
    shape the model does not have, or (under ``strict``) a missing or unexpected key raises a
    :class:`QuantError` and leaves the model exactly as it was.
    """
    if not isinstance(state_dict, Mapping):
        raise QuantError(
            f"load_quantized takes a state dict (a mapping of keys to tensors), "
            f"got a {type(state_dict).__name__}"
        )
    not_text = [repr(k) for k in state_dict if not isinstance(k, str)]
    if not_text:
        raise QuantError(f"state dict keys must be strings, got {', '.join(not_text[:5])}")
    plan = _plan(model, state_dict, compute_dtype)
    _rehearse(model, plan, state_dict, strict, assign)
    replaced = []  # (parent, child name, the module it held)
    try:
        for paths, old, new in plan:
            for path in paths:
                parent_path, _, child = path.rpartition(".")
                parent = model.get_submodule(parent_path) if parent_path else model
                if parent._modules.get(child) is old:
                    parent._modules[child] = new
                    replaced.append((parent, child, old))
        return model.load_state_dict(state_dict, strict=strict, assign=assign)
    except BaseException:
        for parent, child, old in reversed(replaced):
            parent._modules[child] = old
        raise


def _plan(
    model: nn.Module, state_dict: Mapping, compute_dtype: torch.dtype | None
) -> list[tuple[list[str], nn.Module, QuantLinear]]:
    """(every path of the linear layer, the layer, its replacement) for each linear layer with
    a quant state in ``state_dict``; raises once with every problem found."""
    paths: dict[int, list[str]] = {}
    linears: dict[int, nn.Module] = {}
    for path, module in model.named_modules(remove_duplicate=False):
        paths.setdefault(id(module), []).append(path)
        if _is_linear(module):
            linears[id(module)] = module
    quantized = {k.partition(_STATE)[0] for k in state_dict if _STATE in k}
    plan, problems = [], []
    for key, module in linears.items():
        prefix = f"{paths[key][0]}.weight" if paths[key][0] else "weight"
        if prefix not in quantized:
            continue
        if paths[key] == [""]:
            problems.append(
                "the model is itself an nn.Linear, which cannot be replaced in place; "
                "load into a module that holds it (nn.Sequential(linear))"
            )
            continue
        entries = {
            k[len(prefix) + 1 :] if k != prefix else "": v
            for k, v in state_dict.items()
            if k == prefix or k.startswith(prefix + ".")
        }
        try:
            weight = QuantizedWeight.from_bnb(entries, compute_dtype, key=prefix)
            if weight.shape != module.weight.shape:
                raise QuantError(
                    f"{prefix}: the checkpoint holds shape {tuple(weight.shape)}, "
                    f"the model {tuple(module.weight.shape)}"
                )
            if module.weight.device.type != "meta":
                weight = weight.to(module.weight.device)
            plan.append((paths[key], module, QuantLinear(weight, module.bias)))
        except QuantError as exc:
            problems.append(str(exc))
    gather(problems, QuantError, "cannot load the quantized checkpoint")
    return plan


def _rehearse(model: nn.Module, plan: list, state_dict: Mapping, strict: bool, assign: bool):
    """Load ``state_dict`` into a meta-device copy of the model's structure with the planned
    layers in place; a failure is the error the real load would raise, as a QuantError."""
    memo: dict[int, object] = {}
    for _, old, new in plan:
        memo[id(old)] = _meta_shadow(new, memo)
    shadow = _meta_shadow(model, memo)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "copying ... to a meta parameter ... is a no-op"
        try:
            shadow.load_state_dict(state_dict, strict=strict, assign=assign)
        except RuntimeError as exc:
            raise QuantError(f"cannot load the quantized checkpoint: {exc}") from None


def _meta_shadow(module: nn.Module, memo: dict[int, object]) -> nn.Module:
    """A new module of the same class and attributes whose parameters, buffers and children are
    new objects on the meta device (shared ones stay shared); loading into it changes nothing
    the original holds. Built as torch's own ``_replicate_for_data_parallel`` builds replicas.
    Load post-hooks, which may act on the original module, are left out."""
    if id(module) in memo:
        return memo[id(module)]
    shadow = module.__new__(type(module))
    memo[id(module)] = shadow
    shadow.__dict__ = module.__dict__.copy()
    shadow._parameters = {k: _meta_tensor(p, memo) for k, p in module._parameters.items()}
    shadow._buffers = {k: _meta_tensor(b, memo) for k, b in module._buffers.items()}
    shadow._modules = {
        k: None if m is None else _meta_shadow(m, memo) for k, m in module._modules.items()
    }
    shadow._load_state_dict_post_hooks = type(module._load_state_dict_post_hooks)()
    return shadow


def _meta_tensor(tensor: torch.Tensor | None, memo: dict[int, object]):
    if tensor is None:
        return None
    if id(tensor) not in memo:
        meta = torch.empty(tensor.shape, dtype=tensor.dtype, device="meta")
        if isinstance(tensor, nn.Parameter):
            meta = nn.Parameter(meta, requires_grad=tensor.requires_grad)
        memo[id(tensor)] = meta
    return memo[id(tensor)]
