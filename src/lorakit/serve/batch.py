"""The running batch's key/value cache: one row per sequence, left-padded to a common length.

The prompts admitted together are prefilled in one forward, left-padded to the longest, each row
with its own adapter, which gives a cache ``(prompts, heads, P, head_dim)`` per layer with every
prompt's tokens right-aligned. Joining the batch pads the narrower side on the left with zeros to
the wider one and stacks the rows; a row's padding is masked out of attention by
the step's ``attention_mask`` and its positions come from ``position_ids``, so every row attends
to exactly its own tokens at its own positions, as it would alone. Leaving selects the remaining
rows and cuts the columns that every row has as padding.

Shapes: ``keys[l]``, ``values[l]``: (rows, kv_heads, width, head_dim); ``lengths[i]``: the real
tokens of row ``i`` (its padding is ``width - lengths[i]``).
"""

from __future__ import annotations

import inspect

import torch
from torch import nn

from ..errors import LorakitError


class CacheError(LorakitError, RuntimeError):
    """The model's key/value cache is of a kind the server cannot batch."""


def cache_keyword(model: nn.Module) -> str:
    """The forward keyword that takes a cache: ``cache`` in newer transformers, else
    ``past_key_values``."""
    params = inspect.signature(model.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def keeps_last_logits(model: nn.Module) -> bool:
    """Whether the model's forward takes ``logits_to_keep`` (computes only the last positions'
    logits, which is all a prefill needs)."""
    return "logits_to_keep" in inspect.signature(model.forward).parameters


def new_cache():
    from transformers import DynamicCache

    return DynamicCache()


def layers_of(cache) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The (keys, values) of each layer of a transformers ``DynamicCache``."""
    from transformers.cache_utils import DynamicLayer

    out = []
    for layer in cache.layers:
        if type(layer) is not DynamicLayer:
            raise CacheError(
                f"the model's cache has a layer of kind {type(layer).__name__}; the server batches "
                "only full-attention caches (DynamicLayer)"
            )
        out.append((layer.keys, layer.values))
    return out


def _pad_left(t: torch.Tensor, n: int) -> torch.Tensor:
    if n == 0:
        return t
    return torch.cat([t.new_zeros(t.shape[:2] + (n,) + t.shape[3:]), t], dim=2)


class BatchCache:
    """The stacked cache of the running rows (see the module docstring)."""

    def __init__(self) -> None:
        self.keys: list[torch.Tensor] = []
        self.values: list[torch.Tensor] = []
        self.lengths: list[int] = []

    @property
    def width(self) -> int:
        return self.keys[0].shape[2] if self.keys else 0

    def __len__(self) -> int:
        return len(self.lengths)

    def join(self, layers: list[tuple[torch.Tensor, torch.Tensor]], lengths, copies) -> None:
        """Add the rows of one prefill: ``layers`` hold ``len(lengths)`` prompts, each
        right-aligned (left padding, masked); prompt ``i`` becomes ``copies[i]`` rows (its
        ``n`` choices), in order."""
        rows = [i for i, c in enumerate(copies) for _ in range(c)]
        new_w = layers[0][0].shape[2]
        width = max(self.width, new_w)
        index = None
        if rows != list(range(layers[0][0].shape[0])):
            index = torch.tensor(rows, device=layers[0][0].device)

        def rows_of(t: torch.Tensor) -> torch.Tensor:
            picked = t if index is None else t.index_select(0, index)
            return _pad_left(picked, width - new_w)

        grow = width - self.width
        if not self.keys:
            keys = [rows_of(k).contiguous() for k, _ in layers]
            values = [rows_of(v).contiguous() for _, v in layers]
        else:
            keys = [
                torch.cat([_pad_left(o, grow), rows_of(k)]) for o, (k, _) in zip(self.keys, layers)
            ]
            values = [
                torch.cat([_pad_left(o, grow), rows_of(v)])
                for o, (_, v) in zip(self.values, layers)
            ]
        self.keys, self.values = keys, values
        self.lengths += [lengths[i] for i in rows]

    def keep(self, rows: list[int]) -> None:
        """Keep only ``rows`` (in that order); columns that are padding in all of them go."""
        if not rows:
            self.keys, self.values, self.lengths = [], [], []
            return
        self.lengths = [self.lengths[i] for i in rows]
        cut = self.width - max(self.lengths)
        index = torch.tensor(rows, device=self.keys[0].device)
        self.keys = [k.index_select(0, index)[:, :, cut:] for k in self.keys]
        self.values = [v.index_select(0, index)[:, :, cut:] for v in self.values]

    def step_inputs(self) -> tuple[object, torch.Tensor, torch.Tensor]:
        """(a transformers cache over the rows, attention_mask (rows, width + 1), position_ids
        (rows, 1)) for a forward of one new token per row."""
        cache = new_cache()
        for i, (k, v) in enumerate(zip(self.keys, self.values)):
            cache.update(k, v, i)
        device = self.keys[0].device
        width = self.width
        lengths = torch.tensor(self.lengths, device=device)
        columns = torch.arange(width + 1, device=device)
        mask = (columns[None, :] >= (width - lengths)[:, None]).long()
        return cache, mask, lengths[:, None]

    def after_step(self, cache) -> None:
        """Take the cache the forward extended by one column."""
        layers = layers_of(cache)
        self.keys = [k for k, _ in layers]
        self.values = [v for _, v in layers]
        self.lengths = [n + 1 for n in self.lengths]
