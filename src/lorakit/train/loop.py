"""The training loop: one function, :func:`train`, to read from top to bottom.

    packages, data, output directory → model → method (lora / qlora / full) → tokens → optimizer
    and schedule → (resume) → evaluate before → steps (accumulate, clip, step, log, evaluate, keep
    the best, checkpoint, stop early) → the best step's parameters → evaluate after → adapter,
    summary, plot, report

No framework and no callbacks: what happens at each step is written out below. Reporting goes
through :class:`~lorakit.train.metrics.MetricLogger` (``log(kind, step, values)``).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from torch import nn

from . import checkpoint, distributed, schedule
from .best import BestKeeper
from .config import TrainConfig
from .data import Batches, collate, to_device
from .evaluate import evaluate, heldout_loss
from .metrics import JsonlLogger, MetricLogger
from .multi import ManyResult, train_adapters
from .progress import Console, Silent
from .report import peak_memory_mb, write_results
from .result import TrainResult, eval_dict, eval_values
from .resume import resume
from .setup import build_optimizer, save_trained, setup, spread
from .step import train_step


def train(
    config: TrainConfig,
    *,
    model: nn.Module | None = None,
    tokenizer: Any = None,
    loggers: list[MetricLogger] | None = None,
    console: Console | None = None,
) -> TrainResult | ManyResult:
    """Fine-tune as ``config`` says; returns the figures of the run. ``model``/``tokenizer``: use
    these instead of loading ``config.model.source`` (the model is changed in place).

    Under torchrun each process runs this with the same config (see ``distributed.py``): rank 0
    reports and writes, every rank computes; the result is rank 0's on every rank. A config with
    ``adapters:`` trains them all in one run (:mod:`lorakit.train.multi`) and returns a
    :class:`~lorakit.train.multi.ManyResult`."""
    world = distributed.start(config.training, config.model.device)
    body = train_adapters if config.adapters else _train
    try:
        result = body(config, world, model, tokenizer, loggers, console)
    except BaseException:
        world.close(clean=False)
        raise
    world.close()
    return result


def _train(config, world, model, tokenizer, loggers, console) -> TrainResult:
    t_begin = time.perf_counter()
    if not world.main:
        console, loggers = Silent(), []
    say = console.message if console else print

    # 1-3. Packages, data, output directory, model, method, tokens (setup.py).
    run = setup(config, model=model, tokenizer=tokenizer, say=say, world=world)
    cfg, tc, ec = run.cfg, run.cfg.training, run.cfg.evaluation
    model, tokenizer, eval_rows, steps = run.model, run.tokenizer, run.eval_rows, run.steps
    out = Path(cfg.output.dir)
    # what the steps call (DDP's wrapper, or the model sharded in place by FSDP), and the model
    # everything else reads and writes (names and parameters as one process has them)
    net, model = spread(model, world, say, "training.batch_size is the global batch")

    # 4. Optimizer, schedule, data order; or all of them as a checkpoint left them.
    params = [p for p in net.parameters() if p.requires_grad]
    optimizer = build_optimizer(params, tc, model, say)
    scheduler = schedule.build(optimizer, steps, tc.warmup_steps, tc.schedule, tc.min_lr_ratio)
    batches = Batches(run.train_rows, tc.batch_size, tc.seed)
    start, before = 0, None
    # the best held-out loss so far (evaluations during training), its parameters, early stopping
    keeper = BestKeeper(tc.early_stopping, cfg.output.keep_best) if ec.every and eval_rows else None
    restored = None
    if tc.resume:
        restored = resume(out, cfg, model, optimizer, scheduler, batches, say, keeper)
    if restored is not None:
        saved, before = restored
        start = saved.state["step"]
        say(f"resumed from {saved.path.name} at step {start} of {steps}")

    loggers = list(loggers or [])
    if world.main:
        loggers.append(JsonlLogger(out / "metrics.jsonl", keep_until=start or None))
    console = console or Console(steps, start, tc.log_every)
    loggers.append(console)

    def log(kind: str, step: int, values: dict[str, Any]) -> None:
        for logger in loggers:
            logger.log(kind, step, values)

    eval_args = dict(
        batch_size=ec.batch_size,
        max_new_tokens=ec.max_new_tokens,
        exact_match=ec.exact_match,
        samples=ec.samples,
    )
    if start == 0 and ec.before and eval_rows:
        console.message(f"evaluating the model before training on {len(eval_rows)} rows ...")
        before = evaluate(model, tokenizer, eval_rows, **eval_args)
        console.message(f"before training: {before.line()} ({before.seconds:.1f} s)")
        log("eval", 0, eval_values(before))

    # 5. The steps.
    result = TrainResult(out, steps, start, before=before, trainable=run.trainable, total=run.total)
    last = start
    # resumed from the checkpoint an early stop wrote: nothing left to train
    result.stopped_early = keeper is not None and keeper.exhausted
    model.train()
    t_train = time.perf_counter()
    for step in range(start + 1, (start if result.stopped_early else steps) + 1):
        micro = [
            to_device(collate(world.balanced_share(batches.next()), run.pad), run.device)
            for _ in range(tc.grad_accum)
        ]
        values = train_step(net, micro, params, optimizer, scheduler, tc.max_grad_norm, step, world)
        result.losses[step] = values["loss"]
        log("train", step, values)
        last = step
        if keeper is not None and step % ec.every == 0 and step < steps:
            heldout = heldout_loss(model, eval_rows, ec.batch_size, run.pad)
            log("eval", step, {"loss": heldout})
            keeper.update(step, heldout, model)
        stop = keeper is not None and keeper.exhausted
        if tc.checkpoint_every and (step % tc.checkpoint_every == 0 or step == steps or stop):
            notes = {"config": cfg.to_dict(), "before": eval_dict(before)}
            checkpoint.save(
                out,
                step,
                model=model,
                optimizer=optimizer,
                scheduler=scheduler,
                data_position=batches.state_dict(),
                notes=notes,
                keep=cfg.output.keep_checkpoints,
                extra={"best": keeper.state_dict() if keeper else None},
                best=keeper.checkpoint_tensors(step) if keeper else None,
                write=world.main,
            )
        if stop:
            result.stopped_early = True
            say(
                f"early stopping at step {step}: no lower held-out loss in {keeper.stale} "
                f"evaluations (training.early_stopping={tc.early_stopping}); the best was "
                f"{keeper.loss:.4f} at step {keeper.step}"
            )
            break
    result.train_seconds = time.perf_counter() - t_train
    result.last_step = result.kept_step = last

    # 6. After: keep the best step's parameters, evaluate, save, draw, report.
    if keeper is not None:
        if keeper.evaluated != last:  # the last step is compared too
            heldout = heldout_loss(model, eval_rows, ec.batch_size, run.pad)
            if not keeper.update(last, heldout, model) and cfg.output.keep_best:
                log("eval", last, {"loss": heldout})  # else the final evaluation logs it
        if cfg.output.keep_best and keeper.step is not None and keeper.step != last:
            keeper.restore(model)
            result.kept_step, result.kept_loss = keeper.step, keeper.loss
            say(
                f"keeping the parameters of step {keeper.step} (held-out loss "
                f"{keeper.loss:.4f}, the lowest); the last step's was higher"
            )
    if eval_rows:
        console.message(f"evaluating the trained model on {len(eval_rows)} rows ...")
        result.after = evaluate(model, tokenizer, eval_rows, **eval_args)
        log("eval", result.kept_step, eval_values(result.after))
        if result.kept_loss is None:
            result.kept_loss = result.after.loss
    for logger in loggers:
        logger.close()
    result.saved = save_trained(model, tokenizer, out, tc.method, world)
    result.peak_memory_mb = peak_memory_mb()
    result.peak_memory_mb_per_process = world.gather(result.peak_memory_mb)
    result.processes, result.distributed = world.size, world.mode
    rows = (run.examples, len(eval_rows), run.truncated)
    if world.main:
        write_results(result, cfg, run.model_name, rows, t_begin, say)
    return result
