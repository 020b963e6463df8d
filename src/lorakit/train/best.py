"""Keeping the best: the step with the lowest held-out loss, its parameters, and early stopping.

When held-out rows are evaluated during training (``evaluation.every > 0``), each evaluation is
compared with the best so far. With ``output.keep_best`` (the default) a copy of the trainable
parameters of the best step is kept (on the CPU: an adapter is small; for method ``full`` it is
a copy of the model) and put back after the last step when a later step did worse, so the saved
adapter, the final evaluation and the report are the best step's. ``training.early_stopping``
stops the run after that many evaluations in a row without a lower loss (0: never). Checkpoints
carry this state (``best.safetensors`` holds the best parameters when they are not the
checkpoint's own), so a resumed run keeps the same best.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from .checkpoint import CheckpointError, Saved, restore_parameters, trainable_state


class BestKeeper:
    """The best held-out loss so far: its step, its loss and (with ``keep``) its parameters."""

    def __init__(self, patience: int = 0, keep: bool = True, names: set[str] | None = None):
        self.patience, self.keep = patience, keep
        self.names = names  # the parameters kept (None: every trainable one): one adapter's
        self.step: int | None = None
        self.loss = math.inf
        self.stale = 0  # evaluations since the best one
        self.evaluated: int | None = None  # the step of the latest evaluation
        self.tensors: dict[str, torch.Tensor] | None = None

    def update(self, step: int, loss: float, model: nn.Module) -> bool:
        """Record the evaluation of ``step``; whether it is the best so far."""
        self.evaluated = step
        if not loss < self.loss:  # a NaN loss is never the best
            self.stale += 1
            return False
        self.step, self.loss, self.stale = step, loss, 0
        if self.keep:
            self.tensors = {n: t.clone() for n, t in self._mine(trainable_state(model)).items()}
        return True

    def _mine(self, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return tensors if self.names is None else {n: tensors[n] for n in self.names}

    @property
    def exhausted(self) -> bool:
        """Whether ``patience`` evaluations in a row brought no lower loss."""
        return bool(self.patience) and self.stale >= self.patience

    def restore(self, model: nn.Module) -> None:
        """Put the best step's parameters back into ``model``."""
        if self.tensors is not None:
            restore_parameters(model, self.tensors)

    def checkpoint_tensors(self, step: int) -> dict[str, torch.Tensor] | None:
        """What a checkpoint at ``step`` writes as ``best.safetensors`` (None: not needed)."""
        return self.tensors if self.keep and self.step not in (None, step) else None

    def state_dict(self) -> dict[str, Any]:
        return {"step": self.step, "loss": self.loss, "stale": self.stale, "at": self.evaluated}

    def load_state_dict(self, state: Any, saved: Saved) -> None:
        """Take the best of a checkpoint; a :class:`CheckpointError` if it is malformed."""
        self.__init__(self.patience, self.keep, self.names)
        if state is None:  # a checkpoint of a run without evaluations during training
            return
        ok = isinstance(state, dict) and isinstance(state.get("stale"), int)
        ok = ok and isinstance(state.get("loss"), float)
        ok = ok and all(state.get(k) is None or isinstance(state[k], int) for k in ("step", "at"))
        if not ok:
            raise CheckpointError(
                f"{saved.path}/state.pt: the record of the best step is malformed"
            )
        self.step, self.loss, self.stale, self.evaluated = (
            state["step"],
            state["loss"],
            state["stale"],
            state["at"],
        )
        if not self.keep or self.step is None:
            return
        if self.step == saved.state["step"]:
            self.tensors = {n: t.clone() for n, t in self._mine(saved.tensors).items()}
        elif saved.best is not None:
            self.tensors = self._mine(saved.best)
        elif saved.state["notes"]["config"].get("output", {}).get("keep_best") is False:
            self.step, self.loss = None, math.inf  # kept nothing then: the best starts afresh
        else:
            raise CheckpointError(
                f"{saved.path}: best.safetensors is missing (the best step, {self.step}, is not "
                "the checkpoint's own)"
            )
