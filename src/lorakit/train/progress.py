"""What a person watching the run sees: a progress bar on a terminal, plain lines otherwise.

On a terminal, one ``tqdm`` bar shows the step, the loss, the learning rate, tokens per second and
the estimated time left. When the output is a file or a pipe (a CI log, ``nohup``), a bar would be
noise, so a plain line is printed every ``every`` steps instead, with the same figures. Either way
evaluations and messages are printed on their own lines. Without ``tqdm`` installed (it comes with
``lorakit[train]``), a terminal gets the plain lines too.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Mapping
from typing import Any, TextIO


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


class Console:
    """A :class:`~lorakit.train.metrics.MetricLogger` that prints for people."""

    def __init__(
        self,
        total: int,
        start: int = 0,
        every: int = 10,
        stream: TextIO | None = None,
        bar: bool | None = None,
    ):
        self.stream = stream or sys.stdout
        self.total, self.start, self.every = total, start, every
        self.t0 = time.perf_counter()
        use_bar = self.stream.isatty() if bar is None else bar
        self.bar = None
        if use_bar:
            try:
                from tqdm import tqdm
            except ImportError:  # optional (lorakit[train]): plain lines instead of a bar
                return
            self.bar = tqdm(
                total=total, initial=start, unit="step", file=self.stream, dynamic_ncols=True
            )

    def message(self, text: str) -> None:
        if self.bar is not None:
            self.bar.write(text, file=self.stream)
        else:
            print(text, file=self.stream, flush=True)

    def log(self, kind: str, step: int, values: Mapping[str, Any]) -> None:
        if kind == "eval":
            shown = f"held-out loss {values['loss']:.4f}"
            if values.get("total"):
                shown += f", exact match {values['exact']}/{values['total']}"
            self.message(f"eval at step {step}: {shown}")
            return
        if kind != "train":
            return
        figures = f"loss {values['loss']:.4f}  lr {values['lr']:.2e}"
        figures += f"  {values['tokens_per_s']:,.0f} tok/s"
        if self.bar is not None:
            self.bar.set_postfix_str(figures, refresh=False)
            self.bar.update(step - self.bar.n)
            return
        if step % self.every and step != self.total and step != self.start + 1:
            return
        elapsed = time.perf_counter() - self.t0
        left = elapsed / max(step - self.start, 1) * (self.total - step)
        width = len(str(self.total))
        self.message(f"step {step:{width}d}/{self.total}  {figures}  eta {_duration(left)}")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


class Silent(Console):
    """The console of a distributed run's other processes: rank 0 alone speaks."""

    def __init__(self) -> None:
        self.bar = None

    def message(self, text: str) -> None:
        pass

    def log(self, kind: str, step: int, values: Mapping[str, Any]) -> None:
        pass
