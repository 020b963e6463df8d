"""One optimizer step: gradient accumulation over micro-batches, clipping, the update.

The loss of a step is the mean over the trained tokens of all its micro-batches together (each
micro-batch's summed loss is divided by the step's token count before ``backward``), so
accumulating gives the same gradient as one large batch. In a distributed run each process
holds its share of every micro-batch: the step's token count and loss are summed over the
processes, and the gradient is one process's (see :mod:`lorakit.train.distributed`).
"""

from __future__ import annotations

import contextlib
import math
import time
from typing import Any

import torch
from torch import nn

from ..generate import IGNORE
from .distributed import World, full
from .loss import token_loss
from .output import TrainingError


def train_step(
    model: nn.Module,
    micro: list[dict[str, torch.Tensor]],
    params: list[nn.Parameter],
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    max_grad_norm: float | None,
    step: int,
    world: World | None = None,
) -> dict[str, Any]:
    """Accumulate, clip, step; returns the step's figures (loss, lr, grad_norm, tokens, ...).
    ``world``: a distributed run's processes (``micro`` holds this process's share)."""
    world = world or World()
    t0 = time.perf_counter()
    mine = sum(int((b["labels"][:, 1:] != IGNORE).sum()) for b in micro)
    (n_tokens,) = world.sum(mine)
    n_tokens = max(n_tokens, 1.0)
    scale = world.grad_scale / n_tokens
    loss_sum = 0.0
    for i, batch in enumerate(micro):  # gradient accumulation: sum over the step's tokens
        with _no_sync(model, last=i == len(micro) - 1):
            loss, _ = token_loss(model, batch)
            (loss * scale).backward()
        loss_sum += loss.item()
    tokens = sum(int(b["attention_mask"].sum()) for b in micro)
    loss_sum, tokens = world.sum(loss_sum, tokens)
    if not math.isfinite(loss_sum):
        raise TrainingError(f"the loss is {loss_sum} at step {step}: lower training.lr")
    grad_norm = None
    if max_grad_norm:
        grad_norm = full(torch.nn.utils.clip_grad_norm_(params, max_grad_norm)).item()
    lr = scheduler.get_last_lr()[0]
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    seconds = time.perf_counter() - t0
    return {
        "loss": loss_sum / n_tokens,
        "lr": lr,
        "grad_norm": grad_norm,
        "tokens": int(tokens),
        "tokens_per_s": tokens / seconds,
        "seconds": seconds,
    }


def _no_sync(model: nn.Module, last: bool):
    """DDP's ``no_sync`` for the micro-batches before a step's last one (their gradients are
    all-reduced once, with the last one's); nothing otherwise."""
    if last or not hasattr(model, "no_sync"):
        return contextlib.nullcontext()
    return model.no_sync()
