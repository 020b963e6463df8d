"""The LoRA variants at equal steps: held-out exact match, held-out loss and step time.

Each point is one ``lorakit.train.train`` run on the embedded SmolLM2-135M-Instruct (its real
weights), every linear layer but the tied head, ``lora.alpha = 2 r`` (the demo's scale s = 2),
AdamW at ``training.lr = 2e-3`` (the ``auto`` value) with the cosine schedule, batches of 8 rows,
seed 0: the same steps, rows and order for every variant of a task. Only the variant's keys differ:

* LoRA: nothing more;  rsLoRA: ``lora.use_rslora`` (s = alpha / sqrt(r): 8 at r=16, 4 at r=4);
* DoRA: ``lora.use_dora``;  PiSSA: ``lora.init=pissa_niter_4`` (the randomised SVD with 4 subspace
  iterations: the full SVD costs about a minute per run on one thread);  OLoRA: ``lora.init=olora``;
* LoRA+: ``training.loraplus_lr_ratio=16`` (B at 16 x lr, PEFT's example value);
* PiSSA and OLoRA again at ``training.lr=2e-4``, and LoRA+ at ``training.lr=1e-4`` (the README's
  example: B at 1.6e-3): at 2e-3 their first steps diverge;
* with ``training.method=qlora`` (NF4, double quantization): QLoRA; LoftQ (``lora.init=loftq``,
  one iteration); QDoRA (``lora.use_dora``).

Tasks: the demo's dates (``examples/data/dates``) and the small tasks of ``bench/tasks.py``
(numbers, reverse, extract), each at r=16 and r=4. Exact match is greedy decoding on the first
``EVAL_ROWS`` held-out rows in one batch, with new tokens capped per task. Step time is the median
over steps 2.. of each step's process CPU time (one thread: the cores are shared with other work,
which stretches wall time but not CPU time), and its ratio to plain LoRA's at the same point.

Every finished point is appended to ``bench/results/variants.jsonl`` and not run again, so an
interrupted run goes on where it stopped. Subsets, by environment variable (through
``bench/run.py``) or option (run directly, which prints the rows and writes nothing else)::

    python bench/run.py variants --threads 1
    VARIANTS_TASKS=dates VARIANTS_RANKS=4 python bench/run.py variants --threads 1
    python bench/bench_variants.py --tasks dates --ranks 16 4 --variants lora dora --threads 1
    VARIANTS_CACHED=1 python bench/run.py variants   # the table of the points run so far
    VARIANTS_STEPS=3 python bench/run.py variants --no-write     # a quick check end to end
    python bench/bench_variants.py --cached --matrix   # the points run, a variant per row
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import os
import statistics
import sys
import time
import traceback
from pathlib import Path

import torch

import _common as C

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))
import tasks  # noqa: E402

NAME = "variants"
TITLE = "LoRA variants at equal steps: held-out exact match and step time (SmolLM2-135M-Instruct)"
ANCHOR_PACKAGES = ["transformers"]
RESULTS = BENCH / "results" / "variants.jsonl"
RUNS = BENCH.parent / "runs" / "bench_variants"
DATES = BENCH.parent / "examples" / "data" / "dates"
LR = 2e-3
EVAL_ROWS = 32
RANKS = (16, 4)
# task: (optimizer steps of 8 rows, new tokens enough for every answer and the end of turn). The
# demo's dates are nearly learnt after 12 steps; the small tasks need more to separate.
TASKS = {"dates": (12, 12), **{name: (20, spec[2]) for name, spec in tasks.TASKS.items()}}
# key: (label, config overrides)
VARIANTS = {
    "lora": ("LoRA", []),
    "rslora": ("rsLoRA", ["lora.use_rslora=true"]),
    "dora": ("DoRA", ["lora.use_dora=true"]),
    "pissa": ("PiSSA (niter 4)", ["lora.init=pissa_niter_4"]),
    "olora": ("OLoRA", ["lora.init=olora"]),
    "loraplus": ("LoRA+ (ratio 16)", ["training.loraplus_lr_ratio=16"]),
    "qlora": ("QLoRA", ["training.method=qlora"]),
    "loftq": ("LoftQ (QLoRA, 1 iter)", ["training.method=qlora", "lora.init=loftq"]),
    "qdora": ("QDoRA", ["training.method=qlora", "lora.use_dora=true"]),
    # At LoRA's lr the inits that start B non-zero, and LoRA+'s B at 16 x 2e-3, diverge (the loss
    # climbs from 0.9 to 3-14 at step 2): the same at the lower rates usual for them.
    "pissa_lr2e-4": ("PiSSA (niter 4), lr 2e-4", ["lora.init=pissa_niter_4", "training.lr=2e-4"]),
    "olora_lr2e-4": ("OLoRA, lr 2e-4", ["lora.init=olora", "training.lr=2e-4"]),
    "loraplus_lr1e-4": (
        "LoRA+ (ratio 16), lr 1e-4",
        ["training.loraplus_lr_ratio=16", "training.lr=1e-4"],
    ),
}


class StepClock:
    """A metric logger that notes the process CPU time at each training step's record: the
    difference between two records is one step's CPU time (forward, backward, update)."""

    def __init__(self) -> None:
        self.cpu: list[float] = []
        self.wall: list[float] = []

    def log(self, kind, step, values) -> None:
        if kind == "train":
            self.cpu.append(time.process_time())
            self.wall.append(values["seconds"])

    def close(self) -> None:
        pass

    def step_seconds(self) -> tuple[float, float]:
        """(median CPU seconds, median wall seconds) of steps 2.. (the first warms up)."""
        cpu = [b - a for a, b in zip(self.cpu, self.cpu[1:])]
        return statistics.median(cpu), statistics.median(self.wall[1:])


