"""Many adapters in one run: one base, each adapter trained only from its own rows.

``train`` (``loop.py``) hands a config with ``adapters:`` to :func:`train_adapters`; the run goes
through the same steps as the one-adapter loop, from the same pieces (``setup.py``,
``step.adapters_step``, ``checkpoint.py``, ``resume.py``, ``report.py``). Loggers given in code
hear each adapter's records with an ``"adapter"`` entry; the console's step lines show the mean
of the adapters' losses.

A config with an ``adapters:`` section (see :mod:`lorakit.train.multi_config`) is a run of its
own, started like any other::

    lorakit train customers.yaml
    torchrun --nproc_per_node 2 -m lorakit train customers.yaml training.distributed=fsdp

```yaml
model:    {source: path/to/base}
lora:     {r: 8, alpha: 16}                     # every adapter's defaults
training: {steps: 200, batch_size: 8, lr: 1.0e-3}
adapters:
  acme:   {data: {train: acme/train.jsonl, eval: acme/eval.jsonl}}
  globex: {data: {train: globex/train.jsonl}, lora: {r: 4, target_modules: [q_proj, v_proj]}}
output:   {dir: runs/customers}
```

**The same as each run alone.** The base is loaded once and each adapter applied with its own
``lora`` settings, the random generator seeded with ``training.seed`` before each, so its A
matrices are the ones its own run would start from. Each adapter has its own data stream
(``Batches`` with the same seed: the order of its own run). Each micro-batch is one
micro-batch of ``training.batch_size`` rows *per adapter*, concatenated and run in one forward
under :func:`lorakit.adapter_per_row`, so each adapter gets gradient from its own rows only.
Each adapter's loss is divided by its own trained tokens, its gradient is clipped by itself,
and the optimizer (AdamW or SGD) keeps its state per parameter: each adapter takes the step its
own run alone takes, up to float32 rounding (a batch padded to the widest row of all the
adapters sums in another order). LoRA dropout draws other masks than a run alone (the same
probability). The learning-rate schedule is shared.

**Steps**: ``training.steps``, or ``training.epochs`` passes over the largest adapter's rows
(smaller adapters cycle through theirs more often). Under torchrun each rank takes its share
of every adapter's micro-batch, and the token counts and losses are summed per adapter across
ranks (:mod:`lorakit.train.distributed`); rank 0 writes.

**Outputs** in ``output.dir``: ``adapters/NAME/`` holds each adapter's own ``adapter/`` (PEFT's
layout), ``metrics.jsonl`` (its losses), ``summary.json``, ``report.md`` and ``loss.png``: what
its own run would write, so an adapter's directory can be handed to its customer alone (the
report's config is the one that trains that adapter alone). ``summary.md`` and
``summary.json`` beside them compare the adapters in one table. Checkpoints
(``checkpoint-NNNNNN/``) hold every adapter's parameters and optimizer state and each stream's
position; ``training.resume`` continues them.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..errors import DataError
from ..model import adapter_parameters, count_parameters, lora_layers, set_adapter
from . import checkpoint, schedule
from .best import BestKeeper
from .config import TrainConfig
from .data import Batches, collate, to_device
from .evaluate import EvalResult, evaluate, heldout_loss
from .metrics import JsonlLogger, read_metrics
from .output import write_text
from .progress import Console, Silent
from .report import peak_memory_mb, write_results
from .result import TrainResult, eval_dict, eval_values
from .resume import resume
from .setup import (
    build_optimizer,
    check_and_read,
    encode_rows,
    load_and_adapt,
    pad_id,
    resolve_steps,
    save_trained,
    spread,
)
from .step import adapters_step


@dataclass
class ManyResult:
    """What a many-adapter run gives back: each adapter's :class:`TrainResult`, by name."""

    out_dir: Path
    steps: int
    start_step: int
    adapters: dict[str, TrainResult] = field(default_factory=dict)
    train_seconds: float = 0.0
    processes: int = 1
    distributed: str = "none"
    summary: dict[str, Any] = field(default_factory=dict)  # summary.json's contents


