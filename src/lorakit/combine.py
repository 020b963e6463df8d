"""Adapter arithmetic: build a new adapter from weighted existing ones.

Every method works layer by layer on the adapters' low-rank updates. Writing an adapter's update in
the common shape ``ΔW_i = s_i · B_i A_i`` (out × in; convolution kernels and embedding tables
flattened the same way), with weights ``w_i``:

``cat`` (exact)
    ``ΔW = Σ w_i ΔW_i`` exactly, by concatenating ranks: ``A = [A_1; A_2; ...]``,
    ``B = [w_1 s_1 B_1, w_2 s_2 B_2, ...]``; the new rank is the sum of the ranks.
``linear``
    PEFT's "linear": all adapters must share one rank r; ``A = Σ √(w_i s_i) A_i`` and
    ``B = Σ √(w_i s_i) B_i``. Cheap and keeps rank r, but the product has cross terms
    ``B_i A_j``, so it is exact only for one adapter. Weights must be non-negative.
``svd``
    the exact weighted sum ``Σ w_i ΔW_i`` truncated to ``rank`` by a singular value decomposition
    (the best rank-``rank`` approximation in Frobenius norm, Eckart-Young).
``ties`` (Yadav et al. 2023, TIES-Merging)
    per adapter, keep the ``density`` fraction of ``w_i ΔW_i`` entries largest in magnitude;
    elect each entry's sign by the sign of the sum; average the kept entries that agree with it;
    then truncate to ``rank`` by SVD.
``dare_linear`` / ``dare_ties`` (Yu et al. 2023, DARE)
    drop each entry of ``ΔW_i`` with probability ``1 - density`` (seeded) and rescale the rest by
    ``1 / density``; then sum with weights (``dare_linear``) or merge with TIES' sign election
    (``dare_ties``); then truncate to ``rank`` by SVD.

The new adapter has scale 1 (alpha = r in every layer) and is added beside the others; the model
is otherwise unchanged. Adapters on fused slices cannot be combined yet.
"""

from __future__ import annotations

import math
import numbers
import re
from collections.abc import Mapping

import torch
from torch import nn

from .config import LoraConfig
from .errors import ConfigError
from .layers import AdapterRecord, LoraLayer
from .model import adapter_configs, check_adapter_name, lora_layers, registry

METHODS = ("linear", "cat", "svd", "ties", "dare_linear", "dare_ties")
_NEEDS_RANK = ("svd", "ties", "dare_linear", "dare_ties")


def combine(
    model: nn.Module,
    weights: Mapping[str, float],
    method: str = "cat",
    name: str = "combined",
    *,
    rank: int | None = None,
    density: float = 1.0,
    seed: int = 0,
) -> str:
    """Add adapter ``name`` combining ``{adapter: weight}`` by ``method``; returns ``name``.

    ``rank``: the new rank for ``svd``/``ties``/``dare_*`` (default: the sum of the combined
    ranks in each layer, at most min(in, out)). ``density``: fraction of entries kept by
    ``ties``/``dare_*``, in (0, 1]. ``seed``: the random drop pattern of ``dare_*``.

    Bad arguments are one ``ConfigError`` listing every problem; the model is left unchanged
    (the new adapter is added to every layer or to none).
    """
    check_adapter_name(name)
    _check_request(model, weights, method, name, rank, density, seed)

    gen = torch.Generator().manual_seed(seed)
    results: dict[str, tuple[LoraLayer, torch.Tensor, torch.Tensor]] = {}
    for path, layer in lora_layers(model):
        present = [(n, float(w)) for n, w in weights.items() if n in layer.lora_A]
        if not present:
            continue
        if getattr(layer, "slices", None) is not None:
            raise ConfigError(
                f"{path}: adapters on fused slices cannot be combined yet; merge them one at a time"
            )
        dora = [n for n, _ in present if layer.records[n].variant is not None]
        if dora:
            raise ConfigError(
                f"{path}: DoRA adapter(s) {dora} cannot be combined: a DoRA update is not a sum "
                "of low-rank terms (its rows are rescaled by a magnitude); merge it instead"
            )
        a, b = _combine_layer(layer, present, method, rank, density, gen, path)
        results[path] = (layer, a, b)

    if not results:
        raise ConfigError(f"cannot combine adapters: no LoRA layer holds any of {list(weights)}")
    ranks = {path: a.shape[0] for path, (_, a, _) in results.items()}
    top = max(ranks.values())
    added = []
    try:  # all or nothing: a layer that cannot take the adapter leaves none with it
        for layer, a, b in results.values():
            r = a.shape[0]
            dtype = layer.lora_A[next(n for n in weights if n in layer.lora_A)].dtype
            layer.add_adapter(name, AdapterRecord(r, float(r), 1.0), dtype=dtype)
            added.append(layer)
            with torch.no_grad():
                layer.lora_A[name].copy_(a.reshape(layer.lora_A[name].shape))
                layer.lora_B[name].copy_(b.reshape(layer.lora_B[name].shape))
    except BaseException:
        for layer in added:
            layer.delete_adapter(name)
        raise
    pattern = {re.escape(p): r for p, r in ranks.items() if r != top}
    config = LoraConfig(
        r=top,
        alpha=float(top),
        target_modules=sorted(ranks),
        rank_pattern=pattern,
        alpha_pattern={k: float(v) for k, v in pattern.items()},
    )
    registry(model).set(name, config)
    return name


