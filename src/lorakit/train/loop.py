"""The training loop: one function, :func:`train`, to read from top to bottom.

    packages, data, output directory → model → method (lora / qlora / full) → tokens → optimizer
    and schedule → (resume) → evaluate before → steps (accumulate, clip, step, log, evaluate, keep
    the best, checkpoint, stop early) → the best step's parameters → evaluate after → adapter,
    summary, plot, report

No framework and no callbacks: what happens at each step is written out below. Reporting goes
through :class:`~lorakit.train.metrics.MetricLogger` (``log(kind, step, values)``).
"""

from __future__ import annotations

import json
import math
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import ConfigError
from ..generate import IGNORE, Formatter
from ..model import apply_lora, count_parameters
from . import checkpoint, schedule
from .best import BestKeeper
from .config import TrainConfig
from .data import Batches, collate, encode_all, pack, read_jsonl
from .evaluate import EvalResult, evaluate, heldout_loss
from .loss import token_loss
from .metrics import JsonlLogger, MetricLogger, read_metrics
from .output import TrainingError, prepare, write_text
from .progress import Console
from .report import peak_memory_mb, render
from .requirements import check_requirements
from .resume import resume


@dataclass
class TrainResult:
    out_dir: Path
    steps: int
    start_step: int
    losses: dict[int, float] = field(default_factory=dict)  # step -> training loss (this session)
    before: EvalResult | None = None
    after: EvalResult | None = None
    trainable: int = 0
    total: int = 0
    train_seconds: float = 0.0
    peak_memory_mb: float = 0.0
    saved: Path | None = None  # the adapter directory (or the model, for method "full")
    warnings: list[str] = field(default_factory=list)  # what went wrong without losing the run
    last_step: int = 0  # the last step trained (before ``steps`` when stopped early)
    kept_step: int = 0  # the step whose parameters were saved (the best, with output.keep_best)
    kept_loss: float | None = None  # its held-out loss
    stopped_early: bool = False  # by training.early_stopping


