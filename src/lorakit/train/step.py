"""One optimizer step: gradient accumulation over micro-batches, clipping, the update.

The loss of a step is the mean over the trained tokens of all its micro-batches together (each
micro-batch's summed loss is divided by the step's token count before ``backward``), so
accumulating gives the same gradient as one large batch. Shared by the training loop and a
distributed run.
"""

from __future__ import annotations

import math
import time
from typing import Any

import torch
from torch import nn

from ..generate import IGNORE
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
) -> dict[str, Any]:
    """Accumulate, clip, step; returns the step's figures (loss, lr, grad_norm, tokens, ...)."""
    t0 = time.perf_counter()
    n_tokens = sum(int((b["labels"][:, 1:] != IGNORE).sum()) for b in micro)
    loss_sum = 0.0
    for batch in micro:  # gradient accumulation: sum over all trained tokens of the step
        loss, _ = token_loss(model, batch)
        (loss / n_tokens).backward()
        loss_sum += loss.item()
    if not math.isfinite(loss_sum):
        raise TrainingError(f"the loss is {loss_sum} at step {step}: lower training.lr")
    grad_norm = None
    if max_grad_norm:
        grad_norm = torch.nn.utils.clip_grad_norm_(params, max_grad_norm).item()
    lr = scheduler.get_last_lr()[0]
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    seconds = time.perf_counter() - t0
    tokens = sum(int(b["attention_mask"].sum()) for b in micro)
    return {
        "loss": loss_sum / n_tokens,
        "lr": lr,
        "grad_norm": grad_norm,
        "tokens": tokens,
        "tokens_per_s": tokens / seconds,
        "seconds": seconds,
    }
