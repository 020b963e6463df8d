"""``report.md``: what was trained, how long it took, and what it learned, in one page.

The report holds the resolved config, trainable and total parameters, the data (rows, truncated
rows), time and peak memory, the evaluation before and after training side by side, a few held-out
questions with the base model's and the trained model's answers, and the loss curve. The same
figures go to ``summary.json`` for programs (the benchmarks read it).
"""

from __future__ import annotations

import json
import platform
import resource
import sys
import time
from pathlib import Path
from typing import Any

import torch

from .config import TrainConfig
from .evaluate import EvalResult
from .metrics import read_metrics
from .output import write_text
from .result import TrainResult, eval_dict
from .setup import device_of


def peak_memory_mb() -> float:
    """Peak resident memory of this process (CPU), or peak allocated CUDA memory if larger."""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    mb = rss / 1024 / (1024 if sys.platform == "darwin" else 1)  # bytes on macOS, KiB on Linux
    if torch.cuda.is_available():
        mb = max(mb, torch.cuda.max_memory_allocated() / 2**20)
    return mb


def _processes(s: dict[str, Any]) -> str:
    """The processes of a distributed run and each one's peak memory ('' for one process)."""
    if s.get("processes", 1) <= 1:
        return ""
    peaks = ", ".join(f"{mb:,.0f}" for mb in s["peak_memory_mb_per_process"])
    return f" in rank 0; {s['processes']} processes ({s['distributed']}), peaks {peaks} MB"


def _cell(text: Any) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def _eval_rows(
    before: EvalResult | None, after: EvalResult | None, after_label: str = "after training"
) -> list[str]:
    def loss(r):
        return "-" if r is None or r.loss is None else f"{r.loss:.4f}"

    def exact(r):
        if r is None or r.accuracy is None:
            return "-"
        return f"{r.exact}/{r.total} ({100 * r.accuracy:.1f}%)"

    return [
        f"| | before training | {after_label} |",
        "|---|---|---|",
        f"| held-out loss | {loss(before)} | {loss(after)} |",
        f"| exact match | {exact(before)} | {exact(after)} |",
    ]


def _kept(s: dict[str, Any]) -> bool:
    return s.get("kept_step") is not None and s.get("kept_step") != s.get("last_step")


def _kept_lines(s: dict[str, Any]) -> list[str]:
    lines = []
    if s.get("stopped_early"):
        lines.append(
            f"- stopped early at step {s['last_step']}: the held-out loss stopped falling "
            "(training.early_stopping)"
        )
    if _kept(s):
        lines.append(
            f"- saved adapter: step {s['kept_step']}, the lowest held-out loss "
            f"({s['kept_loss']:.4f}), not the last step {s['last_step']} (output.keep_best)"
        )
    return lines


def _after_label(s: dict[str, Any]) -> str:
    return f"after training (step {s['kept_step']}, kept)" if _kept(s) else "after training"


def render(summary: dict[str, Any], before: EvalResult | None, after: EvalResult | None) -> str:
    """The report's markdown; ``summary`` holds the run's figures (see ``write_results``)."""
    s = summary
    lines = [
        f"# lorakit training report: {s['name']}",
        "",
        f"- model: {s['model']}; method: {s['method']}",
        f"- trainable parameters: {s['trainable']:,} of {s['total']:,} "
        f"({100 * s['trainable'] / max(s['total'], 1):.2f}%)",
        f"- data: {s['train_rows']} training rows ({s['truncated']} truncated to "
        f"{s['max_length']} tokens), {s['eval_rows']} held-out rows",
        *([f"- LoRA+: {s['loraplus']}"] if s.get("loraplus") else []),
        f"- steps: {s['steps']} of {s['batch_rows']} rows"
        + (f" (resumed at step {s['start_step']})" if s["start_step"] else ""),
        f"- time: {s['train_seconds']:.1f} s training ({s['step_seconds']:.2f} s/step, "
        f"{s['tokens_per_s']:,.0f} tokens/s), {s['total_seconds']:.1f} s in all",
        f"- peak memory: {s['peak_memory_mb']:,.0f} MB ({s['device']})" + _processes(s),
        f"- final training loss: {s['final_loss']:.4f}",
        *_kept_lines(s),
        f"- torch {torch.__version__}, {torch.get_num_threads()} threads, "
        f"Python {platform.python_version()}",
        "",
        "## Evaluation",
        "",
        *_eval_rows(before, after, _after_label(s)),
    ]
    samples_after = after.samples if after else []
    if samples_after:
        before_out = {x["where"]: x["output"] for x in (before.samples if before else [])}
        lines += ["", "## Sample generations (held-out)", ""]
        lines += ["| prompt | expected | before | after |", "|---|---|---|---|"]
        for x in samples_after:
            cells = [x["prompt"], x["reference"], before_out.get(x["where"], "-"), x["output"]]
            lines.append("| " + " | ".join(f"`{_cell(c)}`" for c in cells) + " |")
    if s.get("plot"):
        lines += ["", "## Loss", "", f"![loss curve]({Path(s['plot']).name})"]
    lines += ["", "## Config", "", "```yaml", s["config_yaml"].rstrip(), "```", ""]
    return "\n".join(lines)


def write_results(
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
        "loraplus": _loraplus(tc),
        "start_step": start,
        "train_seconds": result.train_seconds,
        "step_seconds": result.train_seconds / max(len(done), 1),
        "tokens_per_s": sum(r["tokens"] for r in done) / max(result.train_seconds, 1e-9),
        "total_seconds": time.perf_counter() - t_begin,
        "peak_memory_mb": result.peak_memory_mb,
        "peak_memory_mb_per_process": result.peak_memory_mb_per_process,
        "processes": result.processes,
        "distributed": result.distributed,
        "device": str(device_of(cfg.model.device)),
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
    evals = {"before": eval_dict(result.before), "after": eval_dict(result.after)}

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


def _loraplus(tc: Any) -> str | None:
    """LoRA+'s rates in words (``training.loraplus_lr_ratio``), or None without it."""
    ratio = tc.loraplus_lr_ratio
    if ratio is None:
        return None
    return (
        f"B at {ratio:g} x lr ({tc.lr * ratio:.3g}), A and the rest at lr ({tc.lr:.3g}), "
        f"an adapted embedding's A and B at {tc.loraplus_lr_embedding:.3g}"
    )


def _warn(result: TrainResult, say: Any, text: str) -> None:
    result.warnings.append(text)
    say(f"warning: {text}")
