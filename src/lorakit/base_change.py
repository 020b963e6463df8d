"""The model-level half of the inits that rewrite the base (PiSSA, OLoRA, LoftQ).

The math and what each adapter keeps are in ``layers/init.py``; here is what needs the whole
model: which layers ``apply_lora`` refuses to start that way (checked before anything changes,
all named at once), and which adapters cannot be taken away because their base cannot be put
back (a quantized residual).
"""

from __future__ import annotations

from torch import nn

from .config import LoraConfig
from .errors import AdapterError, ConfigError, gather
from .layers import LoraLayer
from .layers import init as base_init


def check_base_init(
    model: nn.Module, the_plan, config: LoraConfig, quantize_base: bool = False
) -> None:
    """Refuse, before anything changes, layers a base-changing ``init`` cannot start (all named
    at once): see ``layers.init.problem``; a weight tied to another module, too (rewriting it
    would change that module)."""
    owners: dict[int, list[str]] = {}
    for path, module in model.named_modules(remove_duplicate=False):
        for pname, param in module._parameters.items():
            if param is not None:
                owners.setdefault(id(param), []).append(f"{path}.{pname}" if path else pname)
    problems = []
    for row in the_plan.rows:
        module = model.get_submodule(row.path) if row.path else model
        found = base_init.problem(
            module, row.kind, row.slices, config.init, config.use_dora, row.r, quantize_base
        )
        tied = [k for k in owners.get(id(getattr(module, "weight", None)), [])]
        if not found and len(tied) > 1:
            found = f"its weight is tied to {', '.join(tied[1:])}; {config.init} would rewrite both"
        if found:
            problems.append(f"{row.path or '(root)'}: {found}")
    gather(problems, ConfigError, f"init={config.init!r} cannot start these layers")


def check_restorable(model: nn.Module, names: list[str], doing: str) -> None:
    """Refuse to take away adapters whose base change cannot be undone (a quantized residual)."""
    stuck = [
        f"{path} ({name}: {base_init.base_change(layer, name).init})"
        for path, layer in _lora_layers(model)
        for name in names
        if (change := base_init.base_change(layer, name)) is not None and not change.restorable
    ]
    if stuck:
        raise AdapterError(
            f"{doing}: the base of {len(stuck)} layer(s) was replaced by a quantized residual "
            f"when the adapter started ({', '.join(stuck[:3])}{', ...' if len(stuck) > 3 else ''}"
            "); the original 4-bit codes cannot be rebuilt from it. merge_and_unload gives the "
            "trained model; load the base again for the original"
        )


def _lora_layers(model: nn.Module):
    return ((p, m) for p, m in model.named_modules() if isinstance(m, LoraLayer))
