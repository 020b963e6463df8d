"""Targeting: from a model and a ``LoraConfig`` to a *plan*, one row per module to adapt.

Pure: reads module types, names and weight shapes only, never mutates the model, and works on a
model built on the ``meta`` device, so the adapters of a 175B-parameter configuration can be counted
in seconds with no memory.

Matching rules (the same as PEFT's, so configs carry over):

* a list of names matches a module whose path equals a name or ends with ``"." + name``;
* a single string is a regular expression that must match the whole module path;
* ``"all-linear"`` matches every ``nn.Linear`` / GPT-2 ``Conv1D`` except the output head;
* ``rank_pattern`` / ``alpha_pattern`` keys match a path that fully matches the key or ends with
  ``"." + key``; the first matching key wins;
* ``layers`` keeps modules whose layer index (the first integer in the path) is listed.

Every pattern must match something: a target, exclusion, rank/alpha/slice pattern or saved module
that matches nothing is an error naming the closest module names.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
from typing import Any

from torch import nn

from . import layers as L
from .config import ALL_LINEAR, LoraConfig
from .errors import TargetError, gather
from .quant import quantized_weights


@dataclasses.dataclass(frozen=True)
class PlanRow:
    """One module to adapt."""

    path: str
    kind: str
    module_type: str
    in_features: int
    out_features: int
    shape: str
    r: int
    alpha: float
    scaling: float
    params: int
    slices: tuple[bool, ...] | None = None


@dataclasses.dataclass(frozen=True)
class Plan:
    """What ``apply_lora`` would do: the rows, the saved modules, and parameter totals."""

    rows: tuple[PlanRow, ...]
    saved: tuple[tuple[str, int], ...]  # (path, parameters of the trainable copy)
    bias_params: int  # base bias parameters the bias mode makes trainable
    base_params: int  # parameters of the model as it is now

    @property
    def adapter_params(self) -> int:
        return sum(row.params for row in self.rows)

    @property
    def trainable(self) -> int:
        return self.adapter_params + sum(n for _, n in self.saved) + self.bias_params

    @property
    def total(self) -> int:
        return self.base_params + self.adapter_params + sum(n for _, n in self.saved)

    def to_dict(self) -> dict[str, Any]:
        return {
            "rows": [dataclasses.asdict(row) for row in self.rows],
            "modules_to_save": [{"path": p, "params": n} for p, n in self.saved],
            "adapter_params": self.adapter_params,
            "trainable": self.trainable,
            "total": self.total,
            "base_params": self.base_params,
        }

    def __str__(self) -> str:
        head = ("module", "kind", "shape", "r", "alpha", "params")
        body = [
            (r.path or "(root)", r.kind, r.shape, str(r.r), f"{r.alpha:g}", f"{r.params:,}")
            for r in self.rows
        ]
        body += [(p, "saved", "", "", "", f"{n:,}") for p, n in self.saved]
        widths = [max(len(x[i]) for x in [head, *body]) for i in range(len(head))]
        lines = [
            "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip()
            for row in [head, *body]
        ]
        lines.insert(1, "  ".join("-" * w for w in widths))
        lines.append(
            f"{len(self.rows)} modules, {self.adapter_params:,} adapter parameters; "
            + parameter_line(self.trainable, self.total)
        )
        return "\n".join(lines)


def parameter_line(trainable: int, total: int) -> str:
    """The one-line report: ``trainable 65,536 / 16,842,752 (0.39%)``."""
    pct = 100.0 * trainable / total if total else 0.0
    return f"trainable {trainable:,} / {total:,} ({pct:.2f}%)"


def layer_index(path: str) -> int | None:
    """The first integer component of a module path (``model.layers.3.mlp`` -> 3)."""
    for part in path.split("."):
        if part.isdigit():
            return int(part)
    return None


def suffix_match(path: str, name: str) -> bool:
    return path == name or path.endswith("." + name)


def pattern_match(path: str, key: str) -> bool:
    return re.fullmatch(rf"(?:.*\.)?(?:{key})", path) is not None


def _candidates(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Every module a config may name, skipping the insides of lorakit's own wrappers.

    A wrapper itself stays: a LoRA layer can take another adapter, a saved module another copy.
    """
    out, skip = [], None
    for path, module in model.named_modules():  # depth first: a wrapper's insides follow it
        if skip is not None and path.startswith(skip):
            continue
        if isinstance(module, (L.LoraLayer, L.SavedModule)):
            skip = f"{path}." if path else ""
        out.append((path, module))
    return out


