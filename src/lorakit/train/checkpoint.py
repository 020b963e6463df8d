"""Checkpoints: everything a run needs to continue exactly where it stopped.

A checkpoint is a directory ``checkpoint-000050/`` in the output directory holding

* ``trainable.safetensors``: every trainable parameter by name (the adapter, for LoRA);
* ``state.pt``: the optimizer's and the scheduler's state, the random number generators' states
  (Python's and torch's), the data position, the step, and the run's notes (the resolved config,
  the evaluation before training).

It is written atomically: into a hidden temporary directory that is renamed into place only when
every file is on disk (``fsync``), so a run killed at any moment (even ``kill -9``) leaves either a
whole checkpoint or none; a leftover temporary directory is ignored and removed by the next run.
Resuming restores every state above, so the resumed run computes the same losses, bit for bit on
CPU, as a run that was never interrupted.
"""

from __future__ import annotations

import os
import random
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import LorakitError

PREFIX = "checkpoint-"
TMP_PREFIX = ".tmp-" + PREFIX


class CheckpointError(LorakitError, RuntimeError):
    """A checkpoint is missing, incomplete, or does not fit the model being trained."""


def trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every trainable parameter, by its name in ``model`` (a shared tensor once)."""
    return {n: p.detach().cpu() for n, p in model.named_parameters() if p.requires_grad}


def rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save(
    out_dir: Path,
    step: int,
    *,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    data_position: dict[str, int],
    notes: dict[str, Any],
    keep: int = 2,
) -> Path:
    """Write ``checkpoint-{step:06d}`` atomically; keep the newest ``keep`` (0: all)."""
    from safetensors.torch import save_file

    out_dir.mkdir(parents=True, exist_ok=True)
    final = out_dir / f"{PREFIX}{step:06d}"
    tmp = Path(tempfile.mkdtemp(prefix=f"{TMP_PREFIX}{step:06d}-", dir=out_dir))
    try:
        tensors = {n: t.contiguous() for n, t in trainable_state(model).items()}
        save_file(tensors, str(tmp / "trainable.safetensors"))
        state = {
            "step": step,
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "rng": rng_state(),
            "data": dict(data_position),
            "notes": notes,
        }
        torch.save(state, tmp / "state.pt")
        for name in ("trainable.safetensors", "state.pt"):
            _fsync(tmp / name)
        if final.exists():  # a checkpoint of an earlier attempt at this step: replace it
            shutil.rmtree(final)
        os.replace(tmp, final)
        _fsync(out_dir)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    if keep:
        for old in checkpoints(out_dir)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    return final


def checkpoints(out_dir: Path) -> list[Path]:
    """The complete checkpoints in ``out_dir``, oldest first."""
    if not out_dir.is_dir():
        return []
    found = [p for p in out_dir.iterdir() if p.is_dir() and p.name.startswith(PREFIX)]
    return sorted(p for p in found if p.name[len(PREFIX) :].isdigit())


def remove_partial(out_dir: Path) -> None:
    """Delete temporary directories a killed run left behind."""
    if out_dir.is_dir():
        for p in out_dir.iterdir():
            if p.name.startswith(TMP_PREFIX):
                shutil.rmtree(p, ignore_errors=True)


def load(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(trainable tensors, state) of one checkpoint directory."""
    from safetensors.torch import load_file

    files = [path / "trainable.safetensors", path / "state.pt"]
    missing = [f.name for f in files if not f.is_file()]
    if missing:
        raise CheckpointError(f"{path}: incomplete checkpoint, missing {', '.join(missing)}")
    return load_file(str(files[0])), torch.load(files[1], weights_only=True)


def restore_parameters(model: nn.Module, tensors: dict[str, torch.Tensor], where: Path) -> None:
    """Copy saved trainable parameters into ``model``; the names must match exactly."""
    params = dict(model.named_parameters())
    current = {n for n, p in params.items() if p.requires_grad}
    missing, unexpected = sorted(current - set(tensors)), sorted(set(tensors) - current)
    if missing or unexpected:
        raise CheckpointError(
            f"{where} does not fit the model being trained: "
            f"{len(missing)} trainable parameter(s) missing (e.g. {missing[:3]}), "
            f"{len(unexpected)} unexpected (e.g. {unexpected[:3]}); resume with the same "
            "model, method and lora settings"
        )
    with torch.no_grad():
        for name, tensor in tensors.items():
            params[name].copy_(tensor)
