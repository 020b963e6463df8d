"""Hot swap: replace a loaded adapter's weights in place with another adapter directory's.

A server that keeps one base model and changes adapters wants the switch to cost a copy, not a
rebuild: ``hotswap_adapter(model, directory, "default")`` writes the new adapter's tensors into the
Parameters adapter ``"default"`` already has (``copy_``; the same objects, the same shapes), so no
module is re-injected and a ``torch.compile``d model runs the new adapter without recompiling.

TorchDynamo guards a compiled graph on the tensors' shapes, dtypes and strides and on the Python
values it read, such as a layer record's ``scale`` float; it does not guard on tensor contents.
So a swap keeps everything dynamo guards on:

* **rank**: the loaded adapter keeps its rank ``R``. A file of smaller rank ``r`` is zero-padded,
  ``A`` (r, in) -> (R, in) with zero rows and ``B`` (out, r) -> (out, R) with zero columns; the
  padding contributes ``0 · 0`` to every sum, so the update ``B A`` is exactly the file's. A file
  of larger rank cannot fit: call :func:`pad_adapter_rank` first, before compiling (PEFT's
  ``prepare_model_for_compiled_hotswap(target_rank=...)`` plays this part).
* **scale**: each layer keeps its scale ``s_kept`` (and its ``r``, ``alpha``, dropout and config).
  The file's own scale ``s_new`` (its alpha over its rank, or over √rank with rsLoRA) is folded
  into ``B``: ``B_kept = B_new · s_new / s_kept``, so ``s_kept · B_kept A = s_new · B_new A``, the
  update a fresh ``load_adapter`` of the file computes (equal up to the rounding of one product;
  bit for bit when the scales are equal). Saving the swapped adapter writes the kept rank and
  alpha with this B: a file that computes the same outputs.

A swap is all or nothing: the file is read and checked in full (the same target modules, fused
slices, saved modules and bias mode as the loaded adapter; every tensor present with a fitting
shape; every value finite; the base model's fingerprint, which must be readable) before the first
tensor is written, and a refusal is one ``AdapterFileError`` listing every problem, leaving the
loaded adapter bit for bit as it was.
"""

from __future__ import annotations

import math
import os
import re

import torch
from torch import nn

from ..errors import AdapterError, AdapterFileError, ConfigError, MergeError, gather
from ..layers import SavedModule
from ..model import check_adapter_name, lora_layers, registry
from ..targeting import plan
from .adapter import (
    _check_base,
    _listing,
    _without_absent_task_modules,
    adapter_path,
    check_finite,
    overflow,
    read_adapter,
)
from .peft_format import PREFIX, slots


