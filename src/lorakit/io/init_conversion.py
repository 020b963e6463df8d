"""Adapter files of inits that rewrote the base (PiSSA, OLoRA, LoftQ: ``layers/init.py``).

An adapter whose init rewrote the base (PiSSA, OLoRA: ``layers/init.py``) is saved converted to a
plain LoRA of the original base, as PEFT's ``path_initial_model_for_weight_conversion`` does:
ΔW = s (B A - B₀ A₀) = s [B | -B₀] [A ; A₀], rank 2r, alpha doubled (×√2 with rsLoRA) so the scale
is the same, ``init_lora_weights: true``; with the original base's fingerprint. The file works on
the untouched base in lorakit, PEFT and any engine reading PEFT's layout. A LoftQ adapter is saved
as it is, for its 4-bit base, ``init_lora_weights: "loftq"`` (as PEFT does): loaded on the
full-precision base it starts LoftQ again (deterministic) and gets that base; on a 4-bit base it
loads as a plain LoRA, which is exact on ``lorakit.quantize(W)`` when ``loftq_iter`` is 1 (the
fingerprint, of the 4-bit base, checks it). A PEFT file saved without conversion
(``init_lora_weights: "pissa"`` or ``"olora"``) is loaded as PEFT loads it: the init is computed
again on the base given, then the file's A and B replace the started ones; ``"pissa_niter_K"``
(a randomised SVD whose residual cannot be computed again) is refused.

Two notes against PEFT: with rsLoRA PEFT doubles ``alpha_pattern`` values (scale ×√2 for those
modules); here each alpha is scaled by √2, keeping every scale. On a quantized residual (QPiSSA)
the converted file on the full-precision W gives W_res + s B A, the trained model without the
residual's rounding, and on Q(W) it is off by Q(W) - Q(W_res) - s B₀ A₀ (PEFT warns of the
same); keep the trained model on its own base, or merge it, where that gap matters.
"""

from __future__ import annotations

import math
from pathlib import Path

from torch import nn

from ..config import LoraConfig
from ..errors import AdapterFileError
from ..layers import init as base_init
from ..model import lora_layers
from ..targeting import plan


def converted(model, adapter_name, config, peft_dict, required, tensors) -> dict:
    """A base-changing adapter as the plain LoRA of the original base it equals (module
    docstring): its A and B in ``tensors`` (as written: whole, on the CPU, gathered under FSDP)
    replaced by [A ; A₀] and [B | -B₀], the config's ranks doubled and alphas scaled to keep
    each scale. Returns the config's PEFT dict for the file."""
    layers = dict(lora_layers(model))
    for key, slot in required.items():
        if slot.role not in ("lora_A", "lora_B"):
            continue
        layer = layers.get(slot.module)
        if layer is None or base_init.base_change(layer, adapter_name) is None:
            raise AdapterFileError(
                f"{slot.module}: adapter {adapter_name!r} (init={config.init!r}) has no record "
                "of how it started here, so it cannot be converted to a plain LoRA"
            )
        tensors[key] = base_init.converted(
            tensors[key], layer, adapter_name, slot.role == "lora_A"
        ).contiguous()
    factor = math.sqrt(2) if config.use_rslora else 2
    data = dict(peft_dict, init_lora_weights=True, r=2 * peft_dict["r"])
    data["lora_alpha"] = peft_dict["lora_alpha"] * factor
    data["rank_pattern"] = {k: 2 * v for k, v in peft_dict["rank_pattern"].items()}
    data["alpha_pattern"] = {k: v * factor for k, v in peft_dict["alpha_pattern"].items()}
    data.pop("loftq_config", None)
    return data


def init_on_load(model: nn.Module, config: LoraConfig, path: Path) -> LoraConfig:
    """The config to inject a file's adapter with, when its init rewrites the base (module
    docstring): PiSSA and OLoRA are started again on the base given (then the file's tensors
    replace A and B); LoftQ too on a full-precision base, and as a plain LoRA on a 4-bit one."""
    if config.init.startswith("pissa_niter_"):
        raise AdapterFileError(
            f"the adapter at {path} was saved without conversion (init_lora_weights="
            f"{config.init!r}): it needs the residual base its randomised SVD left, which cannot "
            "be computed again. Save it from PEFT with path_initial_model_for_weight_conversion "
            "(a plain LoRA of the original base), or use init 'pissa' (exact SVD)"
        )
    if config.init == "loftq":
        rows = plan(model, config).rows
        weights = [(model.get_submodule(r.path) if r.path else model).weight for r in rows]
        if weights and all(getattr(w, "quant_type", None) for w in weights):
            return config.replace(init="kaiming")
    return config
