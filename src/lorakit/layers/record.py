"""``AdapterRecord``: what one adapter of one layer is, apart from its tensors.

A LoRA layer keeps one record per adapter beside its ``lora_A`` / ``lora_B`` ParameterDicts (whose
keys, and so PEFT's file keys, do not change). The record is frozen: whatever changes an adapter's
shape or scale (padding its rank, a hot swap) goes through a method of the layer, which replaces
the record and the tensors together.
"""

from __future__ import annotations

import dataclasses

import torch


@dataclasses.dataclass(frozen=True, slots=True)
class AdapterRecord:
    """One adapter's rank, alpha, scale and dropout in one layer.

    ``scale`` is what multiplies ``B A`` (``alpha / rank``, or ``alpha / √rank`` with rsLoRA; the
    config computes it). ``variant`` names a LoRA variant whose extra math the layer applies
    (None: plain LoRA), so one record serves the variants to come.
    """

    rank: int
    alpha: float
    scale: float
    dropout: float = 0.0
    variant: str | None = None

    def replace(self, **changes) -> AdapterRecord:
        return dataclasses.replace(self, **changes)


def pad_rank(t: torch.Tensor, dim: int, blocks: int, rank: int) -> torch.Tensor:
    """``t`` whose axis ``dim`` holds ``blocks`` slices of rank r, each zero-padded to ``rank``.

    A (blocks·r, in) -> (blocks·rank, in): rows r..rank of each slice are zero; B (out, r) ->
    (out, rank): columns r..rank are zero. ``B A`` is unchanged: the added terms are 0 · 0.
    """
    shape = tuple(t.shape)
    r = shape[dim] // blocks
    if r == rank:
        return t
    split = (*shape[:dim], blocks, r, *shape[dim + 1 :])
    out = t.new_zeros((*shape[:dim], blocks, rank, *shape[dim + 1 :]))
    out.narrow(dim + 1, 0, r).copy_(t.reshape(split))
    return out.reshape((*shape[:dim], blocks * rank, *shape[dim + 1 :]))
