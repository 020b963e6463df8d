"""Training past one process: 1 process x 1 thread against 2 processes x 1 thread (torchrun, gloo).

Runs ``lorakit train examples/date_demo.yaml`` in fresh processes on the embedded
SmolLM2-135M-Instruct with the same global batch (``SETTINGS``: LoRA r=16 on every linear layer,
``STEPS`` steps of 8 rows, rows of at most 96 tokens, no evaluation): alone, then under
``python -m torch.distributed.run --nproc_per_node 2`` with ``training.distributed=ddp`` and
``fsdp``; the same three with ``training.method=qlora``. Training tokens/s come from each run's
``metrics.jsonl`` (the steps after the first ``SKIP``, whose times include the first calls'
set-up), peak memory per process from its ``summary.json``. On a machine with fewer than 2 cores
the distributed rows say so instead of a figure. The world size is the only difference between
the runs, so the ratio is the speed-up of data parallelism here (the goal: at least 1.7x for DDP).
The 1-process figure is the mean of a run before the 2-process runs and one after them (a shared
machine's speed drifts by 10% between runs); two independent 1-process runs at once show what two
processes can reach on this machine without communicating.
Many adapters in one run are measured by ``bench_many_adapters.py`` with the same settings.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import _common as C

NAME = "distributed"
TITLE = "Training on 2 processes (torchrun, gloo) against 1, SmolLM2-135M-Instruct"
ANCHOR_PACKAGES = ["transformers"]
DEMO = Path(__file__).resolve().parents[1] / "examples" / "date_demo.yaml"
STEPS = 8
SKIP = 2
SETTINGS = [
    "lora.r=16", "lora.alpha=32", "training.lr=2e-3", f"training.steps={STEPS}",
    "training.batch_size=8", "data.max_length=96", "training.log_every=1",
    "training.checkpoint_every=0", "evaluation.before=false", "data.eval=null",
    "output.plot=false", "training.threads=1",
]  # fmt: skip
RUN_TIMEOUT = 900  # seconds, one run


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def train(out: Path, processes: int, overrides: list[str], config: Path = DEMO) -> dict:
    """One run; its summary, with ``tokens_per_s`` measured over the steps after ``SKIP``, and
    the command's wall time."""
    args = ["train", str(config), f"output.dir={out}", *SETTINGS, *overrides]
    if processes == 1:
        command = [sys.executable, "-m", "lorakit", *args]
    else:
        command = [
            sys.executable, "-m", "torch.distributed.run", "--nnodes", "1",
            "--nproc_per_node", str(processes), "--master_addr", "127.0.0.1",
            "--master_port", str(free_port()), "-m", "lorakit", *args,
        ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    start = time.perf_counter()
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=RUN_TIMEOUT)
    wall = time.perf_counter() - start
    if done.returncode != 0:
        tail = (done.stderr or done.stdout).strip().splitlines()[-3:]
        return {"error": f"exit {done.returncode}: {' / '.join(tail)[:200]}"}
    summary = json.loads((out / "summary.json").read_text())
    summary["wall"] = wall
    if not (out / "metrics.jsonl").is_file():  # many adapters: each has its own metrics
        return summary
    steps = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [s for s in steps if s["kind"] == "train" and s["step"] > SKIP]
    summary["measured_tokens_per_s"] = sum(s["tokens"] for s in steps) / sum(
        s["seconds"] for s in steps
    )
    summary["losses"] = [s["loss"] for s in steps]
    return summary


