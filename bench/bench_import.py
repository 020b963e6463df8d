"""What ``import lorakit`` adds to ``import torch``, against what ``import peft`` adds.

Each command runs in a fresh interpreter and the whole subprocess is timed from the outside:
``python -c "import torch"`` (the baseline), ``python -c "import torch, lorakit"`` and
``python -c "import torch, peft"``. Importing torch in all three keeps the figure honest whether
or not a library imports torch eagerly. The three commands run in turn, round after round, so
drift in the machine's load touches all of them alike; the figure is the median over rounds of
(the command's time - the baseline's time in the same round).
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import time

NAME = "import"
TITLE = "Import cost"
ANCHOR_PACKAGES = ["peft"]
ROUNDS = 9


def _time_import(module: str, env: dict[str, str]) -> float:
    code = "import torch" if module == "torch" else f"import torch, {module}"
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    elapsed = time.perf_counter() - start
    if done.returncode != 0:
        raise RuntimeError(f"`{code}` failed:\n{done.stderr}")
    return elapsed


def run(threads: int) -> list[dict]:
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    modules = ["torch", "lorakit", "peft"]
    for module in modules:  # warm the file cache; not counted
        _time_import(module, env)
    times: dict[str, list[float]] = {m: [] for m in modules}
    for _ in range(ROUNDS):
        for module in modules:
            times[module].append(_time_import(module, env))

    def added(module: str) -> float:
        return statistics.median(t - base for t, base in zip(times[module], times["torch"]))

    lorakit, peft = added("lorakit"), added("peft")
    return [
        {
            "figure": "`import torch` (the baseline subtracted below)",
            "lorakit": statistics.median(times["torch"]),
            "anchor": None,
            "anchor_name": "",
            "ratio": None,
            "goal": "",
            "unit": "s",
        },
        {
            "figure": f"time the library adds to `import torch` (median of {ROUNDS})",
            "lorakit": lorakit,
            "anchor": peft,
            "anchor_name": "peft",
            "ratio": lorakit / peft,
            "goal": "<= 0.3 s added",
            "unit": "s",
        },
    ]