def key(task: str, r: int, variant: str) -> str:
    return f"{task}/r{r}/{variant}"


def done() -> dict[str, dict]:
    """The finished points whose settings are today's, by key."""
    if not RESULTS.is_file():
        return {}
    out = {}
    for line in RESULTS.read_text().splitlines():
        if line.strip():
            rec = json.loads(line)
            if rec["steps"] == TASKS[rec["task"]][0] and rec["eval_rows"] == EVAL_ROWS:
                out[key(rec["task"], rec["r"], rec["variant"])] = rec
    return out


def data_dir(task: str) -> Path:
    """The task's two files: the demo's, or ``bench/tasks.py``'s (the defaults sweep's rows)."""
    return DATES if task == "dates" else tasks.write(RUNS / "data", task)


def set_steps(steps: int) -> None:
    """Every task at ``steps`` steps (a quick check end to end; its points are kept apart)."""
    for task, (_, new_tokens) in TASKS.items():
        TASKS[task] = (steps, new_tokens)


_BASE: list = []  # the base model and tokenizer, loaded once per process


def run_one(task: str, r: int, variant: str, threads: int) -> dict:
    from lorakit.errors import LorakitError
    from lorakit.models import load_model
    from lorakit.train import load_config, train
    from lorakit.train.progress import Silent

    if not _BASE:
        _BASE.extend(load_model(None))
    base, tokenizer = _BASE
    steps, new_tokens = TASKS[task]
    data = data_dir(task)
    before = variant == "lora" and r == RANKS[0]  # the untrained model, once per task
    overrides = [
        f"data.train={data / 'train.jsonl'}",
        f"data.eval={data / 'held_out.jsonl'}",
        f"lora.r={r}",
        f"lora.alpha={2 * r}",
        f"training.lr={LR}",
        f"training.steps={steps}",
        f"training.threads={threads}",
        f"evaluation.max_rows={EVAL_ROWS}",
        f"evaluation.batch_size={EVAL_ROWS}",
        f"evaluation.max_new_tokens={new_tokens}",
        f"evaluation.before={str(before).lower()}",
        "evaluation.samples=0",
        "output.plot=false",
        "output.report=false",
        "output.overwrite=true",
        f"output.dir={RUNS / task / f'r{r}' / variant}",
        *VARIANTS[variant][1],
    ]
    rec = {"task": task, "r": r, "variant": variant, "steps": steps, "eval_rows": EVAL_ROWS}
    clock = StepClock()
    t0 = time.perf_counter()
    try:
        result = train(
            load_config(None, overrides),
            model=copy.deepcopy(base),
            tokenizer=tokenizer,
            loggers=[clock],
            console=Silent(),
        )
    except LorakitError as exc:  # a variant that fails at these settings is a result too
        rec["failed"] = f"{type(exc).__name__}: {str(exc).splitlines()[0]}"
        traceback.print_exc()
    else:
        cpu, wall = clock.step_seconds()
        after = result.after
        rec.update(
            exact=after.exact,
            total=after.total,
            loss=after.loss,
            before_exact=result.before.exact if result.before else None,
            before_loss=result.before.loss if result.before else None,
            step_cpu_s=round(cpu, 4),
            step_wall_s=round(wall, 4),
            train_s=round(result.train_seconds, 1),
            eval_s=round(after.seconds, 1),
        )
    rec.update(
        total_s=round(time.perf_counter() - t0, 1),
        load_average=round(os.getloadavg()[0], 1),
        threads=threads,
        date=datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
    )
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    with RESULTS.open("a") as f:  # one short line per point, appended whole
        f.write(json.dumps(rec) + "\n")
    return rec


def grid(names, ranks, variants) -> list[tuple[str, int, str]]:
    """The points in the order they run: task by task, r=16 then r=4, every variant."""
    return [(t, r, v) for t in names for r in ranks for v in variants]


def sweep(points, threads: int) -> None:
    for task, r, variant in points:
        if key(task, r, variant) in done():
            continue
        rec = run_one(task, r, variant, threads)
        got = (
            rec.get("failed")
            or f"exact {rec['exact']}/{rec['total']} loss {rec['loss']:.3f} "
            f"step {rec['step_cpu_s']:.2f} s CPU"
        )
        print(f"{key(task, r, variant):24} {got}  ({rec['total_s']:.0f} s)", flush=True)