def train(
    config: TrainConfig,
    *,
    model: nn.Module | None = None,
    tokenizer: Any = None,
    loggers: list[MetricLogger] | None = None,
    console: Console | None = None,
) -> TrainResult:
    """Fine-tune as ``config`` says; returns the figures of the run. ``model``/``tokenizer``: use
    these instead of loading ``config.model.source`` (the model is changed in place)."""
    t_begin = time.perf_counter()
    cfg, tc, ec = config, config.training, config.evaluation
    out = Path(cfg.output.dir)

    # 1. Packages, data and the output directory, checked before any weight is loaded.
    say = console.message if console else print
    check_requirements(cfg, load_model=model is None)
    train_examples = read_jsonl(cfg.data.train)
    eval_examples = read_jsonl(cfg.data.eval) if cfg.data.eval else []
    eval_examples = eval_examples[: ec.max_rows] if ec.max_rows else eval_examples
    prepare(out, tc.resume, cfg.output.overwrite)
    if tc.resume:
        read_metrics(out / "metrics.jsonl")  # a damaged line is an error now, not after loading

    # 2. The model, then the method: LoRA adapters, a 4-bit base with adapters, or every weight.
    if tc.threads:
        torch.set_num_threads(tc.threads)
    model_name = cfg.model.source or "SmolLM2-135M-Instruct (embedded)"
    if model is not None:
        model_name = f"a {type(model).__name__} given in code"
    else:
        from ..models import load_model

        t0 = time.perf_counter()
        model, tokenizer = load_model(cfg.model.source, dtype=getattr(torch, cfg.model.dtype))
        say(
            f"loaded {cfg.model.source or 'SmolLM2-135M-Instruct'} in "
            f"{time.perf_counter() - t0:.1f} s"
        )
    random.seed(tc.seed)
    torch.manual_seed(tc.seed)  # LoRA's A matrices start random: the seed fixes them
    model = prepare_model(model, cfg)
    device = _device(cfg.model.device)
    model.to(device)
    trainable, total = count_parameters(model)
    say(f"{tc.method}: trainable {trainable:,} / {total:,} ({100 * trainable / total:.2f}%)")

    # 3. Tokens and loss masks.
    fmt = Formatter(tokenizer, cfg.data.max_length, cfg.data.chat_template, cfg.data.system_prompt)
    train_rows, truncated = encode_all(train_examples, fmt)
    eval_rows, _ = encode_all(eval_examples, fmt) if eval_examples else ([], 0)
    if cfg.data.packing:
        train_rows = pack(train_rows, cfg.data.max_length)
    if truncated:
        say(
            f"{truncated} of {len(train_examples)} training rows truncated to "
            f"data.max_length={cfg.data.max_length} tokens"
        )
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    rows_per_step = tc.batch_size * tc.grad_accum
    steps = tc.steps or max(1, math.ceil(tc.epochs * len(train_rows) / rows_per_step))

    # 4. Optimizer, schedule, data order; or all of them as a checkpoint left them.
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=tc.lr, weight_decay=tc.weight_decay)
    scheduler = schedule.build(optimizer, steps, tc.warmup_steps, tc.schedule, tc.min_lr_ratio)
    batches = Batches(train_rows, tc.batch_size, tc.seed)
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
        log("eval", 0, _eval_values(before))

    # 5. The steps.
    result = TrainResult(out, steps, start, before=before, trainable=trainable, total=total)
    last = start
    # resumed from the checkpoint an early stop wrote: nothing left to train
    result.stopped_early = keeper is not None and keeper.exhausted
    model.train()
    t_train = time.perf_counter()
    for step in range(start + 1, (start if result.stopped_early else steps) + 1):
        t0 = time.perf_counter()
        micro = [_to(collate(batches.next(), pad), device) for _ in range(tc.grad_accum)]
        n_tokens = sum(int((b["labels"][:, 1:] != IGNORE).sum()) for b in micro)
        loss_sum = 0.0
        for batch in micro:  # gradient accumulation: sum over all trained tokens of the step
            loss, _ = token_loss(model, batch)
            (loss / n_tokens).backward()
            loss_sum += loss.item()
        if not math.isfinite(loss_sum):
            raise TrainingError(f"the loss is {loss_sum} at step {step}: lower training.lr")
        grad_norm = None
        if tc.max_grad_norm:
            grad_norm = torch.nn.utils.clip_grad_norm_(params, tc.max_grad_norm).item()
        lr = scheduler.get_last_lr()[0]
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)

        seconds = time.perf_counter() - t0
        tokens = sum(int(b["attention_mask"].sum()) for b in micro)
        result.losses[step] = loss_sum / n_tokens
        values = {
            "loss": result.losses[step],
            "lr": lr,
            "grad_norm": grad_norm,
            "tokens": tokens,
            "tokens_per_s": tokens / seconds,
            "seconds": seconds,
        }
        log("train", step, values)
        last = step
        if keeper is not None and step % ec.every == 0 and step < steps:
            heldout = heldout_loss(model, eval_rows, ec.batch_size, pad)
            log("eval", step, {"loss": heldout})
            keeper.update(step, heldout, model)
        stop = keeper is not None and keeper.exhausted
        if tc.checkpoint_every and (step % tc.checkpoint_every == 0 or step == steps or stop):
            notes = {"config": cfg.to_dict(), "before": _eval_dict(before)}
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
            heldout = heldout_loss(model, eval_rows, ec.batch_size, pad)
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
        log("eval", result.kept_step, _eval_values(result.after))
        if result.kept_loss is None:
            result.kept_loss = result.after.loss
    for logger in loggers:
        logger.close()
    result.saved = save_trained(model, tokenizer, out, tc.method)
    result.peak_memory_mb = peak_memory_mb()
    rows = (len(train_examples), len(eval_rows), truncated)
    _write_results(result, cfg, model_name, rows, t_begin, say)
    return result


