"""Mixed-adapter batches at the model level: ``adapter_per_row`` puts one row plan in force for
a block (``layers/rows.py`` computes it), ``kept_tokens`` for an output head that sees only some
tokens of every row."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import torch
from torch import nn

from . import layers as L
from .errors import AdapterError, MergeError
from .registry import registry


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