class Streams:
    """Each adapter's :class:`Batches`, saved and restored together (a checkpoint's data)."""

    def __init__(self, batches: dict[str, Batches]):
        self.batches = batches

    def state_dict(self) -> dict[str, Any]:
        return {"streams": {name: b.state_dict() for name, b in self.batches.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        streams = state.get("streams")
        if not isinstance(streams, dict) or set(streams) != set(self.batches):
            raise DataError(
                f"the checkpoint's data streams are {sorted(streams or {})}, the run's adapters "
                f"{sorted(self.batches)}: resume with the same adapters"
            )
        for name, batches in self.batches.items():
            batches.load_state_dict(streams[name])


class Keepers:
    """Each adapter's :class:`BestKeeper` (of its own parameters), saved and restored together."""

    def __init__(self, keepers: dict[str, BestKeeper]):
        self.keepers = keepers

    def state_dict(self) -> dict[str, Any]:
        return {name: k.state_dict() for name, k in self.keepers.items()}

    def load_state_dict(self, state: Any, saved: checkpoint.Saved) -> None:
        for name, keeper in self.keepers.items():
            keeper.load_state_dict((state or {}).get(name), saved)

    def checkpoint_tensors(self, step: int, model: torch.nn.Module):
        """``best.safetensors`` of a checkpoint at ``step``: every trainable parameter, each
        adapter's as its best step left it (None when every best is this step's)."""
        if all(k.checkpoint_tensors(step) is None for k in self.keepers.values()):
            return None
        tensors = checkpoint.trainable_state(model)
        for keeper in self.keepers.values():
            tensors.update(keeper.checkpoint_tensors(step) or {})
        return tensors


@dataclass
class Adapter:
    """One adapter's part of the run."""

    name: str
    cfg: TrainConfig  # the config that trains this adapter alone (the report shows it)
    rows: Any  # setup.Rows
    out: Path  # output.dir/adapters/NAME
    batches: Batches
    result: TrainResult
    params: list = field(default_factory=list)
    keeper: BestKeeper | None = None
    fingerprint: dict | None = None  # the base's, taken before FSDP shards it
    logger: JsonlLogger | None = None


def train_adapters(config: TrainConfig, world, model, tokenizer, loggers, console) -> ManyResult:
    """The many-adapter run (``train`` calls it for a config with ``adapters:``): the steps of
    ``loop.py``, for every adapter at once."""
    t_begin = time.perf_counter()
    if not world.main:
        console, loggers = Silent(), []
    say = console.message if console else print
    sections, out = config.adapters, Path(config.output.dir)
    names = [a.name for a in sections]

    # 1-3. Packages, every adapter's data, the output directory; the base and every adapter; tokens.
    metrics = [out / "adapters" / n / "metrics.jsonl" for n in names]
    read = check_and_read(
        config, [(a.data, a.evaluation) for a in sections], metrics, world, model is None
    )
    model, tokenizer, model_name, device = load_and_adapt(
        config, model, tokenizer, say, world, sections
    )
    trainable, total = count_parameters(model)
    say(
        f"{config.training.method}: {len(names)} adapters ({', '.join(names)}), trainable "
        f"{trainable:,} / {total:,} ({100 * trainable / total:.2f}%)"
    )
    encoded = [
        encode_rows(tr, ev, tokenizer, a.data, say, f"{a.name}'s ")
        for a, (tr, ev) in zip(sections, read)
    ]
    pad = pad_id(tokenizer)
    largest = max(encoded, key=lambda r: len(r.train))
    cfg, steps = resolve_steps(config, total - trainable, largest, say)
    tc = cfg.training
    runs = []
    for a, rows in zip(sections, encoded):
        own = sum(p.numel() for p in adapter_parameters(model, a.name))
        result = TrainResult(out / "adapters" / a.name, steps, 0, trainable=own)
        result.total = total - trainable + own  # as its own run counts: the base and itself
        batches = Batches(rows.train, tc.batch_size, tc.seed)
        runs.append(Adapter(a.name, cfg.alone(a), rows, result.out_dir, batches, result))
    if world.sharded:  # each adapter's own fingerprint, while the base is still whole
        from ..io import fingerprint as fp

        for run in runs:
            paths = [p for p, layer in lora_layers(model) if run.name in layer.lora_A]
            run.fingerprint = fp.fingerprint(model, paths)
    net, model = spread(model, world, say, "each adapter's training.batch_size rows are shared")

    # 4. One optimizer and schedule; each adapter's parameters (after FSDP replaced them).
    params = [p for p in net.parameters() if p.requires_grad]
    for run in runs:
        run.params = [p for p in adapter_parameters(model, run.name) if p.requires_grad]
    optimizer = build_optimizer(params, tc, model, say)
    scheduler = schedule.build(optimizer, steps, tc.warmup_steps, tc.schedule, tc.min_lr_ratio)
    streams = Streams({run.name: run.batches for run in runs})
    for run in runs:
        ec = run.cfg.evaluation
        if ec.every and run.rows.eval:
            ids = {id(p) for p in run.params}
            mine = {n for n, p in model.named_parameters() if id(p) in ids}
            run.keeper = BestKeeper(0, cfg.output.keep_best, mine)
    keepers = Keepers({run.name: run.keeper for run in runs if run.keeper is not None})
    start, before = 0, {}
    if tc.resume:
        restored = resume(out, cfg, model, optimizer, scheduler, streams, say, keepers)
        if restored is not None:
            saved, _ = restored
            start = saved.state["step"]
            before = saved.state["notes"].get("adapters_before") or {}
            say(f"resumed from {saved.path.name} at step {start} of {steps}")
    for run in runs:
        run.result.start_step = start
        d = before.get(run.name)
        run.result.before = EvalResult(**d) if isinstance(d, dict) else None
        if world.main:
            run.logger = JsonlLogger(run.out / "metrics.jsonl", keep_until=start or None)
    loggers = list(loggers or [])
    console = console or Console(steps, start, tc.log_every)

    def log(run: Adapter, kind: str, step: int, values: dict[str, Any]) -> None:
        if run.logger is not None:
            run.logger.log(kind, step, values)
        for logger in loggers:  # the user's loggers hear every adapter, named
            logger.log(kind, step, {"adapter": run.name, **values})

    def evaluations(when: str) -> None:
        for run in runs:
            ec = run.cfg.evaluation
            if not run.rows.eval or (when == "before" and not (ec.before and start == 0)):
                continue
            set_adapter(model, run.name)
            got = evaluate(
                model, tokenizer, run.rows.eval, batch_size=ec.batch_size,
                max_new_tokens=ec.max_new_tokens, exact_match=ec.exact_match, samples=ec.samples,
            )  # fmt: skip
            console.message(f"{run.name}, {when} training: {got.line()} ({got.seconds:.1f} s)")
            if when == "before":
                run.result.before = got
                log(run, "eval", 0, eval_values(got))
            else:
                run.result.after = got
                log(run, "eval", run.result.kept_step, eval_values(got))
                if run.result.kept_loss is None:
                    run.result.kept_loss = got.loss

    def held_out(run: Adapter, step: int) -> float:
        set_adapter(model, run.name)
        ec = run.cfg.evaluation
        return heldout_loss(model, run.rows.eval, ec.batch_size, pad)

    evaluations("before")
    say("step lines show the mean of the adapters' losses; each one's: adapters/NAME/metrics.jsonl")

    # 5. The steps: one micro-batch per adapter, concatenated, in one forward.
    model.train()
    t_train = time.perf_counter()
    for step in range(start + 1, steps + 1):
        micro = []
        for _ in range(tc.grad_accum):
            shares = [world.share(run.batches.next()) for run in runs]
            rows = [row for share in shares for row in share]
            group = torch.tensor([a for a, share in enumerate(shares) for _ in share])
            micro.append((to_device(collate(rows, pad), device), group))
        groups = [run.params for run in runs]
        figures = adapters_step(
            net, model, micro, names, groups, optimizer, scheduler, tc.max_grad_norm, step, world
        )
        for run in runs:
            run.result.losses[step] = figures[run.name]["loss"]
            log(run, "train", step, figures[run.name])
        seconds = figures[names[0]]["seconds"]
        console.log("train", step, {
            "loss": sum(f["loss"] for f in figures.values()) / len(figures),
            "lr": figures[names[0]]["lr"],
            "tokens_per_s": sum(f["tokens"] for f in figures.values()) / seconds,
        })  # fmt: skip
        for run in runs:
            every = run.cfg.evaluation.every
            if run.keeper is not None and step % every == 0 and step < steps:
                loss = held_out(run, step)
                log(run, "eval", step, {"loss": loss})
                console.message(f"{run.name}: eval at step {step}: held-out loss {loss:.4f}")
                run.keeper.update(step, loss, model)
        if tc.checkpoint_every and (step % tc.checkpoint_every == 0 or step == steps):
            befores = {run.name: eval_dict(run.result.before) for run in runs}
            checkpoint.save(
                out,
                step,
                model=model,
                optimizer=optimizer,
                scheduler=scheduler,
                data_position=streams.state_dict(),
                notes={"config": cfg.to_dict(), "before": None, "adapters_before": befores},
                keep=cfg.output.keep_checkpoints,
                extra={"best": keepers.state_dict() if keepers.keepers else None},
                best=keepers.checkpoint_tensors(step, model) if keepers.keepers else None,
                write=world.main,
            )
    train_seconds = time.perf_counter() - t_train
    last = max(start, steps)

    # 6. After: each adapter's best step kept, evaluated, saved, reported; then the summary.
    for run in runs:
        run.result.train_seconds = train_seconds
        run.result.last_step = run.result.kept_step = last
        keeper = run.keeper
        if keeper is None:
            continue
        if keeper.evaluated != last:  # the last step is compared too
            loss = held_out(run, last)
            if not keeper.update(last, loss, model) and cfg.output.keep_best:
                log(run, "eval", last, {"loss": loss})
        if cfg.output.keep_best and keeper.step is not None and keeper.step != last:
            keeper.restore(model)
            run.result.kept_step, run.result.kept_loss = keeper.step, keeper.loss
            say(f"{run.name}: keeping the parameters of step {keeper.step} (held-out loss "
                f"{keeper.loss:.4f}, the lowest)")  # fmt: skip
    evaluations("after")
    for logger in [*(run.logger for run in runs if run.logger is not None), *loggers, console]:
        logger.close()
    peak = peak_memory_mb()
    per_process = world.gather(peak)
    for run in runs:
        r = run.result
        r.saved = save_trained(
            model, tokenizer, run.out, tc.method, world, run.name, run.fingerprint
        )
        r.peak_memory_mb, r.peak_memory_mb_per_process = peak, per_process
        r.processes, r.distributed = world.size, world.mode
    result = ManyResult(out, steps, start, {run.name: run.result for run in runs}, train_seconds)
    result.processes, result.distributed = world.size, world.mode
    if world.main:
        for run in runs:
            rows = (run.rows.examples, len(run.rows.eval), run.rows.truncated)
            write_results(run.result, run.cfg, model_name, rows, t_begin, say)
            _note_in_report(run, names)
        result.summary = write_summary(result, runs, cfg, time.perf_counter() - t_begin)
    return result


def _note_in_report(run: Adapter, names: list[str]) -> None:
    """Say in the adapter's report that it was trained beside others, and where they are."""
    report = run.out / "report.md"
    if not report.is_file():
        return
    lines = report.read_text(encoding="utf-8").split("\n")
    lines.insert(2, (
        f"- trained in one run with {len(names)} adapters ({', '.join(names)}) on one base, "
        "from its own rows alone: see ../../summary.md; the config below (given an output.dir "
        "of its own) trains it alone"
    ))  # fmt: skip
    write_text(report, "\n".join(lines))


def write_summary(result: ManyResult, runs: list[Adapter], cfg: TrainConfig, seconds: float):
    """``summary.json`` and ``summary.md``: one row per adapter, and the run's figures."""

    def figure(r: EvalResult | None, key: str):
        if r is None:
            return None
        return r.loss if key == "loss" else r.accuracy

    rows = []
    for run in runs:
        r, losses = run.result, run.result.losses
        done = [losses[s] for s in sorted(losses)]
        rows.append({
            "adapter": run.name,
            "train_rows": run.rows.examples,
            "eval_rows": len(run.rows.eval),
            "steps": r.last_step - r.start_step,
            "kept_step": r.kept_step,
            "trainable": r.trainable,
            "r": run.cfg.lora.r,
            "loss_first": done[0] if done else None,
            "loss_last": done[-1] if done else None,
            "heldout_before": figure(r.before, "loss"),
            "heldout_after": figure(r.after, "loss"),
            "exact_before": figure(r.before, "exact"),
            "exact_after": figure(r.after, "exact"),
            "adapter_dir": str(r.saved),
        })  # fmt: skip
    tokens = sum(
        rec.get("tokens", 0)
        for run in runs
        for rec in read_metrics(run.out / "metrics.jsonl")
        if rec["kind"] == "train" and rec["step"] > result.start_step
    )
    summary = {
        "name": result.out_dir.name,
        "adapters": rows,
        "steps": result.steps,
        "start_step": result.start_step,
        "batch_rows_per_adapter": cfg.training.batch_size * cfg.training.grad_accum,
        "train_seconds": result.train_seconds,
        "tokens_per_s": tokens / max(result.train_seconds, 1e-9),
        "total_seconds": seconds,
        "processes": result.processes,
        "distributed": result.distributed,
        "peak_memory_mb": runs[0].result.peak_memory_mb if runs else None,
    }
    out = result.out_dir
    write_text(out / "summary.json", json.dumps(summary, indent=2) + "\n")
    write_text(out / "summary.md", render_summary(summary))
    return summary


def render_summary(s: dict[str, Any]) -> str:
    def num(v, fmt=".4f"):
        return "-" if v is None else format(v, fmt)

    def pct(v):
        return "-" if v is None else f"{100 * v:.1f}%"

    lines = [
        f"# lorakit many-adapter run: {s['name']}",
        "",
        f"- {len(s['adapters'])} adapters on one base, {s['steps']} steps of "
        f"{s['batch_rows_per_adapter']} rows per adapter"
        + (f" (resumed at step {s['start_step']})" if s["start_step"] else ""),
        f"- time: {s['train_seconds']:.1f} s training ({s['tokens_per_s']:,.0f} tokens/s), "
        f"{s['total_seconds']:.1f} s in all; {s['processes']} process(es)"
        + (f" ({s['distributed']})" if s["distributed"] != "none" else ""),
        "",
        "| adapter | rows | r | steps | loss first | loss last | held-out before | "
        "held-out after | exact before | exact after |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for a in s["adapters"]:
        cells = [
            f"[{a['adapter']}](adapters/{a['adapter']}/report.md)", a["train_rows"], a["r"],
            a["steps"], num(a["loss_first"]), num(a["loss_last"]), num(a["heldout_before"]),
            num(a["heldout_after"]), pct(a["exact_before"]), pct(a["exact_after"]),
        ]  # fmt: skip
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    return "\n".join(lines) + "\n"
