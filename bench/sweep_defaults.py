"""The evidence for the training defaults: learning rate, rank and epochs swept on small tasks.

    python bench/sweep_defaults.py --lr 2e-4 1e-3 2e-3 4e-3 --r 16     # one run per task and point
    python bench/sweep_defaults.py --r 8 32 --lr 2e-3 --tasks numbers
    python bench/sweep_defaults.py --epochs 2 3 --lr 2e-3
    python bench/sweep_defaults.py --defaults                            # data files only
    python bench/sweep_defaults.py --all       # the grid of BENCHMARKS.md (GRID below)
    python bench/sweep_defaults.py --table     # the table, into BENCHMARKS.md

Each run is ``lorakit.train.train`` on the embedded SmolLM2-135M-Instruct with a config that sets
the task's data files and the swept keys and leaves everything else at its default (``lora.alpha``
follows the rank as ``2 r``, the scale of the demo's r=16 alpha=32). The evaluation is capped for
speed (48 held-out rows in one generation batch, new tokens enough for the task's answers); exact
match before training is measured by the ``--defaults`` runs only. Every run appends one line to
``bench/results/sweep_defaults.jsonl``: held-out exact match and loss, steps, wall time; a point
already there is not run again.
"""

from __future__ import annotations

import argparse
import datetime
import itertools
import json
import os
import platform
import resource
import subprocess
import sys
from pathlib import Path

import torch

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))
import tasks  # noqa: E402

RESULTS = BENCH / "results" / "sweep_defaults.jsonl"
RUNS = BENCH.parent / "runs" / "sweep_defaults"
EVAL = ["evaluation.max_rows=48", "evaluation.batch_size=48"]
QUIET = ["evaluation.samples=0", "output.plot=false", "output.overwrite=true"]
TITLE = "Defaults that learn: learning rate, rank and epochs on small tasks (SmolLM2-135M)"
# The grid behind BENCHMARKS.md's table (2 shared cores allowed no more), one command line each.
GRID = [
    "--lr 2e-3 --r 16 8 --tasks numbers",
    "--lr 2e-3 1e-3 --r 16 --tasks reverse",
    "--lr 1e-3 4e-3 2e-4 --r 16 --tasks numbers",
    "--defaults",
    "--lr 2e-3 --r 8 --epochs 1 3 --tasks extract",
    "--lr 1e-3 --r 8 --epochs 2 --tasks extract",
    "--lr 2e-3 --r 16 --epochs 2 --tasks extract",
]
NOTE = (
    "Other jobs shared the 2 cores during the sweep (load average 2 to 10), so the wall times are "
    "two to six times an idle machine's; the CPU time (user and system, one thread) is what a run "
    "costs."
)
MARKERS = ("<!-- bench:defaults -->", "<!-- /bench:defaults -->")


def point_name(point: dict) -> str:
    return ",".join(f"{k}={v}" for k, v in point.items()) or "defaults"


def done() -> dict[tuple[str, str], dict]:
    if not RESULTS.is_file():
        return {}
    rows = [json.loads(line) for line in RESULTS.read_text().splitlines() if line.strip()]
    return {(r["task"], r["point"]): r for r in rows}


