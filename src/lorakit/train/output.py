"""The output directory: what a run writes there, and how lorakit knows a directory is its run.

A run writes to ``output.dir``: ``adapter/`` (``model/`` for method full), ``checkpoint-NNNNNN/``,
``metrics.jsonl``, ``loss.png``, ``report.md``, ``summary.json`` (a many-adapter run:
``adapters/NAME/`` holding each adapter's own, and ``summary.md``), and first of all the marker
``.lorakit-run`` (a line of JSON naming lorakit and its version). A directory is a lorakit run
when it holds that marker, or, for runs written before the marker existed, checkpoint
directories or a ``metrics.jsonl`` whose first line is a lorakit record.

* A missing or empty directory, or one holding none of the names above: the run goes there, and
  files of other names are left alone.
* A lorakit run with results (checkpoints or ``metrics.jsonl``): continued with
  ``training.resume=true``; started over with ``output.overwrite=true``, which deletes only what a
  run writes (other files stay; an ``adapter/`` or ``model/`` holding files a run does not write
  is refused, as ``save_adapter`` refuses it); refused otherwise.
* A directory that is not a lorakit run but holds files with those names (a ``report.md`` of the
  user's own): refused with the list of them, whatever ``output.overwrite`` says, and nothing is
  changed.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from ..errors import LorakitError
from . import checkpoint

MARKER = ".lorakit-run"
OUTPUTS = (
    "adapter", "model", "metrics.jsonl", "loss.png", "report.md", "summary.json",
    "adapters", "summary.md",  # a many-adapter run's (lorakit.train.multi)
)  # fmt: skip


class TrainingError(LorakitError, RuntimeError):
    """Training cannot start or cannot go on (an occupied output directory, a diverged loss)."""


def is_run(out: Path) -> bool:
    """Whether ``out`` is a directory a lorakit run wrote (see the module's docstring)."""
    marker = out / MARKER
    if marker.is_file():
        try:
            return "lorakit" in json.loads(marker.read_text(encoding="utf-8"))
        except (ValueError, TypeError, OSError):
            return False
    if checkpoint.checkpoints(out):
        return True
    metrics = out / "metrics.jsonl"
    try:
        with metrics.open("rb") as f:
            first = json.loads(f.readline())
        return isinstance(first, dict) and {"kind", "step", "time"} <= set(first)
    except (ValueError, OSError):
        return False


def prepare(out: Path, resume: bool, overwrite: bool) -> None:
    """Check that a run may write to ``out`` and make it its own (see the module's docstring)."""
    if out.exists() and not out.is_dir():
        raise TrainingError(f"output.dir {str(out)!r} exists and is not a directory")
    ours = out.is_dir() and is_run(out)
    found = checkpoint.checkpoints(out)
    if not ours:
        taken = [name for name in OUTPUTS if (out / name).exists()]
        if taken:
            raise TrainingError(
                f"output.dir {str(out)!r} is not a lorakit run but holds {', '.join(taken)}, "
                "which a run would replace; nothing was changed. Choose another output.dir "
                "(or move those files away)"
            )
    checkpoint.remove_partial(out)
    earlier = found or (out / "metrics.jsonl").exists() or (out / "adapters").is_dir()
    if earlier and not resume:
        if not overwrite:
            raise TrainingError(
                f"output.dir {str(out)!r} holds an earlier run: pass training.resume=true to "
                "continue it, output.overwrite=true to start over, or choose another output.dir"
            )
        from ..io.safety import check_target

        for kind in ("adapter", "model"):  # refused if they hold files a run does not write
            check_target(out / kind, overwrite=True, kind=kind)
        for path in [*found, *(out / name for name in OUTPUTS)]:
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            elif path.exists() or path.is_symlink():
                path.unlink()
    if not (out / MARKER).is_file():
        out.mkdir(parents=True, exist_ok=True)
        write_text(out / MARKER, json.dumps({"lorakit": _version(), "kind": "training run"}) + "\n")


def write_text(path: Path, text: str) -> None:
    """Replace ``path`` with ``text`` atomically (a temporary name, then a rename)."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("lorakit")
    except PackageNotFoundError:  # pragma: no cover - a source tree
        return "unknown"