def hotswap_adapter(
    model: nn.Module,
    directory: str | os.PathLike,
    adapter_name: str = "default",
    *,
    allow_base_mismatch: bool = False,
    allow_bin: bool = False,
    subfolder: str | None = None,
) -> nn.Module:
    """Replace the weights of loaded adapter ``adapter_name`` with the adapter at ``directory``.

    In place, into the same Parameters: no module is re-injected and a compiled model does not
    recompile. The file must target the modules the loaded adapter targets, with rank at most the
    loaded one (smaller ranks are zero-padded, exactly); a different alpha or scale is folded into
    ``B`` (see the module docstring). The active adapter, ``r``, ``alpha``, ``scaling``, dropout
    and ``requires_grad`` stay as they were. Checked in full before anything is written: a
    refusal raises ``AdapterFileError`` (``AdapterError`` for an unknown name, ``MergeError``
    while the adapter is merged) and changes nothing. ``allow_base_mismatch``, ``allow_bin`` and
    ``subfolder`` as for :func:`~lorakit.load_adapter`. Returns the model.
    """
    check_adapter_name(adapter_name)
    kept = registry(model).require(adapter_name, "hot-swap (load the first with load_adapter)")
    layers = {p: layer for p, layer in lora_layers(model) if adapter_name in layer.lora_A}
    merged = [p for p, layer in layers.items() if adapter_name in layer.merged_adapters]
    if merged:
        raise MergeError(
            f"adapter {adapter_name!r} is merged into {len(merged)} module(s) (e.g. {merged[0]}); "
            "unmerge before hot-swapping it"
        )
    file = read_adapter(adapter_path(directory, subfolder), allow_bin=allow_bin)
    path = file.directory
    check_finite(file)
    config = file.lora_config()
    config = _without_absent_task_modules(config, model, file.config.get("task_type"))
    _check_base(model, file, allow_base_mismatch)

    the_plan = plan(model, config)
    rows = {row.path: row for row in the_plan.rows}
    here = f"adapter {adapter_name!r}"
    problems = [f"{p}: targeted by the file, not by {here}" for p in rows if p not in layers]
    problems += [f"{p}: in {here}, not targeted by the file" for p in layers if p not in rows]
    saved_file = {p for p, _ in the_plan.saved}
    saved_here = {
        p
        for p, m in model.named_modules()
        if isinstance(m, SavedModule) and adapter_name in m.adapter_names
    }
    problems += [f"{p}: a saved module of the file only" for p in sorted(saved_file - saved_here)]
    problems += [
        f"{p}: a saved module of adapter {adapter_name!r} only"
        for p in sorted(saved_here - saved_file)
    ]
    if config.bias != kept.bias:
        problems.append(f"bias={config.bias!r} in the file, {kept.bias!r} in adapter")
    too_small = []
    for p in rows.keys() & layers.keys():
        row, layer = rows[p], layers[p]
        slices = getattr(layer, "slices", None)
        if row.slices != slices:
            problems.append(f"{p}: fused slices {row.slices} in the file, {slices} here")
        elif row.r > layer.record(adapter_name).rank:
            too_small.append((p, row.r, layer.record(adapter_name).rank))
        elif layer.record(adapter_name).scale == 0 and row.scaling != 0:
            problems.append(f"{p}: adapter {adapter_name!r} has scale 0, which holds no update")
    for p, r_file, r_here in sorted(too_small):
        problems.append(
            f"{p}: r={r_file} in the file, r={r_here} in adapter {adapter_name!r}: the loaded "
            "adapter's rank is too small"
        )
    if problems:
        hint = "\nhot swap needs the same target modules; load it beside with another adapter_name"
        if too_small:
            top = max(r for _, r, _ in too_small)
            hint = (
                f"\npad the loaded adapter first, before torch.compile: "
                f"lorakit.pad_adapter_rank(model, {adapter_name!r}, {top})"
            )
        raise AdapterFileError(
            _listing(f"the adapter at {path} cannot replace adapter {adapter_name!r}", problems)
            + hint
        )

    writes = _new_values(model, file, adapter_name, kept.bias, layers, rows, path)
    with torch.no_grad():
        for target, value in writes:
            target.copy_(value)
    return model