def run(threads: int) -> list[dict]:
    del threads  # every process here has one thread: the comparison is of processes
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    out: list[dict] = []
    with tempfile.TemporaryDirectory() as tmp:
        for method in ("lora", "qlora"):
            extra = [f"training.method={method}"]
            alone = train(Path(tmp) / f"{method}-1", 1, extra)
            if "error" in alone:
                out.append(C.row(f"{method}: 1 process failed: {alone['error']}", None))
                continue
            pending = []
            if cores >= 2:
                out.append(ceiling(Path(tmp), method, extra, alone))
            for mode in ("ddp", "fsdp"):
                if cores < 2:
                    out.append(C.row(f"{method}, {mode}: not measured, {cores} core(s)", None))
                    continue
                two = train(
                    Path(tmp) / f"{method}-{mode}", 2, [*extra, f"training.distributed={mode}"]
                )
                pending.append((mode, two))
            # the 1-process figure is the mean of a run before the 2-process runs and one after
            # them, so that a machine that slows down or speeds up meanwhile moves both sides
            again = train(Path(tmp) / f"{method}-1-again", 1, extra)
            if "error" not in again:
                alone = bracketed(alone, again)
            for mode, two in pending:
                out += rows(method, mode, alone, two)
    return out


def bracketed(before: dict, after: dict) -> dict:
    """One process's figures as the mean of two runs (its losses from the first: the same)."""
    both = (before["measured_tokens_per_s"], after["measured_tokens_per_s"])
    mean = dict(before)
    mean["measured_tokens_per_s"] = sum(both) / 2
    mean["runs"] = both
    return mean


def ceiling(tmp: Path, method: str, extra: list[str], alone: dict) -> dict:
    """Two independent 1-process runs at the same time, each on the whole global batch: their
    summed tokens/s against one run alone is what two processes can reach on this machine
    (shared memory bandwidth, caches and clock), before any communication."""
    import threading

    results: list[dict] = [{}, {}]

    def one(i: int) -> None:
        results[i] = train(tmp / f"{method}-apart-{i}", 1, extra)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    label = method.replace("qlora", "QLoRA").replace("lora", "LoRA")
    failed = [r["error"] for r in results if "error" in r]
    if failed:
        return C.row(f"{label}: two 1-process runs at once failed: {failed[0]}", None)
    both = sum(r["measured_tokens_per_s"] for r in results)
    return C.row(
        f"{label}: diagnostic: two independent 1-process runs at once, summed training tokens/s "
        "/ one run alone (what 2 processes can reach here without communicating)",
        both,
        alone["measured_tokens_per_s"],
        "1 process alone",
        both / alone["measured_tokens_per_s"],
        "",
        "tok/s",
    )


def _runs(alone: dict) -> str:
    runs = alone.get("runs")
    return "" if runs is None else f", mean of {runs[0]:.1f} before and {runs[1]:.1f} after"


def rows(method: str, mode: str, alone: dict, two: dict) -> list[dict]:
    label = f"{method.replace('qlora', 'QLoRA').replace('lora', 'LoRA')}, {mode.upper()}"
    if "error" in two:
        return [C.row(f"{label}: 2 processes failed: {two['error']}", None)]
    speed = two["measured_tokens_per_s"] / alone["measured_tokens_per_s"]
    peaks = two.get("peak_memory_mb_per_process") or [two["peak_memory_mb"]]
    drift = max(abs(a - b) for a, b in zip(two["losses"], alone["losses"]))
    ranks = ", ".join(f"{p:,.0f}" for p in peaks)
    return [
        C.row(
            f"{label}: training tokens/s, 2 processes x 1 thread / 1 process x 1 thread, global "
            f"batch 8 rows, steps {SKIP + 1}-{STEPS}",
            two["measured_tokens_per_s"],
            alone["measured_tokens_per_s"],
            "1 process" + _runs(alone),
            speed,
            ">= 1.7x" if mode == "ddp" else "",
            "tok/s",
        ),
        C.row(
            f"{label}: peak resident memory per process, the largest (ranks: {ranks} MB)",
            max(peaks),
            alone["peak_memory_mb"],
            "1 process",
            max(peaks) / alone["peak_memory_mb"],
            "",
            "MB",
        ),
        C.row(
            f"{label}: diagnostic: largest difference of a logged loss from 1 process's "
            f"(steps {SKIP + 1}-{STEPS})",
            f"{drift:.1e}",
        ),
    ]
