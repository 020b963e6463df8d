"""Evaluation on held-out rows: the loss, and exact match by greedy generation.

* loss: the mean cross entropy per trained token (the training loss, on rows never trained on);
* exact match: the model answers each row's prompt greedily (at most ``max_new_tokens``, stopping
  at the end-of-turn token) and an answer counts when it equals the reference after stripping
  surrounding whitespace. Prompts are batched with left padding, so every row's answer starts
  right after its own prompt.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..generate import Encoded, generate
from .data import collate
from .loss import token_loss


@dataclass
class EvalResult:
    loss: float | None = None
    exact: int | None = None  # rows answered exactly right
    total: int = 0  # rows with a reference answer
    samples: list[dict[str, str]] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def accuracy(self) -> float | None:
        return None if self.exact is None or not self.total else self.exact / self.total

    def line(self) -> str:
        parts = []
        if self.loss is not None:
            parts.append(f"loss {self.loss:.4f}")
        if self.accuracy is not None:
            parts.append(f"exact match {self.exact}/{self.total} ({100 * self.accuracy:.1f}%)")
        return ", ".join(parts) or "nothing to evaluate"


@torch.no_grad()
def heldout_loss(model: nn.Module, rows: list[Encoded], batch_size: int, pad_id: int) -> float:
    """Mean cross entropy per trained token over ``rows``."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    device = next(model.parameters()).device
    for i in range(0, len(rows), batch_size):
        batch = collate(rows[i : i + batch_size], pad_id)
        loss, n = token_loss(model, {k: v.to(device) for k, v in batch.items()})
        total, count = total + loss.item(), count + n
    model.train(was_training)
    return total / max(count, 1)


def evaluate(
    model: nn.Module,
    tokenizer: Any,
    rows: list[Encoded],
    *,
    batch_size: int = 16,
    max_new_tokens: int = 32,
    exact_match: bool = True,
    samples: int = 5,
) -> EvalResult:
    """Held-out loss, and exact match over the rows that have a reference answer."""
    t0 = time.perf_counter()
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    result = EvalResult(loss=heldout_loss(model, rows, batch_size, pad))
    answerable = [r for r in rows if r.reference is not None]
    if exact_match and answerable:
        prompts = [r.prompt_ids for r in answerable]
        outputs = generate(model, tokenizer, prompts, max_new_tokens, batch_size)
        result.total = len(answerable)
        result.exact = sum(o == r.reference.strip() for o, r in zip(outputs, answerable))
        for r, o in list(zip(answerable, outputs))[:samples]:
            sample = {"where": r.where, "prompt": r.question, "reference": r.reference}
            result.samples.append({**sample, "output": o})
    result.seconds = time.perf_counter() - t0
    return result