def _new_values(model, file, name, bias, layers, rows, path) -> list[tuple[torch.Tensor, ...]]:
    """(model tensor, value to copy into it) for every tensor of the adapter; checks them all."""
    required, optional = slots(model, name, bias)
    owner = {}  # id(A or B parameter) -> (layer path, layer)
    for p, layer in layers.items():
        owner[id(layer.lora_A[name])] = owner[id(layer.lora_B[name])] = (p, layer)
    shapes = file.shapes
    filled = {id(slot.target) for slot in required.values()}
    problems, writes = [], []
    for key, slot in required.items():
        expected = slot.shape
        if slot.role in ("lora_A", "lora_B"):
            p, layer = owner[id(slot.target)]
            dim = 0 if slot.role == "lora_A" else 1
            blocks = expected[dim] // layer.record(name).rank  # adapted fused slices (or 1)
            expected = (*expected[:dim], blocks * rows[p].r, *expected[dim + 1 :])
        if key not in shapes:
            problems.append(f"missing from the file: {key} (expected {expected})")
            continue
        if tuple(shapes[key]) != expected:
            problems.append(f"shape mismatch: {key}: expected {expected}, found {shapes[key]}")
            continue
        value = file.tensors[key]
        if value.is_floating_point() != slot.target.is_floating_point():
            problems.append(
                f"dtype mismatch: {key}: {value.dtype} in the file, {slot.target.dtype} here"
            )
            continue
        if slot.role in ("lora_A", "lora_B"):
            try:
                value = layer.fit_tensor(name, slot.role, value, rows[p].r, rows[p].scaling)
            except AdapterError as exc:
                problems.append(f"{key}: {exc}")
                continue
        if too_large := overflow(key, value, slot.target):
            problems.append(too_large)
            continue
        writes.append((slot.target, value))
    for key in shapes:
        if key in required:
            continue
        slot = optional.get(key)
        if slot is None:
            problems.append(f"unexpected in the file: {key} {shapes[key]}")
        elif id(slot.target) in filled:
            continue  # another name for a tensor read above (PEFT writes some twice)
        elif tuple(shapes[key]) != slot.shape or not torch.equal(
            slot.target.detach(), file.tensors[key].to(slot.target.device, slot.target.dtype)
        ):
            problems.append(
                f"{key.removeprefix(PREFIX)}: the file carries its own copy of this base tensor; "
                "a hot swap changes adapter weights only (load_adapter replaces base tensors)"
            )
    if problems:
        raise AdapterFileError(
            _listing(f"the adapter at {path} does not fit adapter {name!r}", problems)
        )
    return writes


def pad_adapter_rank(model: nn.Module, adapter_name: str, rank: int) -> list[str]:
    """Zero-pad adapter ``adapter_name`` in place to rank ``rank`` in every layer; exact.

    Call it before ``torch.compile`` when adapters of a larger rank will be hot-swapped in later
    (:func:`hotswap_adapter` copies into the padded shapes). ``A`` gets zero rows and ``B`` zero
    columns, so ``B A`` and the outputs do not change; each layer keeps its scale, and its
    ``alpha`` is restated for the new rank (``alpha · rank / r``, or ``alpha · √(rank / r)`` with
    rsLoRA), in the layers and in the adapter's config, so a saved file reads back with the
    same scale. The padded A and B are new Parameters (their shape changed): build optimizers
    after padding. A layer already at ``rank`` is left alone; one above it is an error (nothing
    is padded then). Returns the paths of the padded layers.
    """
    adapters = registry(model)
    adapters.require(adapter_name, "pad")
    if not isinstance(rank, int) or isinstance(rank, bool) or rank <= 0:
        raise ConfigError(f"rank={rank!r}: expected a positive integer")
    layers = [(p, layer) for p, layer in lora_layers(model) if adapter_name in layer.lora_A]
    gather(
        [
            f"{p}: r={layer.record(adapter_name).rank} is above {rank}"
            for p, layer in layers
            if layer.record(adapter_name).rank > rank
        ],
        AdapterError,
        f"cannot pad adapter {adapter_name!r} to rank {rank}, nothing was padded",
    )
    config = adapters.configs[adapter_name]
    rslora = config.use_rslora
    padded = []
    for p, layer in layers:
        record = layer.record(adapter_name)
        alpha = record.alpha * _alpha_factor(rank, record.rank, rslora)
        if layer.pad_rank(adapter_name, rank, alpha):
            padded.append(p)
    # The adapter's config describes the padded adapter (what save_adapter writes): rank
    # everywhere, the alpha of layers that differ from the default under their exact paths.
    alpha = config.alpha * _alpha_factor(rank, config.r, rslora)
    alphas = {
        re.escape(p): layer.record(adapter_name).alpha
        for p, layer in layers
        if layer.record(adapter_name).alpha != alpha
    }
    adapters.set(
        adapter_name, config.replace(r=rank, alpha=alpha, rank_pattern={}, alpha_pattern=alphas)
    )
    return padded


def _alpha_factor(rank: int, r: int, rslora: bool) -> float:
    """What alpha is multiplied by so rank ``rank`` keeps rank ``r``'s scale."""
    return math.sqrt(rank / r) if rslora else rank / r
