"""The training loss: next-token cross entropy on the trained tokens only.

Position ``t`` of the logits predicts token ``t + 1``, so the targets are the labels shifted left
by one; positions whose label is ``IGNORE`` (prompt, padding, user turns) add nothing. The loss of
a step is the *sum* over its trained tokens divided by the number of trained tokens in the whole
step (all micro-batches of a gradient-accumulation step together), so accumulating ``k`` micro-
batches gives exactly the gradient of one batch ``k`` times larger.

Logits are computed only where a target exists: transformers models take ``logits_to_keep``, a
boolean (batch, seq) mask, and project only those hidden states onto the vocabulary. On a prompt-
heavy task (a 50-token prompt, a 7-token answer) this skips most of the output-head work, which for
a small model with a large vocabulary is a fifth of the forward pass. A model without that argument
gets full logits, sliced afterwards: the same numbers, more work. In a mixed-adapter batch
(``adapter_per_row``, many adapters in one run) the head then sees the kept tokens of every row
flattened; ``kept_tokens`` tells it each token's row, so a saved or adapted ``lm_head`` uses each
row's own adapter.
"""

from __future__ import annotations

import inspect

import torch
import torch.nn.functional as F
from torch import nn

from ..generate import IGNORE
from ..model import kept_tokens

_KEEPS_LOGITS: dict[type, bool] = {}  # model class -> forward honours a boolean logits_to_keep


def token_loss(model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
    """(sum of the cross entropy over trained tokens, number of trained tokens) of one batch."""
    logits, targets, _ = _target_logits(model, batch)
    return _cross_entropy(logits, targets).sum(), int(targets.numel())


def group_losses(
    model: nn.Module, batch: dict[str, torch.Tensor], group_of_row: torch.Tensor, groups: int
) -> torch.Tensor:
    """(groups,) the cross entropy summed over each group's trained tokens: row ``i`` of the
    batch belongs to group ``group_of_row[i]`` (a many-adapter step: the groups are adapters,
    each normalised by its own token count afterwards)."""
    logits, targets, mask = _target_logits(model, batch)
    per_token = _cross_entropy(logits, targets)  # (n,)
    rows = torch.arange(mask.shape[0], device=mask.device)[:, None].expand_as(mask)[mask]  # (n,)
    group = group_of_row.to(per_token.device)[rows]
    return per_token.new_zeros(groups).index_add(0, group, per_token)


#: logits entries per piece of the cross entropy: a (tokens, vocab) block that stays in the CPU's
#: cache between the softmax's passes (on 384 tokens x 49,152 logits in one piece the softmax took
#: 6x as long per entry as in four pieces)
_CHUNK_ENTRIES = 1 << 21


def _cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """(n,) the cross entropy of each token, in float32, computed in pieces of tokens."""
    step = max(1, _CHUNK_ENTRIES // max(1, logits.shape[-1]))
    if logits.shape[0] <= step:
        return F.cross_entropy(logits.float(), targets, reduction="none")
    pieces = zip(logits.split(step), targets.split(step))
    return torch.cat([F.cross_entropy(x.float(), t, reduction="none") for x, t in pieces])


def _target_logits(model: nn.Module, batch: dict[str, torch.Tensor]):
    """(logits (n, vocab), targets (n,), mask (batch, seq - 1)) at the ``n`` trained tokens."""
    labels = batch["labels"]
    targets_mask = labels[:, 1:] != IGNORE  # (batch, seq - 1)
    n = int(targets_mask.sum())
    keep = torch.zeros_like(labels, dtype=torch.bool)
    keep[:, :-1] = targets_mask  # logits at t predict label t + 1
    targets = labels[:, 1:][targets_mask]  # (n,)
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    # DDP's wrapper passes every keyword on to the model it wraps
    inner = model.module if type(model).__name__ == "DistributedDataParallel" else model
    cls = type(inner)
    if cls not in _KEEPS_LOGITS:
        _KEEPS_LOGITS[cls] = "logits_to_keep" in inspect.signature(inner.forward).parameters
    logits = None
    if _KEEPS_LOGITS[cls]:
        with kept_tokens(inner, keep):  # a mixed batch's head gives each token its row's adapter
            logits = model(**inputs, logits_to_keep=keep, use_cache=False).logits
        if logits.dim() != 2 or logits.shape[0] != n:  # an older forward that slices by position
            _KEEPS_LOGITS[cls], logits = False, None
    if logits is None:
        logits = model(**inputs, use_cache=False).logits[:, :-1][targets_mask]  # (n, vocab)
    return logits, targets, targets_mask