def _write_results(
    result: TrainResult,
    cfg: TrainConfig,
    model_name: str,
    rows: tuple[int, int, int],
    t_begin: float,
    say: Any,
) -> None:
    """``summary.json`` first, then ``loss.png`` and ``report.md``. The adapter and the metrics are
    on disk already: a plot or report that fails (a broken matplotlib, an odd value) is a warning
    that names what failed, and the run still ends with its results."""
    out, tc, start = result.out_dir, cfg.training, result.start_step
    train_rows, eval_rows, truncated = rows  # training rows, held-out rows, truncated rows
    records = read_metrics(out / "metrics.jsonl")
    done = [r for r in records if r["kind"] == "train" and r["step"] > start]
    summary = {
        "name": out.name,
        "model": model_name,
        "method": tc.method,
        "trainable": result.trainable,
        "total": result.total,
        "train_rows": train_rows,
        "eval_rows": eval_rows,
        "truncated": truncated,
        "max_length": cfg.data.max_length,
        "steps": result.steps,
        "batch_rows": tc.batch_size * tc.grad_accum,
        "start_step": start,
        "train_seconds": result.train_seconds,
        "step_seconds": result.train_seconds / max(len(done), 1),
        "tokens_per_s": sum(r["tokens"] for r in done) / max(result.train_seconds, 1e-9),
        "total_seconds": time.perf_counter() - t_begin,
        "peak_memory_mb": result.peak_memory_mb,
        "device": str(_device(cfg.model.device)),
        "final_loss": next(
            (r["loss"] for r in reversed(records) if r["kind"] == "train"), float("nan")
        ),
        "last_step": result.last_step,
        "kept_step": result.kept_step,
        "kept_loss": result.kept_loss,
        "kept": "lowest held-out loss" if result.kept_step != result.last_step else "last step",
        "stopped_early": result.stopped_early,
        "plot": None,
        "warnings": result.warnings,
    }
    evals = {"before": _eval_dict(result.before), "after": _eval_dict(result.after)}

    def write_summary() -> None:
        record = summary | evals
        write_text(out / "summary.json", json.dumps(record, indent=2, default=str) + "\n")

    if cfg.output.report:
        write_summary()
    if cfg.output.plot:
        try:
            from .plot import plot_losses

            summary["plot"] = str(plot_losses(records, out / "loss.png", title=out.name))
        except Exception as e:  # noqa: BLE001 - any failure of the plot must not lose the run
            _warn(result, say, f"the loss plot (loss.png) was not drawn: {type(e).__name__}: {e}")
    if cfg.output.report:
        try:
            text = render(summary | {"config_yaml": cfg.to_yaml()}, result.before, result.after)
            write_text(out / "report.md", text)
        except Exception as e:  # noqa: BLE001 - any failure of the report must not lose the run
            _warn(result, say, f"the report (report.md) was not written: {type(e).__name__}: {e}")
        write_summary()


def _warn(result: TrainResult, say: Any, text: str) -> None:
    result.warnings.append(text)
    say(f"warning: {text}")


def prepare_model(model: nn.Module, cfg: TrainConfig) -> nn.Module:
    """Make the parameters the method trains the only ones that need gradients."""
    method = cfg.training.method
    if method == "qlora":
        from ..quant import quantize

        model = quantize(model, "nf4", double_quant=True)
    if method in ("lora", "qlora"):
        model = apply_lora(model, cfg.lora)
    else:
        for p in model.parameters():
            p.requires_grad_(True)
    if cfg.training.gradient_checkpointing:
        if not hasattr(model, "gradient_checkpointing_enable"):
            raise ConfigError("training.gradient_checkpointing: this model does not support it")
        # non-reentrant checkpointing back-propagates into adapters even when the inputs of a
        # checkpointed block (the frozen embeddings' output) need no gradient
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model


def save_trained(model: nn.Module, tokenizer: Any, out: Path, method: str) -> Path:
    """The adapter in PEFT's layout (``out/adapter``), or the whole model for method ``full``."""
    if method == "full":
        target = out / "model"
        model.save_pretrained(target)
        if tokenizer is not None:
            tokenizer.save_pretrained(target)
        return target
    from ..io import save_adapter

    return save_adapter(model, out / "adapter", overwrite=True)


def _device(name: str) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(name)


def _to(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: v.to(device) for k, v in batch.items()}


def _eval_values(r: EvalResult) -> dict[str, Any]:
    values: dict[str, Any] = {"loss": r.loss}
    if r.accuracy is not None:
        values.update(exact_match=r.accuracy, exact=r.exact, total=r.total)
    return values


def _eval_dict(r: EvalResult | None) -> dict[str, Any] | None:
    if r is None:
        return None
    return {
        "loss": r.loss,
        "exact": r.exact,
        "total": r.total,
        "samples": r.samples,
        "seconds": r.seconds,
    }