def _is_number(value: object) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _check_request(model, weights, method, name, rank, density, seed) -> None:
    """Every problem with ``combine``'s arguments, raised at once as a ConfigError."""
    problems = []
    if not isinstance(model, nn.Module):
        problems.append(
            f"model: expected a torch.nn.Module with adapters, got {type(model).__name__}"
        )
    configs = adapter_configs(model) if isinstance(model, nn.Module) else {}
    if not isinstance(method, str) or method not in METHODS:
        problems.append(f"method={method!r}: expected one of {', '.join(METHODS)}")
    if name in configs:
        problems.append(f"name={name!r}: an adapter of that name already exists")
    if not isinstance(weights, Mapping):
        example = ", ".join(f"{n!r}: 0.5" for n in list(configs)[:2]) or "'a': 0.5, 'b': 0.5"
        problems.append(
            f"weights={_short(weights)}: expected a mapping {{adapter name: weight}} "
            f"such as {{{example}}}, got a {type(weights).__name__}"
        )
    elif not weights:
        problems.append("weights: expected at least one {adapter: weight}")
    else:
        unknown = [n for n in weights if n not in configs]
        if unknown:
            problems.append(f"unknown adapter(s) {unknown}; adapters: {', '.join(configs)}")
        for n, w in weights.items():
            if not _is_number(w) or not math.isfinite(w):
                problems.append(f"weight of {n!r}={w!r}: expected a finite number")
        if method == "linear" and any(w < 0 for w in weights.values() if _is_number(w)):
            problems.append("method='linear' needs non-negative weights (use 'cat' or 'svd')")
    if not _is_number(density) or not 0.0 < density <= 1.0:
        problems.append(f"density={density!r}: expected a number in (0, 1]")
    if rank is not None and (not isinstance(rank, int) or isinstance(rank, bool) or rank <= 0):
        problems.append(f"rank={rank!r}: expected a positive integer or None")
    if not isinstance(seed, int) or isinstance(seed, bool) or not -(2**63) <= seed < 2**64:
        problems.append(f"seed={seed!r}: expected an integer that fits in 64 bits")
    if problems:
        raise ConfigError("cannot combine adapters:\n  - " + "\n  - ".join(problems))


def _short(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _factors(layer: LoraLayer, name: str) -> tuple[torch.Tensor, torch.Tensor, float]:
    """(A (r, in_flat), B (out, r), s) of one adapter in float32."""
    a = layer.lora_A[name].detach().float().flatten(1)
    b = layer.effective_B(name).detach().float().flatten(1)
    return a, b, layer.record(name).scale


def _combine_layer(layer, present, method, rank, density, gen, path):
    factors = [(_factors(layer, n), w) for n, w in present]
    if method == "cat":
        a = torch.cat([f[0] for f, _ in factors], 0)
        b = torch.cat([f[1] * (w * f[2]) for f, w in factors], 1)
        return a, b
    if method == "linear":
        ranks = {f[0].shape[0] for f, _ in factors}
        if len(ranks) > 1:
            raise ConfigError(
                f"{path}: method='linear' needs adapters of one rank, found ranks {sorted(ranks)} "
                "(use 'cat' or 'svd')"
            )
        a = sum(f[0] * math.sqrt(w * f[2]) for f, w in factors)
        b = sum(f[1] * math.sqrt(w * f[2]) for f, w in factors)
        return a, b
    deltas = [w * f[2] * (f[1] @ f[0]) for f, w in factors]  # (out, in) each
    if method == "svd":
        total = sum(deltas)
    elif method == "ties":
        total = _ties([_trim(d, density) for d in deltas])
    elif method == "dare_linear":
        total = sum(_dare(d, density, gen) for d in deltas)
    else:  # dare_ties
        total = _ties([_dare(d, density, gen) for d in deltas])
    new_rank = rank or sum(f[0].shape[0] for f, _ in factors)
    return _truncate(total, new_rank)


def _trim(delta: torch.Tensor, density: float) -> torch.Tensor:
    """Keep the ``density`` fraction of entries largest in magnitude (TIES' trim step)."""
    if density >= 1.0:
        return delta
    k = max(1, int(round(density * delta.numel())))
    threshold = delta.abs().flatten().kthvalue(delta.numel() - k + 1).values
    return torch.where(delta.abs() >= threshold, delta, torch.zeros_like(delta))


def _dare(delta: torch.Tensor, density: float, gen: torch.Generator) -> torch.Tensor:
    """Drop entries with probability 1 - density and rescale the rest (DARE)."""
    if density >= 1.0:
        return delta
    keep = torch.rand(delta.shape, generator=gen) < density
    return torch.where(keep.to(delta.device), delta / density, torch.zeros_like(delta))


def _ties(deltas: list[torch.Tensor]) -> torch.Tensor:
    """Elect a sign per entry (sign of the sum) and average the entries that agree with it."""
    stacked = torch.stack(deltas)  # (n, out, in)
    sign = torch.sign(stacked.sum(0))
    agree = (torch.sign(stacked) == sign) & (stacked != 0)
    count = agree.sum(0).clamp(min=1)
    return (stacked * agree).sum(0) / count


def _truncate(delta: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Best rank-``rank`` factors of ``delta``: B = U √S, A = √S Vᵀ."""
    rank = min(rank, *delta.shape)
    u, s, vh = torch.linalg.svd(delta, full_matrices=False)
    root = s[:rank].sqrt()
    return root[:, None] * vh[:rank], u[:, :rank] * root[None, :]
