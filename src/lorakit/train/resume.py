"""Resuming a run: the newest intact checkpoint, checked against the config and the model.

``training.resume=true`` continues from the newest checkpoint in ``output.dir``. A checkpoint that
cannot be used (a truncated or garbage file, a ``state.pt`` with missing entries or with objects
other than tensors, a tensor of the wrong shape) is named with what is wrong; when an older
checkpoint is kept (``output.keep_checkpoints``) the run goes on from the newest intact one and
says so. A checkpoint of another run (a changed config, other data) is not damage: that is an
error at once, as is a damaged ``metrics.jsonl``.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from . import checkpoint
from .best import BestKeeper
from .checkpoint import CheckpointError, Saved
from .config import TrainConfig
from .data import Batches
from .evaluate import EvalResult
from .output import TrainingError

# Settings a resumed run may change; any other difference from the checkpoint's config is an error.
RESUMABLE = set(
    "training.resume training.log_every training.checkpoint_every training.threads "
    "training.early_stopping training.distributed training.distributed_timeout model.device "
    "output.keep_checkpoints output.keep_best "
    "output.overwrite output.plot output.report evaluation.before evaluation.exact_match "
    "evaluation.max_rows evaluation.batch_size evaluation.max_new_tokens evaluation.samples".split()
)


def resume(
    out: Path,
    cfg: TrainConfig,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    batches: Batches | Any,
    say: Callable[[str], None],
    keeper: BestKeeper | Any | None = None,
) -> tuple[Saved, EvalResult | None] | None:
    """Restore the newest intact checkpoint of ``out`` into the model, the optimizer, the schedule,
    the data order and the random generators; (the checkpoint, the evaluation before training),
    or None when there is no checkpoint. Checkpoints are all checked before anything changes;
    ``keeper`` takes the best step the checkpoint recorded. A many-adapter run passes its
    streams and keepers (``multi.Streams``, ``multi.Keepers``: the same methods)."""
    found = checkpoint.checkpoints(out)
    damaged: list[str] = []
    for path in reversed(found):
        try:
            saved = checkpoint.load(path)
            check_same_run(saved.state["notes"]["config"], cfg, path)
            checkpoint.check_fits(saved, model, optimizer)
            before = _before(saved)
            if keeper is not None:
                keeper.load_state_dict(saved.state.get("best"), saved)
        except CheckpointError as e:
            damaged.append(str(e))
            continue
        batches.load_state_dict(saved.state["data"])  # other data: an error, not damage
        try:
            checkpoint.restore_parameters(model, saved.tensors)
            checkpoint.load_optimizer_state(optimizer, saved.state["optimizer"])
            scheduler.load_state_dict(saved.state["scheduler"])
            checkpoint.set_rng_state(saved.state["rng"])
        except (KeyError, TypeError, ValueError, RuntimeError) as e:
            raise CheckpointError(f"{path}: damaged state.pt: {e}") from None
        if damaged:
            say(
                f"warning: {len(damaged)} newer checkpoint(s) damaged, skipped:\n"
                + "".join(f"  {d}\n" for d in damaged)
                + f"resuming from the newest intact checkpoint, {path.name}"
            )
        return saved, before
    if damaged:
        listed = "".join(f"\n  - {d}" for d in damaged)
        raise CheckpointError(
            f"no intact checkpoint to resume from in {out}:{listed}\n"
            "delete the damaged checkpoint directories to start over with training.resume=true, "
            "or pass output.overwrite=true without it"
        )
    return None


def check_same_run(saved: Any, cfg: TrainConfig, where: Path) -> None:
    """Refuse a checkpoint written with a config that differs in more than :data:`RESUMABLE`."""
    now = cfg.to_dict()
    saved = saved if isinstance(saved, dict) else {}
    changed = []
    # a many-adapter run: each adapter's sections as "adapters.NAME.section" (and the same
    # adapters, in the same order: they share one optimizer's parameter list)
    pairs = [(s, values, saved.get(s)) for s, values in now.items() if s != "adapters"]
    if now.get("adapters") or saved.get("adapters"):
        mine, old = now.get("adapters") or {}, saved.get("adapters")
        old = old if isinstance(old, dict) else {}
        if list(mine) != list(old):
            changed.append(f"adapters: {list(old)} -> {list(mine)}")
        for name in set(mine) & set(old):
            for s, values in mine[name].items():
                pairs.append((f"adapters.{name}.{s}", values, (old[name] or {}).get(s)))
    for section, values, old in pairs:
        old = old if isinstance(old, dict) else {}
        kind = section.rsplit(".", 1)[-1]  # RESUMABLE names the section: evaluation.max_rows
        for key, value in values.items():
            if f"{kind}.{key}" not in RESUMABLE and old.get(key, value) != value:
                changed.append(f"{section}.{key}: {old.get(key)!r} -> {value!r}")
    if changed:
        raise TrainingError(
            f"{where} was written with a different config; resuming would not continue the same "
            "run. Changed: " + "; ".join(changed)
        )


def _before(saved: Saved) -> EvalResult | None:
    d = saved.state["notes"].get("before")
    if d is None:
        return None
    try:
        return EvalResult(**d)
    except TypeError:
        raise CheckpointError(
            f"{saved.path}/state.pt: the evaluation before training is malformed"
        ) from None
