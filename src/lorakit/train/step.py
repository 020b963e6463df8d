"""One optimizer step: gradient accumulation over micro-batches, clipping, the update.

The loss of a step is the mean over the trained tokens of all its micro-batches together (each
micro-batch's summed loss is divided by the step's token count before ``backward``), so
accumulating gives the same gradient as one large batch. In a distributed run each process
holds its share of every micro-batch: the step's token count and loss are summed over the
processes, and the gradient is one process's (see :mod:`lorakit.train.distributed`).
:func:`adapters_step` does the same for many adapters at once, each on its own rows.
"""

from __future__ import annotations

import contextlib
import math
import time
from typing import Any

import torch
from torch import nn
from torch.nn.utils import clip_grad_norm_

from ..generate import IGNORE
from .distributed import World, full
from .loss import group_losses, token_loss
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
    _check_finite(loss_sum, step)
    lr, (grad_norm,) = _update([params], optimizer, scheduler, max_grad_norm)
    return _figures(loss_sum / n_tokens, lr, grad_norm, tokens, time.perf_counter() - t0)


def adapters_step(
    model: nn.Module,
    inner: nn.Module,
    micro: list[tuple[dict[str, torch.Tensor], torch.Tensor]],
    names: list[str],
    params: list[list[nn.Parameter]],
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    max_grad_norm: float | None,
    step: int,
    world: World | None = None,
) -> dict[str, dict[str, Any]]:
    """One step of many adapters at once; each adapter's figures, by name.

    ``micro``: (batch, adapter of each row as an index into ``names``) per micro-batch, the
    rows of every adapter in one forward under ``adapter_per_row`` (``inner``: the model
    without DDP's wrapper). Each adapter's loss is divided by its own trained tokens (over the
    step's micro-batches and every process) and each adapter's gradient is clipped by itself
    (``params[a]``: adapter ``a``'s parameters), so each adapter takes the step its own run alone
    would; the schedule is shared."""
    from ..model import adapter_per_row

    world = world or World()
    t0 = time.perf_counter()
    k = len(names)
    trained, tokens = torch.zeros(k, dtype=torch.long), torch.zeros(k, dtype=torch.long)
    for batch, group in micro:
        trained.index_add_(0, group, (batch["labels"][:, 1:] != IGNORE).sum(1).cpu())
        tokens.index_add_(0, group, batch["attention_mask"].sum(1).cpu())
    n_tokens = [max(n, 1.0) for n in world.sum(*trained.tolist())]
    scale = torch.tensor([world.grad_scale / n for n in n_tokens])
    loss_sums = torch.zeros(k, dtype=torch.float64)
    for i, (batch, group) in enumerate(micro):
        rows = [names[g] for g in group.tolist()]
        with _no_sync(model, last=i == len(micro) - 1), adapter_per_row(inner, rows):
            losses = group_losses(model, batch, group, k)  # (k,) summed over each one's tokens
            (losses * scale.to(losses.device)).sum().backward()  # in the block: recomputation
        loss_sums += losses.detach().double().cpu()  # (gradient checkpointing) needs the plan
    summed = world.sum(*loss_sums.tolist(), *tokens.tolist())
    for value in summed[:k]:
        _check_finite(value, step)
    lr, norms = _update(params, optimizer, scheduler, max_grad_norm)
    seconds = time.perf_counter() - t0
    return {
        name: _figures(summed[a] / n_tokens[a], lr, norms[a], summed[k + a], seconds)
        for a, name in enumerate(names)
    }


def _check_finite(loss_sum: float, step: int) -> None:
    if not math.isfinite(loss_sum):
        raise TrainingError(f"the loss is {loss_sum} at step {step}: lower training.lr")


def _update(
    groups: list[list[nn.Parameter]], optimizer, scheduler, max_grad_norm: float | None
) -> tuple[float, list[float | None]]:
    """Clip each group's gradient by itself, step the optimizer and the schedule; (the step's
    learning rate, each group's gradient norm before clipping)."""
    norms: list[float | None] = [None] * len(groups)
    if max_grad_norm:
        norms = [full(clip_grad_norm_(ps, max_grad_norm)).item() for ps in groups]
    lr = scheduler.get_last_lr()[0]
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return lr, norms


def _figures(loss, lr, grad_norm, tokens, seconds) -> dict[str, Any]:
    return {
        "loss": loss,
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
