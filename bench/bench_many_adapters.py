"""Many adapters in one run against the same adapters trained one run after another.

``MANY`` adapters with the settings of ``bench_distributed.py`` (LoRA r=16 on every linear layer,
``STEPS`` steps of 8 rows of at most 96 tokens, one thread, no evaluation), each on its own
``MANY``-th of the demo's rows, trained by one ``lorakit train`` with an ``adapters:`` section,
against ``MANY`` plain ``lorakit train`` runs one after another: whole commands timed (a run of
many adapters loads the base once), and the training time alone from each ``summary.json``.
Goal: the one run at most 1.0x the runs' wall time.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import _common as C
from bench_distributed import DEMO, STEPS, train

NAME = "many_adapters"
TITLE = "Many adapters in one run against one run each, SmolLM2-135M-Instruct, 1 thread"
ANCHOR_PACKAGES = ["transformers"]
MANY = 4


def run(threads: int) -> list[dict]:
    del threads  # one thread per run, as in bench_distributed
    with tempfile.TemporaryDirectory() as tmp:
        return many_adapters(Path(tmp))


def many_adapters(tmp: Path) -> list[dict]:
    """``MANY`` adapters in one run against ``MANY`` runs one after another (whole commands)."""
    lines = (DEMO.parent / "data" / "dates" / "train.jsonl").read_text().splitlines(keepends=True)
    parts = []
    for i in range(MANY):
        part = tmp / f"part{i}.jsonl"
        part.write_text("".join(lines[i::MANY]))
        parts.append(part)
    config = tmp / "many.yaml"
    adapters = {f"a{i}": {"data": {"train": str(p)}} for i, p in enumerate(parts)}
    config.write_text(json.dumps({"adapters": adapters}))
    one = train(tmp / "many", 1, [], config)
    if "error" in one:
        return [C.row(f"{MANY} adapters in one run failed: {one['error']}", None)]
    each = [train(tmp / f"each{i}", 1, [f"data.train={p}"]) for i, p in enumerate(parts)]
    failed = [e["error"] for e in each if "error" in e]
    if failed:
        return [C.row(f"{MANY} runs one after another failed: {failed[0]}", None)]
    apart = sum(e["wall"] for e in each)
    return [
        C.row(
            f"{MANY} adapters (r=16, {STEPS} steps of 8 rows each, 1 thread): one run / {MANY} "
            "runs one after another, wall time of the whole commands (loading included)",
            one["wall"],
            apart,
            f"{MANY} runs",
            one["wall"] / apart,
            "<= 1.0x",
            "s",
        ),
        C.row(
            f"{MANY} adapters: training time alone (summary.json train_seconds), one run / "
            f"{MANY} runs",
            one.get("train_seconds"),
            sum(e["train_seconds"] for e in each),
            f"{MANY} runs",
            None,
            "",
            "s",
        ),
    ]