def _output_head(model: nn.Module, modules: list[tuple[str, nn.Module]]) -> set[str]:
    getter = getattr(model, "get_output_embeddings", None)
    head = getter() if callable(getter) else None
    if head is not None:
        found = {p for p, m in modules if m is head}
        if found:
            return found
    return {p for p, _ in modules if p.split(".")[-1] == "lm_head"}


def _closest(key: str, modules: list[tuple[str, nn.Module]]) -> str:
    names = sorted({p.split(".")[-1] for p, _ in modules if p} | {p for p, _ in modules if p})
    close = difflib.get_close_matches(key, names, n=5, cutoff=0.5)
    return f"; closest module names: {', '.join(close)}" if close else ""


def plan(model: nn.Module, config: LoraConfig) -> Plan:
    """What ``apply_lora(model, config)`` would do, without doing it. See the module docstring."""
    if not isinstance(config, LoraConfig):
        raise TypeError(f"config must be a lorakit.LoraConfig, got {type(config).__name__}")
    modules = _candidates(model)
    problems: list[str] = []
    saved_paths = set()
    for name in config.modules_to_save or ():
        hits = [p for p, _ in modules if p and suffix_match(p, name)]
        if not hits:
            problems.append(
                f"modules_to_save entry {name!r} matches no module{_closest(name, modules)}"
            )
        saved_paths.update(hits)

    targets = config.target_modules
    chosen: dict[str, tuple[nn.Module, str]] = {}
    if targets == ALL_LINEAR:
        head = _output_head(model, modules)
        for path, module in modules:
            kind, _ = L.kind_of(module)
            if (
                kind
                and L.kind_class(kind).linear_like
                and path not in head
                and path not in saved_paths
            ):
                if not any(path.startswith(s + ".") for s in saved_paths):
                    chosen[path] = (module, kind)
        if not chosen:
            problems.append(
                "target_modules='all-linear' found no linear layer besides the output head"
            )
    else:
        entries = [targets] if isinstance(targets, str) else list(targets)
        for entry in entries:
            if isinstance(targets, str):
                hits = [(p, m) for p, m in modules if re.fullmatch(entry, p)]
                what = f"target_modules regex {entry!r}"
            else:
                hits = [(p, m) for p, m in modules if p and suffix_match(p, entry)]
                what = f"target_modules entry {entry!r}"
            if not hits:
                hint = _closest(entry.split(".")[-1], modules)
                if isinstance(targets, str) and any(
                    p and suffix_match(p, entry) for p, _ in modules
                ):
                    hint = (
                        "; a single string is a regular expression over the whole module path: "
                        f"write [{entry!r}] to match modules by name"
                    )
                problems.append(f"{what} matches no module{hint}")
                continue
            for path, module in hits:
                kind, reason = L.kind_of(module)
                if kind is None:
                    more = f" and {len(hits) - 1} more" if len(hits) > 1 else ""
                    problems.append(
                        f"{what} matches {path}{more}, which cannot be adapted: {reason}"
                    )
                    break
                chosen[path] = (module, kind)

    if config.exclude_modules is not None:
        excl = config.exclude_modules
        entries = [excl] if isinstance(excl, str) else list(excl)
        for entry in entries:
            if isinstance(excl, str):
                hits = {p for p, _ in modules if re.fullmatch(entry, p)}
            else:
                hits = {p for p, _ in modules if p and suffix_match(p, entry)}
            if not hits:
                problems.append(
                    f"exclude_modules entry {entry!r} matches no module{_closest(entry, modules)}"
                )
            for path in hits:
                chosen.pop(path, None)

    overlap = sorted(set(chosen) & saved_paths)
    if overlap:
        problems.append(f"modules {', '.join(overlap)} are both targeted and in modules_to_save")

    if config.layers is not None:
        present = {layer_index(p) for p in chosen}
        missing = sorted(set(config.layers) - present)
        if missing:
            have = sorted(i for i in present if i is not None)
            where = f"layers {have[0]} to {have[-1]}" if have else "no numbered layer"
            problems.append(
                f"layers {missing}: no targeted module has that layer index "
                f"(targeted modules are in {where})"
            )
        chosen = {p: v for p, v in chosen.items() if layer_index(p) in config.layers}

    for field in ("rank_pattern", "alpha_pattern", "fused_slices"):
        for key in getattr(config, field):
            if not any(pattern_match(p, key) for p in chosen):
                problems.append(f"{field} key {key!r} matches no targeted module")

    # Rows in the model's own order, whatever the order of the targets.
    order = {path: i for i, (path, _) in enumerate(modules)}
    chosen = dict(sorted(chosen.items(), key=lambda item: order[item[0]]))
    rows = []
    for path, (module, kind) in chosen.items():
        r = next((v for k, v in config.rank_pattern.items() if pattern_match(path, k)), config.r)
        alpha = next(
            (v for k, v in config.alpha_pattern.items() if pattern_match(path, k)), config.alpha
        )
        slices = next((v for k, v in config.fused_slices.items() if pattern_match(path, k)), None)
        if isinstance(module, L.LoraLayer):
            slices = getattr(module, "slices", None)
        in_f, out_f, shape = L.shape_of(module, kind)
        if slices is not None:
            if not L.kind_class(kind).linear_like:
                problems.append(f"fused_slices for {path}: only linear layers can be sliced")
                slices = None
            elif out_f % len(slices):
                problems.append(
                    f"fused_slices for {path}: {out_f} outputs do not split into {len(slices)} "
                    "equal slices"
                )
                slices = None
        rows.append(
            PlanRow(
                path=path,
                kind=kind,
                module_type=type(module).__name__,
                in_features=in_f,
                out_features=out_f,
                shape=shape,
                r=r,
                alpha=alpha,
                scaling=config.scaling(r, alpha),
                params=L.adapter_params(kind, in_f, out_f, r, module, slices),
                slices=slices,
            )
        )
    if not rows and not problems:
        problems.append("the configuration selects no module to adapt")
    gather(problems, TargetError, f"cannot target {type(model).__name__}")

    quantized = [w for _, w in quantized_weights(model)]
    seen = {id(p) for w in quantized for p in w.parameters()}  # its codes: counted as elements
    base_params = sum(w.numel() for w in quantized)
    for p in model.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            base_params += p.numel()
    saved = []
    for path in sorted(saved_paths):
        sub = model.get_submodule(path)
        if isinstance(sub, L.SavedModule):
            sub = sub.original_module
        trained = [p for p in sub.parameters() if p.is_floating_point()]  # as SavedModule trains
        saved.append((path, sum(p.numel() for p in trained)))
    return Plan(
        rows=tuple(rows),
        saved=tuple(saved),
        bias_params=_bias_params(model, config, {r.path for r in rows}, saved_paths),
        base_params=base_params,
    )


def _bias_params(model: nn.Module, config: LoraConfig, targeted: set[str], saved: set[str]) -> int:
    if config.bias == "none":
        return 0
    total = 0
    inside_saved = tuple(f"{p}." for p in saved)
    for path, module in model.named_modules():
        bias = module._parameters.get("bias")
        if bias is None or path in saved or path.startswith(inside_saved):
            continue  # a saved module's original stays frozen; its copy is counted in `saved`
        if config.bias == "all" or path in targeted:
            total += bias.numel()
    return total