def rows(points) -> list[dict]:
    """One row per point run (exact match against plain LoRA's at the same point) and, per
    variant, its step time against LoRA's over the points both ran."""
    have = done()
    out, ratios = [], {v: [] for v in VARIANTS}
    for task, r, variant in points:
        rec, lora = have.get(key(task, r, variant)), have.get(key(task, r, "lora"))
        if rec is None:
            continue
        label = VARIANTS[variant][0]
        head = f"{task}, r={r}, {rec['steps']} steps: {label}"
        if "failed" in rec:
            out.append(C.row(f"{head}: failed ({rec['failed']})", None, unit="%"))
            continue
        exact = 100 * rec["exact"] / rec["total"]
        notes = [f"loss {rec['loss']:.3f}", f"step {rec['step_cpu_s']:.2f} s CPU"]
        if rec["before_exact"] is not None:
            notes.append(f"untrained {100 * rec['before_exact'] / rec['total']:.0f} %")
        anchor = None
        if variant != "lora" and lora is not None and "failed" not in lora:
            anchor = 100 * lora["exact"] / lora["total"]
            ratio = rec["step_cpu_s"] / lora["step_cpu_s"]
            ratios[variant].append((rec["step_cpu_s"], lora["step_cpu_s"], ratio))
            notes[1] += f", {ratio:.2f}x LoRA's"
            notes.insert(1, f"LoRA's {lora['loss']:.3f}")
        figure = f"{head} held-out exact match ({'; '.join(notes)})"
        out.append(C.row(figure, exact, anchor, "LoRA" if anchor is not None else "", unit="%"))
    for variant, got in ratios.items():
        if got:
            out.append(
                C.row(
                    f"{VARIANTS[variant][0]}: step CPU time, median over the {len(got)} points "
                    "run (ratio: median of the per-point ratios)",
                    statistics.median(g[0] for g in got),
                    statistics.median(g[1] for g in got),
                    "LoRA",
                    statistics.median(g[2] for g in got),
                    unit="s",
                )
            )
    return out


def matrix(points) -> str:
    """The points run as one markdown table: a row per variant, a column per task and rank, each
    cell the held-out exact match (and loss); for the text under BENCHMARKS.md's section."""
    have = done()
    columns = list(dict.fromkeys((t, r) for t, r, _ in points))
    columns = [c for c in columns if any(key(*c, v) in have for v in VARIANTS)]
    head = " | ".join(f"{t} r={r} ({TASKS[t][0]} steps)" for t, r in columns)
    lines = [f"| variant | {head} |", "|" + "---|" * (len(columns) + 1)]
    for variant in dict.fromkeys(v for _, _, v in points):
        cells = []
        for t, r in columns:
            rec = have.get(key(t, r, variant))
            if rec is None:
                cells.append("–")
            elif "failed" in rec:
                cells.append("failed")
            else:
                cells.append(f"{100 * rec['exact'] / rec['total']:.0f} % ({rec['loss']:.3f})")
        lines.append(f"| {VARIANTS[variant][0]} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _env_list(name: str, default, cast=str) -> list:
    value = os.environ.get(name, "").replace(",", " ").split()
    return [cast(v) for v in value] if value else list(default)


def _check(names, ranks, variants) -> None:
    for given, known, what in ((names, TASKS, "task"), (variants, VARIANTS, "variant")):
        unknown = [n for n in given if n not in known]
        if unknown:
            raise SystemExit(f"unknown {what} {', '.join(unknown)}; known: {', '.join(known)}")
    if any(r < 1 for r in ranks):
        raise SystemExit(f"ranks must be positive, got {ranks}")


def run(threads: int) -> list[dict]:
    names = _env_list("VARIANTS_TASKS", TASKS)
    ranks = _env_list("VARIANTS_RANKS", RANKS, int)
    variants = _env_list("VARIANTS_ONLY", VARIANTS)
    _check(names, ranks, variants)
    if os.environ.get("VARIANTS_STEPS"):
        set_steps(int(os.environ["VARIANTS_STEPS"]))
    points = grid(names, ranks, variants)
    if os.environ.get("VARIANTS_CACHED", "") not in ("1", "true", "yes"):
        torch.set_num_threads(threads)
        sweep(points, threads)
    return rows(points)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", nargs="*", default=list(TASKS))
    parser.add_argument("--ranks", nargs="*", type=int, default=list(RANKS))
    parser.add_argument("--variants", nargs="*", default=list(VARIANTS))
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--steps", type=int, help="every task at this many steps (a quick check)")
    parser.add_argument("--cached", action="store_true", help="print the points run; train none")
    parser.add_argument("--matrix", action="store_true", help="with --cached: one markdown table")
    args = parser.parse_args(argv)
    _check(args.tasks, args.ranks, args.variants)
    if args.steps:
        set_steps(args.steps)
    points = grid(args.tasks, args.ranks, args.variants)
    if not args.cached:
        torch.set_num_threads(args.threads)
        sweep(points, args.threads)
    if args.matrix:
        print(matrix(points))
        return 0
    for row in rows(points):
        ratio = f"  ({row['ratio']:.3g}x)" if row["ratio"] is not None else ""
        print(f"{row['figure']}: {row['lorakit']} vs {row['anchor']}{ratio}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
