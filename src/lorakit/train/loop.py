"""The training loop: one function, :func:`train`, to read from top to bottom.

    data → model → method (lora / qlora / full) → tokens → optimizer and schedule → (resume) →
    evaluate before → steps (accumulate, clip, step, log, evaluate, checkpoint) → evaluate after →
    adapter, plot, report

No framework and no callbacks: what happens at each step is written out below. Reporting goes
through :class:`~lorakit.train.metrics.MetricLogger` (``log(kind, step, values)``).
"""

from __future__ import annotations

import json
import math
import random
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import ConfigError, LorakitError
from ..model import apply_lora, count_parameters
from . import checkpoint, schedule
from .config import TrainConfig, resolve_auto
from .data import IGNORE, Batches, Formatter, collate, encode_all, pack, read_jsonl
from .evaluate import EvalResult, evaluate, heldout_loss
from .loss import token_loss
from .metrics import JsonlLogger, MetricLogger, read_metrics
from .progress import Console
from .report import peak_memory_mb, render

# Settings a resumed run may change; any other difference from the checkpoint's config is an error.
RESUMABLE = set(
    "training.resume training.log_every training.checkpoint_every training.threads model.device "
    "output.keep_checkpoints output.overwrite output.plot output.report evaluation.before "
    "evaluation.exact_match evaluation.max_rows evaluation.batch_size evaluation.max_new_tokens "
    "evaluation.samples".split()
)


class TrainingError(LorakitError, RuntimeError):
    """Training cannot start or cannot go on (an occupied output directory, a diverged loss)."""


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

    # 1. Data, read and checked before any weight is loaded.
    train_examples = read_jsonl(cfg.data.train)
    eval_examples = read_jsonl(cfg.data.eval) if cfg.data.eval else []
    eval_examples = eval_examples[: ec.max_rows] if ec.max_rows else eval_examples
    resume_from = _prepare_output(out, tc.resume, cfg.output.overwrite)

    # 2. The model, then the method: LoRA adapters, a 4-bit base with adapters, or every weight.
    if tc.threads:
        torch.set_num_threads(tc.threads)
    say = console.message if console else print
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
    cfg = resolve_auto(cfg, total - trainable if tc.method != "full" else total, len(train_rows))
    for key in ("lr", "epochs"):
        if getattr(tc, key) == "auto" and (key == "lr" or not tc.steps):
            say(f"training.{key}: auto = {getattr(cfg.training, key):.3g}")
    tc = cfg.training
    steps = tc.steps or max(1, math.ceil(tc.epochs * len(train_rows) / rows_per_step))

    # 4. Optimizer, schedule, data order; or all of them as a checkpoint left them.
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=tc.lr, weight_decay=tc.weight_decay)
    scheduler = schedule.build(optimizer, steps, tc.warmup_steps, tc.schedule, tc.min_lr_ratio)
    batches = Batches(train_rows, tc.batch_size, tc.seed)
    start, before = 0, None
    if resume_from is not None:
        tensors, state = checkpoint.load(resume_from)
        _check_same_run(state["notes"]["config"], cfg, resume_from)
        checkpoint.restore_parameters(model, tensors, resume_from)
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        batches.load_state_dict(state["data"])
        checkpoint.set_rng_state(state["rng"])
        start, before = state["step"], _eval_from_dict(state["notes"]["before"])
        say(f"resumed from {resume_from.name} at step {start} of {steps}")

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
    model.train()
    t_train = time.perf_counter()
    for step in range(start + 1, steps + 1):
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
        if ec.every and step % ec.every == 0 and step < steps:
            log("eval", step, {"loss": heldout_loss(model, eval_rows, ec.batch_size, pad)})
        if tc.checkpoint_every and (step % tc.checkpoint_every == 0 or step == steps):
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
            )
    result.train_seconds = time.perf_counter() - t_train

    # 6. After: evaluate, save, draw, report.
    if eval_rows:
        console.message(f"evaluating the trained model on {len(eval_rows)} rows ...")
        result.after = evaluate(model, tokenizer, eval_rows, **eval_args)
        log("eval", steps, _eval_values(result.after))
    for logger in loggers:
        logger.close()
    result.saved = save_trained(model, tokenizer, out, tc.method)
    result.peak_memory_mb = peak_memory_mb()
    records = read_metrics(out / "metrics.jsonl")
    plot = None
    if cfg.output.plot:
        from .plot import plot_losses

        plot = plot_losses(records, out / "loss.png", title=out.name)
    if cfg.output.report:
        done = [r for r in records if r["kind"] == "train" and r["step"] > start]
        summary = {
            "name": out.name,
            "model": model_name,
            "method": tc.method,
            "trainable": trainable,
            "total": total,
            "train_rows": len(train_examples),
            "eval_rows": len(eval_rows),
            "truncated": truncated,
            "max_length": cfg.data.max_length,
            "steps": steps,
            "batch_rows": rows_per_step,
            "start_step": start,
            "train_seconds": result.train_seconds,
            "step_seconds": result.train_seconds / max(len(done), 1),
            "tokens_per_s": sum(r["tokens"] for r in done) / max(result.train_seconds, 1e-9),
            "total_seconds": time.perf_counter() - t_begin,
            "peak_memory_mb": result.peak_memory_mb,
            "device": str(device),
            "final_loss": next(
                (r["loss"] for r in reversed(records) if r["kind"] == "train"), float("nan")
            ),
            "plot": plot,
            "config_yaml": cfg.to_yaml(),
        }
        (out / "report.md").write_text(render(summary, result.before, result.after))
        evals = {"before": _eval_dict(result.before), "after": _eval_dict(result.after)}
        record = {k: v for k, v in summary.items() if k != "config_yaml"} | evals
        (out / "summary.json").write_text(json.dumps(record, indent=2, default=str) + "\n")
    return result


def prepare_model(model: nn.Module, cfg: TrainConfig) -> nn.Module:
    """Make the parameters the method trains the only ones that need gradients."""
    method = cfg.training.method
    if method == "qlora":
        import lorakit

        if not hasattr(lorakit, "quantize"):
            raise ConfigError("training.method='qlora' needs lorakit.quantize, not available yet")
        model = lorakit.quantize(model, "nf4", double_quant=True)
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


def _prepare_output(out: Path, resume: bool, overwrite: bool) -> Path | None:
    """The checkpoint to resume from (or None), after checking the output directory is free."""
    checkpoint.remove_partial(out)
    found = checkpoint.checkpoints(out)
    if resume:
        return found[-1] if found else None
    earlier = found or (out / "metrics.jsonl").exists()
    if earlier and not overwrite:
        raise TrainingError(
            f"output.dir {str(out)!r} holds an earlier run: pass training.resume=true to continue "
            "it, output.overwrite=true to start over, or choose another output.dir"
        )
    for path in found:
        shutil.rmtree(path)
    return None


def _device(name: str) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(name)


def _to(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: v.to(device) for k, v in batch.items()}


def _check_same_run(saved: dict[str, dict], cfg: TrainConfig, where: Path) -> None:
    now = cfg.to_dict()
    changed = [
        f"{section}.{key}: {saved[section].get(key)!r} -> {value!r}"
        for section, values in now.items()
        for key, value in values.items()
        if f"{section}.{key}" not in RESUMABLE and saved.get(section, {}).get(key) != value
    ]
    if changed:
        raise TrainingError(
            f"{where} was written with a different config; resuming would not continue the same "
            "run. Changed: " + "; ".join(changed)
        )


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


def _eval_from_dict(d: dict[str, Any] | None) -> EvalResult | None:
    return None if d is None else EvalResult(**d)
