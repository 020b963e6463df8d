"""LoRA+ (Hayou, Ghosh and Yu 2024, "LoRA+: Efficient Low Rank Adaptation of Large Models"):
``B`` learns faster than ``A``.

With the same learning rate for both matrices of ``h = W x + s · B A x``, LoRA's feature learning
is inefficient in wide models (the paper's section 3): the update of ``B`` (out, r) should be
larger than that of ``A`` (r, in) by a factor that grows with the width. LoRA+ sets
``lr_B = ratio · lr_A`` (the paper's ``λ``; 16 in PEFT's examples, the paper's experiments
between 2 and 32) and keeps everything else of the optimizer.

:func:`param_groups` sorts the trainable parameters into four optimizer groups by what they
are, found by identity from the LoRA layers (``lorakit.model.lora_layers``), never by their
names:

* ``A``: every ``A`` of a non-embedding layer, at ``lr``;
* ``B``: every ``B`` and every 1-D adapter tensor (DoRA's magnitudes) of a non-embedding layer,
  at ``lr · ratio``;
* ``embedding``: every adapter tensor of an embedding layer, at ``lr_embedding`` (by default
  1e-6, PEFT's);
* ``base``: anything else trainable (``modules_to_save`` copies, biases under ``lora.bias``),
  at ``lr``.

This is PEFT's ``create_loraplus_optimizer`` grouping with two differences: (1) PEFT sends
every 1-D trainable tensor (biases, LayerNorm weights of a saved module) to ``B``'s rate
without weight decay; lorakit keeps what is not an adapter's at the base rate, so LoRA+
changes only the adapters' rates. (2) Weight decay is ``training.weight_decay`` for every
group (no exemptions, as in a run without LoRA+), where PEFT's ``loraplus_weight_decay``
(default 0) applies to all but that no-decay group.

The groups are always the four, in this order, even when one is empty (a model without an
adapted embedding): a checkpoint's group layout then depends only on the config, and group 0
is always at ``lr`` (what the logs call the learning rate). The schedule
(:mod:`lorakit.train.schedule`) multiplies each group's own rate by the same factor.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from torch import nn

from ..model import lora_layers

#: the groups, in the optimizer's order
GROUPS = ("A", "B", "embedding", "base")


def roles(model: nn.Module) -> dict[int, str]:
    """The LoRA+ group of every adapter tensor of ``model``'s LoRA layers, by ``id`` of the
    parameter (as the model holds it now: after FSDP, the sharded one)."""
    found: dict[int, str] = {}
    for _, layer in lora_layers(model):
        embedding = layer.kind == "embedding"
        magnitudes = _magnitudes(layer)
        for name in layer.records:
            a, b = layer._A[name], layer._B[name]
            tensors = [*layer.adapter_tensors(name)]
            if name in magnitudes and all(m is not magnitudes[name] for m in tensors):
                tensors.append(magnitudes[name])
            for t in tensors:
                if embedding:
                    found[id(t)] = "embedding"
                elif t is b or (t is not a and t.ndim == 1):
                    found[id(t)] = "B"
                else:  # A, or another adapter matrix: A's rate, as PEFT gives every other one
                    found[id(t)] = "A"
    return found


def _magnitudes(layer: nn.Module) -> dict[str, nn.Parameter]:
    """DoRA's magnitude vectors of ``layer`` by adapter name (``_M``, or the ``lora_magnitude``
    ParameterDict it is read from); empty without DoRA."""
    found = getattr(layer, "_M", None)
    if found is None:
        module = layer._modules.get("lora_magnitude")
        found = module._parameters if module is not None else {}
    return found


def param_groups(
    model: nn.Module,
    params: Iterable[nn.Parameter],
    *,
    lr: float,
    ratio: float,
    lr_embedding: float,
    weight_decay: float,
) -> list[dict[str, Any]]:
    """The four LoRA+ groups of ``params`` (the trainable parameters, in their order), as
    ``torch.optim`` takes them: ``{"name", "params", "lr", "weight_decay"}``. ``model``: where
    the LoRA layers are (the model with names and parameters as one process has them)."""
    of = roles(model)
    rates = {"A": lr, "B": lr * ratio, "embedding": lr_embedding, "base": lr}
    groups = {
        g: {"name": g, "params": [], "lr": rates[g], "weight_decay": weight_decay} for g in GROUPS
    }
    for p in params:
        groups[of.get(id(p), "base")]["params"].append(p)
    return [groups[g] for g in GROUPS]


def describe(groups: list[dict[str, Any]]) -> str:
    """One line naming each group that holds tensors, how many, and its peak learning rate
    (``initial_lr``: the rate before the schedule's factor, once a schedule is built)."""
    parts = [
        f"{g['name']} {len(g['params'])} tensors at lr {g.get('initial_lr', g['lr']):.3g}"
        for g in groups
        if g["params"]
    ]
    return "LoRA+ optimizer groups: " + ", ".join(parts)
