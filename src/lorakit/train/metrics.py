"""Metric logging through one tiny interface, and the ``metrics.jsonl`` file.

The training loop reports through :class:`MetricLogger`: ``log(kind, step, values)`` and ``close()``
(the shape of torchtune's metric-logger protocol). ``kind`` is ``"train"`` for a step's loss,
learning rate and throughput, ``"eval"`` for a held-out evaluation. Anything with these two methods
can listen: the console (:mod:`lorakit.train.progress`), the JSONL file below, a user's own logger.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Protocol

from ..errors import LorakitError


class MetricsError(LorakitError, ValueError):
    """A line of ``metrics.jsonl`` is not a metrics record."""


class MetricLogger(Protocol):
    def log(self, kind: str, step: int, values: Mapping[str, Any]) -> None: ...

    def close(self) -> None: ...


class JsonlLogger:
    """Appends one JSON object per record: ``{"kind", "step", "time", **values}``.

    ``keep_until``: when resuming from a checkpoint at that step, records after it (written by the
    interrupted run after its last checkpoint) are dropped first, so the file reads like one
    uninterrupted run. ``None`` starts a fresh file.
    """

    def __init__(self, path: Path, keep_until: int | None = None):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        kept = [r for r in read_metrics(self.path) if r["step"] <= keep_until] if keep_until else []
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in kept))
        os.replace(tmp, self.path)
        self._file = self.path.open("a", encoding="utf-8")

    def log(self, kind: str, step: int, values: Mapping[str, Any]) -> None:
        record = {"kind": kind, "step": step, "time": round(time.time(), 3), **values}
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()

    def close(self) -> None:
        self._file.close()


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """The records of a ``metrics.jsonl`` file (none if it does not exist). A last line cut off by
    a killed process is left out; any other bad line is a :class:`MetricsError` naming
    ``file:line``."""
    path = Path(path)
    if not path.is_file():
        return []
    lines = path.read_bytes().splitlines()
    records = []
    for number, line in enumerate(lines, start=1):
        try:
            record = json.loads(line.decode("utf-8"))
            if not isinstance(record, dict) or not isinstance(record.get("step"), int):
                raise ValueError("not a record with a step")
            if not isinstance(record.get("kind"), str):
                raise ValueError("not a record with a kind")
            records.append(record)
        except ValueError as e:  # UnicodeDecodeError and JSONDecodeError too
            if number == len(lines):
                break
            raise MetricsError(
                f"{path}:{number}: damaged metrics record ({e}); delete that line (or the file) "
                "to go on"
            ) from None
    return records
