"""What a training run gives back (:class:`TrainResult`), and evaluations as records."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .evaluate import EvalResult


@dataclass
class TrainResult:
    out_dir: Path
    steps: int
    start_step: int
    losses: dict[int, float] = field(default_factory=dict)  # step -> training loss (this session)
    before: EvalResult | None = None
    after: EvalResult | None = None
    trainable: int = 0
    total: int = 0
    train_seconds: float = 0.0
    peak_memory_mb: float = 0.0
    peak_memory_mb_per_process: list[float] = field(default_factory=list)  # by rank, torchrun
    processes: int = 1
    distributed: str = "none"  # none, ddp or fsdp
    saved: Path | None = None  # the adapter directory (or the model, for method "full")
    warnings: list[str] = field(default_factory=list)  # what went wrong without losing the run
    last_step: int = 0  # the last step trained (before ``steps`` when stopped early)
    kept_step: int = 0  # the step whose parameters were saved (the best, with output.keep_best)
    kept_loss: float | None = None  # its held-out loss
    stopped_early: bool = False  # by training.early_stopping


def eval_values(r: EvalResult) -> dict[str, Any]:
    values: dict[str, Any] = {"loss": r.loss}
    if r.accuracy is not None:
        values.update(exact_match=r.accuracy, exact=r.exact, total=r.total)
    return values


def eval_dict(r: EvalResult | None) -> dict[str, Any] | None:
    if r is None:
        return None
    return {
        "loss": r.loss,
        "exact": r.exact,
        "total": r.total,
        "samples": r.samples,
        "seconds": r.seconds,
    }
