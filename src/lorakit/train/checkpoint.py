"""Checkpoints: everything a run needs to continue exactly where it stopped.

A checkpoint is a directory ``checkpoint-000050/`` in the output directory holding

* ``trainable.safetensors``: every trainable parameter by name (the adapter, for LoRA);
* ``state.pt``: the optimizer's and the scheduler's state, the random number generators' states
  (Python's and torch's), the data position (a many-adapter run: each adapter's), the step, and
  the run's notes (the resolved config, the evaluation before training, the best held-out loss
  so far);
* ``best.safetensors``: the parameters of that best step, when it is not this checkpoint's own
  (see :mod:`lorakit.train.best`).

It is written atomically: into a hidden temporary directory that is renamed into place only when
every file is on disk (``fsync``), so a run killed at any moment (even ``kill -9``) leaves either a
whole checkpoint or none; a leftover temporary directory is ignored and removed by the next run.
Directories and files get the modes the umask gives; a full disk is an error that says so and
names the directory, and leaves no temporary directory behind. Reading a checkpoint checks every
file (:func:`load`, :func:`check_fits`) before anything is restored.
Resuming restores every state above, so the resumed run computes the same losses, bit for bit on
CPU, as a run that was never interrupted.
"""

from __future__ import annotations

import errno
import os
import pickle
import random
import secrets
import shutil
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import LorakitError
from .distributed import full, like

PREFIX = "checkpoint-"
TMP_PREFIX = ".tmp-" + PREFIX


class CheckpointError(LorakitError, RuntimeError):
    """A checkpoint is missing, incomplete, damaged, or does not fit the model being trained."""


@dataclass
class Saved:
    """One checkpoint as read by :func:`load`."""

    path: Path
    tensors: dict[str, torch.Tensor]  # trainable parameters by name
    state: dict[str, Any]  # the contents of state.pt
    best: dict[str, torch.Tensor] | None = None  # best.safetensors, when there is one


def trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every trainable parameter, by its name in ``model`` (a shared tensor once), whole: a
    parameter sharded by FSDP is gathered (every rank must call this together)."""
    return {n: full(p.detach()).cpu() for n, p in model.named_parameters() if p.requires_grad}


def optimizer_state(optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """The optimizer's state dict with sharded (FSDP) states gathered whole: the same file as
    one process writes (every rank must call this together)."""
    state = optimizer.state_dict()
    state["state"] = {
        index: {k: full(v) if isinstance(v, torch.Tensor) else v for k, v in values.items()}
        for index, values in state["state"].items()
    }
    return state


def load_optimizer_state(optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> None:
    """Load a state dict of whole tensors; a parameter sharded by FSDP gets its states sharded
    the same way (so a checkpoint of any number of processes resumes on any other)."""
    ordered = [p for g in optimizer.param_groups for p in g["params"]]
    state = dict(state)
    state["state"] = {
        index: {
            k: like(v, ordered[index])
            if isinstance(v, torch.Tensor) and v.shape == ordered[index].shape
            else v
            for k, v in values.items()
        }
        for index, values in state["state"].items()
    }
    optimizer.load_state_dict(state)


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


class _Recording:
    """A file that remembers the ``OSError`` of a failed write: ``torch.save`` reports it as a
    ``RuntimeError ... unexpected pos``, which does not say that the disk is full."""

    def __init__(self, file: Any):
        self.file, self.error = file, None

    def write(self, data: Any) -> int:
        try:
            return self.file.write(data)
        except OSError as e:
            self.error = e
            raise

    def flush(self) -> None:
        self.file.flush()


def _write_file(path: Path, write: Callable[[Any], Any]) -> None:
    """Create ``path`` (with the umask's mode), ``write(file)`` into it, flush it to the disk
    (``fsync``); a failed write raises its own ``OSError``."""
    with open(path, "xb") as f:
        file = _Recording(f)
        try:
            write(file)
        except RuntimeError:
            if file.error is not None:
                raise file.error from None
            raise
        f.flush()
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
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
    extra: dict[str, Any] | None = None,
    best: dict[str, torch.Tensor] | None = None,
    write: bool = True,
) -> Path | None:
    """Write ``checkpoint-{step:06d}`` atomically; keep the newest ``keep`` (0: all).

    ``extra``: more entries of ``state.pt`` (plain values); ``best``: tensors written as
    ``best.safetensors`` (the best parameters so far, when they are not the current ones).
    Directories and files get the modes the umask gives, as any file the user writes.
    ``write=False`` (the other ranks of a distributed run): only take part in gathering the
    sharded states; rank 0 writes."""
    from safetensors.torch import save as to_bytes

    trainable, optimizer_states = trainable_state(model), optimizer_state(optimizer)
    if not write:
        return None

    out_dir.mkdir(parents=True, exist_ok=True)
    final = out_dir / f"{PREFIX}{step:06d}"
    tmp = out_dir / f"{TMP_PREFIX}{step:06d}-{secrets.token_hex(4)}"
    try:
        tmp.mkdir()  # not tempfile.mkdtemp: its 0700 would hide the run from the user's group
        for name, tensors in (("trainable", trainable), ("best", best)):
            if tensors is not None:  # safetensors' own writer would hide a full disk's errno
                data = to_bytes({n: t.contiguous() for n, t in tensors.items()})
                _write_file(tmp / f"{name}.safetensors", lambda f, data=data: f.write(data))
        state = {
            "step": step,
            "optimizer": optimizer_states,
            "scheduler": scheduler.state_dict(),
            "rng": rng_state(),
            "data": dict(data_position),
            "notes": notes,
            **(extra or {}),
        }
        _write_file(tmp / "state.pt", lambda f: torch.save(state, f))
        if final.exists():  # a checkpoint of an earlier attempt at this step: replace it
            shutil.rmtree(final)
        os.replace(tmp, final)
        _fsync_dir(out_dir)
    except OSError as e:
        if e.errno == errno.ENOSPC:
            raise CheckpointError(
                f"no space left on device while writing checkpoint {final.name} in {out_dir}: "
                "nothing of it was kept; free some space, then continue with "
                "training.resume=true"
            ) from None
        raise CheckpointError(
            f"cannot write checkpoint {final.name} in {out_dir}: {e.strerror or e}"
        ) from None
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


def load(path: Path) -> Saved:
    """The files of one checkpoint directory, read and checked; a :class:`CheckpointError` naming
    the checkpoint, the file and what is wrong with it otherwise. ``state.pt`` is read with
    ``weights_only=True``: a pickle holding anything but tensors and plain values is refused."""
    from safetensors.torch import load_file

    files = [path / "trainable.safetensors", path / "state.pt"]
    missing = [f.name for f in files if not f.is_file()]
    if missing:
        raise CheckpointError(f"{path}: incomplete checkpoint, missing {', '.join(missing)}")

    def tensors(file: Path) -> dict[str, torch.Tensor]:
        try:
            found = load_file(str(file))
        except Exception as e:  # SafetensorError, OSError: truncated, garbage, unreadable
            raise CheckpointError(f"{file}: not a readable safetensors file ({e})") from None
        bad = [n for n, t in found.items() if t.is_floating_point() and not t.isfinite().all()]
        if bad:
            raise CheckpointError(f"{file}: NaN or infinite values in {', '.join(bad[:3])}")
        return found

    trainable = tensors(files[0])
    best = tensors(path / "best.safetensors") if (path / "best.safetensors").is_file() else None
    if not zipfile.is_zipfile(files[1]):  # what torch.save writes; checked before unpickling
        raise CheckpointError(f"{files[1]}: not a torch checkpoint file (truncated or garbage)")
    try:
        state = torch.load(files[1], weights_only=True, map_location="cpu")
    except pickle.UnpicklingError as e:
        lines = [line for line in str(e).splitlines() if "GLOBAL" in line or "Unsupported" in line]
        raise CheckpointError(
            f"{files[1]}: refused: it holds objects other than tensors and plain values, which "
            f"are never unpickled ({(lines or [type(e).__name__])[0].strip()})"
        ) from None
    except Exception as e:  # RuntimeError, EOFError, ...: truncated or garbage
        raise CheckpointError(f"{files[1]}: not a readable torch file ({e})") from None
    problems = _state_problems(state)
    if problems:
        raise CheckpointError(f"{files[1]}: incomplete or damaged: {'; '.join(problems)}")
    return Saved(path, trainable, state, best)


# What ``state.pt`` must hold: key -> (type, description).
STATE_KEYS = {
    "step": (int, "a step number"),
    "optimizer": (dict, "the optimizer's state"),
    "scheduler": (dict, "the schedule's state"),
    "rng": (dict, "the random generators' states"),
    "data": (dict, "the data position"),
    "notes": (dict, "the run's notes"),
}


def _state_problems(state: Any) -> list[str]:
    if not isinstance(state, dict):
        return [f"expected a dict of states, got {type(state).__name__}"]
    problems = [
        f"{key!r} is missing or not {what}"
        for key, (kind, what) in STATE_KEYS.items()
        if not isinstance(state.get(key), kind) or isinstance(state.get(key), bool)
    ]
    if problems:
        return problems
    opt = state["optimizer"]
    if not isinstance(opt.get("state"), dict) or not isinstance(opt.get("param_groups"), list):
        problems.append("the optimizer's state has no 'state' and 'param_groups'")
    else:  # every parameter's state holds the same entries (AdamW: step, exp_avg, exp_avg_sq)
        kinds = {frozenset(v) if isinstance(v, dict) else None for v in opt["state"].values()}
        if None in kinds or len(kinds) > 1:
            problems.append("the optimizer's per-parameter states are incomplete")
    streams = state["data"].get("streams")  # a many-adapter run: a position per adapter
    positions = streams.values() if isinstance(streams, dict) and streams else [state["data"]]
    if not all(
        isinstance(p, dict) and all(isinstance(p.get(k), int) for k in ("epoch", "offset", "rows"))
        for p in positions
    ):
        problems.append("the data position needs 'epoch', 'offset' and 'rows'")
    if not isinstance(state["notes"].get("config"), dict):
        problems.append("the notes have no config")
    rng = state["rng"]
    try:
        random.Random().setstate(rng["python"])
        torch.Generator().set_state(rng["torch"])
    except Exception:  # noqa: BLE001 - any malformed state
        problems.append("the random generators' states are malformed")
    if not {"last_epoch", "base_lrs"} <= set(state["scheduler"]):
        problems.append("the schedule's state has no 'last_epoch' and 'base_lrs'")
    return problems


def check_fits(saved: Saved, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Raise a :class:`CheckpointError` unless the saved parameters and optimizer state fit
    ``model`` and ``optimizer`` exactly (names, shapes, groups); nothing is changed."""
    where = saved.path
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    for file, tensors in (("trainable", saved.tensors), ("best", saved.best)):
        if tensors is None:
            continue
        missing, unexpected = sorted(set(params) - set(tensors)), sorted(set(tensors) - set(params))
        if missing or unexpected:
            raise CheckpointError(
                f"{where}/{file}.safetensors does not fit the model being trained: "
                f"{len(missing)} trainable parameter(s) missing (e.g. {missing[:3]}), "
                f"{len(unexpected)} unexpected (e.g. {unexpected[:3]}); resume with the same "
                "model, method and lora settings"
            )
        for name, t in tensors.items():
            if t.shape != params[name].shape:
                raise CheckpointError(
                    f"{where}/{file}.safetensors: {name} has shape {tuple(t.shape)}, the model's "
                    f"parameter has {tuple(params[name].shape)}"
                )
    saved_opt, groups = saved.state["optimizer"], optimizer.param_groups
    layout = [
        (g.get("name"), len(g.get("params", ()))) if isinstance(g, dict) else (None, -1)
        for g in saved_opt["param_groups"]
    ]
    mine = [(g.get("name"), len(g["params"])) for g in groups]
    if layout != mine:
        raise CheckpointError(
            f"{where}/state.pt: the optimizer's parameter groups ({_groups(layout)}) do not fit "
            f"this run's ({_groups(mine)}); training.loraplus_lr_ratio decides the groups "
            "(LoRA+: A, B, embedding, base): resume with the settings the checkpoint was "
            "written with"
        )
    ordered = [p for g in groups for p in g["params"]]
    for index, values in saved_opt["state"].items():
        if not isinstance(index, int) or not 0 <= index < len(ordered):
            raise CheckpointError(f"{where}/state.pt: optimizer state for unknown index {index!r}")
        for key, value in values.items() if isinstance(values, dict) else ():
            if (
                isinstance(value, torch.Tensor)
                and value.ndim
                and value.shape != ordered[index].shape
            ):
                raise CheckpointError(
                    f"{where}/state.pt: optimizer {key} of parameter {index} has shape "
                    f"{tuple(value.shape)}, the parameter has {tuple(ordered[index].shape)}"
                )


def _groups(layout: list[tuple[Any, int]]) -> str:
    """Groups in words: ``A 28, B 28, embedding 0, base 0``, or ``one group of 56``."""
    if len(layout) == 1 and layout[0][0] is None:
        return f"one group of {layout[0][1]}"
    return ", ".join(f"{name or 'unnamed'} {size}" for name, size in layout)


def restore_parameters(model: nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    """Copy saved trainable parameters (checked by :func:`check_fits`) into ``model``."""
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, tensor in tensors.items():
            params[name].copy_(like(tensor, params[name]))