def run_one(task: str, point: dict, threads: int, before: bool) -> dict:
    from lorakit.train import load_config, train

    data = tasks.write(RUNS / "data", task)
    overrides = [f"data.train={data / 'train.jsonl'}", f"data.eval={data / 'held_out.jsonl'}"]
    if "r" in point:
        overrides += [f"lora.r={point['r']}", f"lora.alpha={2 * point['r']}"]
    if "lr" in point:
        overrides.append(f"training.lr={point['lr']}")
    if point:  # a point that does not name the epochs runs one (the default before `auto`)
        overrides.append(f"training.epochs={point.get('epochs', 1)}")
    out = RUNS / task / point_name(point).replace("=", "")
    overrides.append(f"evaluation.max_new_tokens={tasks.TASKS[task][2]}")
    overrides += EVAL + QUIET + [f"output.dir={out}", f"training.threads={threads}"]
    overrides.append(f"evaluation.before={str(before).lower()}")
    cpu0 = resource.getrusage(resource.RUSAGE_SELF)
    train(load_config(None, overrides))
    cpu1 = resource.getrusage(resource.RUSAGE_SELF)
    s = json.loads((out / "summary.json").read_text())
    record = {
        "task": task,
        "point": point_name(point),
        "train_rows": s["train_rows"],
        "steps": s["steps"],
        "exact": s["after"]["exact"],
        "total": s["after"]["total"],
        "loss": s["after"]["loss"],
        "before_exact": s["before"]["exact"] if s["before"] else None,
        "before_loss": s["before"]["loss"] if s["before"] else None,
        "train_seconds": round(s["train_seconds"], 1),
        "total_seconds": round(s["total_seconds"], 1),
        "cpu_seconds": round(cpu1.ru_utime + cpu1.ru_stime - cpu0.ru_utime - cpu0.ru_stime, 1),
        "load_average": round(os.getloadavg()[0], 1),
        "threads": threads,
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    with RESULTS.open("a") as f:
        f.write(json.dumps(record) + "\n")
    return record


def sweep(points: list[dict], names: list[str], threads: int) -> None:
    for point in points:
        for task in names:
            have = done()
            if (task, point_name(point)) in have:
                continue
            r = run_one(task, point, threads, before=not point)
            print(
                f"{task:8} {r['point']:26} exact {r['exact']}/{r['total']}  loss {r['loss']:.3f}"
                f"  {r['steps']} steps  {r['total_seconds']:.0f} s",
                flush=True,
            )


def cpu_name() -> str:
    try:
        text = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    except OSError:
        return platform.processor() or "unknown"
    info = dict(line.split(":", 1) for line in text.splitlines() if ":" in line)
    name = info.get("Model name", "unknown").strip()
    flags = info.get("Flags", "").split()
    isa = "AVX-512" if "avx512f" in flags else "AVX2" if "avx2" in flags else "no AVX2"
    return f"{name} ({isa})"


def before(r: dict) -> str:
    return f"{100 * r['before_exact'] / r['total']:.0f} % (loss {r['before_loss']:.2f})"


def cpu(r: dict) -> str:
    return f", {r['cpu_seconds']:.0f} s CPU" if r.get("cpu_seconds") else ""


def label(point: str) -> str:
    """``lr=0.002,r=16`` -> ``lr 2e-3, r=16, 1 epoch``."""
    if point == "defaults":
        return "**defaults** (lr auto, r=8, epochs auto)"
    keys = dict(item.split("=") for item in point.split(","))
    lr = f"{float(keys['lr']):.0e}".replace("e-0", "e-") if "lr" in keys else "lr auto"
    epochs = float(keys.get("epochs", 1))
    return f"lr {lr}, r={keys.get('r', 8)}, {epochs:g} epoch{'s' if epochs != 1 else ''}"


def order(point: str) -> tuple:
    if point == "defaults":
        return (1,)
    keys = dict(item.split("=") for item in point.split(","))
    return (0, float(keys.get("lr", 0)), int(keys.get("r", 8)), float(keys.get("epochs", 1)))


def table() -> str:
    rows = sorted(done().values(), key=lambda r: (order(r["point"]), r["task"]))
    names = list(tasks.TASKS)
    base = {r["task"]: r for r in rows if r["before_exact"] is not None}
    head = "| config (only data and these keys) | " + " | ".join(names) + " |"
    lines = [head, "|" + "---|" * (len(names) + 1)]
    lines.append(
        "| before training | "
        + " | ".join(before(base[t]) if t in base else "–" for t in names)
        + " |"
    )
    by_label: dict[str, dict[str, dict]] = {}  # "lr=0.002" and "lr=0.002,epochs=1" are one row
    for r in rows:
        by_label.setdefault(label(r["point"]), {})[r["task"]] = r
    for text, got in by_label.items():
        cells = []
        for t in names:
            r = got.get(t)
            cells.append(
                "–"
                if r is None
                else f"{100 * r['exact'] / r['total']:.0f} % (loss {r['loss']:.2f}; "
                f"{r['steps']} steps; {r['total_seconds']:.0f} s{cpu(r)})"
            )
        lines.append(f"| {text} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def load() -> str:
    loads = sorted(r["load_average"] for r in done().values() if "load_average" in r)
    return f"{loads[0]:g} to {loads[-1]:g}" if len(loads) > 1 else f"{loads[0]:g}" if loads else "–"


def write_table(path: Path) -> None:
    dates = sorted(r["date"] for r in done().values())
    threads = sorted({r["threads"] for r in done().values()})
    section = "\n".join(
        [
            MARKERS[0],
            f"## {TITLE}",
            "",
            "- command: `python bench/sweep_defaults.py --all --threads 1` (the command lines "
            + "; ".join(f"`{line}`" for line in GRID)
            + "), then `python bench/sweep_defaults.py --table`",
            f"- date: {dates[0]} to {dates[-1]}",
            f"- torch {torch.__version__}; Python {platform.python_version()}; "
            f"threads: {', '.join(map(str, threads))}; CPU: {cpu_name()}",
            "- tasks (`bench/tasks.py`): "
            + "; ".join(f"{n} ({rows} training rows)" for n, (_, rows, _) in tasks.TASKS.items())
            + "; 48 held-out rows each over values never trained on",
            "- each cell: held-out exact match (held-out loss; optimizer steps of 8 rows; wall "
            "time of the whole run, loading and evaluation included, and the CPU time it took)",
            f"- {NOTE} Load average where recorded: {load()}.",
            "",
            table(),
            MARKERS[1],
        ]
    )
    text = path.read_text()
    start, end = text.find(MARKERS[0]), text.find(MARKERS[1])
    if start >= 0 and end >= 0:
        text = text[:start] + section + text[end + len(MARKERS[1]) :]
    else:
        text = text.rstrip("\n") + "\n\n" + section + "\n"
    path.write_text(text)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lr", nargs="*", type=float, default=[])
    parser.add_argument("--r", nargs="*", type=int, default=[])
    parser.add_argument("--epochs", nargs="*", type=float, default=[])
    parser.add_argument("--defaults", action="store_true", help="one run per task, data only")
    parser.add_argument("--tasks", nargs="*", default=list(tasks.TASKS))
    parser.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))
    parser.add_argument("--table", action="store_true", help="write the table to BENCHMARKS.md")
    parser.add_argument("--all", action="store_true", help="every command line of GRID")
    args = parser.parse_args(argv)
    if args.all:
        for line in GRID:
            main([*line.split(), "--threads", str(args.threads)])
        return 0
    if args.table:
        write_table(BENCH.parent / "BENCHMARKS.md")
        return 0
    axes = {"lr": args.lr, "r": args.r, "epochs": args.epochs}
    keys = [k for k, v in axes.items() if v]
    points = [] if not keys and not args.defaults else [{}]
    if keys:
        points = [dict(zip(keys, values)) for values in itertools.product(*(axes[k] for k in keys))]
    sweep(points, args.tasks, args.threads)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
