"""The learning-rate schedule: linear warmup, then cosine or linear decay (or constant).

``lr(step) = lr · factor(step)`` where, for ``w`` warmup steps and ``T`` steps in all,

* warmup, ``step < w``: ``factor = (step + 1) / w`` (never 0, so the first step moves);
* then, with ``p = (step - w) / (T - w)`` going from 0 to 1 and floor ``m = min_lr_ratio``:
  cosine ``m + (1 - m) · (1 + cos(pi · p)) / 2``; linear ``m + (1 - m) · (1 - p)``; constant 1.

Cosine decay after warmup is the schedule of the GPT-3 and Llama papers; it is built on
``torch.optim.lr_scheduler.LambdaLR`` so its state saves and loads with the optimizer's.
"""

from __future__ import annotations

import math

import torch


def factor(step: int, total: int, warmup: int, kind: str, min_ratio: float = 0.0) -> float:
    """The multiplier of the base learning rate at optimizer step ``step`` (0-based)."""
    if step < warmup:
        return (step + 1) / warmup
    if kind == "constant":
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    if kind == "cosine":
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
    if kind == "linear":
        return min_ratio + (1 - min_ratio) * (1 - progress)
    raise ValueError(f"unknown schedule {kind!r}")


def build(
    optimizer: torch.optim.Optimizer, total: int, warmup: int, kind: str, min_ratio: float = 0.0
) -> torch.optim.lr_scheduler.LambdaLR:
    """A scheduler to ``step()`` once after every optimizer step."""
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: factor(step, total, warmup, kind, min_ratio)
    )
