"""Keeping the best: with held-out evaluations during training, the saved adapter is the step with
the lowest held-out loss (``output.keep_best``), ``training.early_stopping`` stops when the loss
has stopped falling, and a resumed run keeps the same best. The run below learns its training
rows with a high constant learning rate while the held-out loss falls, then rises."""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import Crash, CrashAt, char_tokenizer, date_rows, resumed, run, run_config, tiny_llama
from lorakit.io import load_adapter
from lorakit.train.checkpoint import PREFIX
from lorakit.train.metrics import read_metrics

HELD_OUT = [{"prompt": f"d{i}", "completion": f"{i * 7 % 10}y"} for i in range(6)]
SECTIONS = {
    "training": {
        "steps": 12,
        "lr": 0.2,
        "schedule": "constant",
        "checkpoint_every": 1,
        "threads": 1,  # the resumed run computes the same sums in the same order
    },
    "evaluation": {"every": 1},
    "output": {"keep_checkpoints": 0, "report": True},
}


def best_run(tmp_path, **changes):
    sections = {k: {**v, **changes.get(k, {})} for k, v in SECTIONS.items()}
    return run_config(tmp_path, train_rows=date_rows(16), eval_rows=HELD_OUT, **sections)


def heldout(out: Path) -> dict[int, float]:
    """The held-out loss of each evaluation during training, by step."""
    records = read_metrics(out / "metrics.jsonl")
    return {r["step"]: r["loss"] for r in records if r["kind"] == "eval" and "exact" not in r}


def saved_parameters(out: Path) -> dict[str, torch.Tensor]:
    tokenizer = char_tokenizer()
    model = load_adapter(tiny_llama(len(tokenizer)), out / "adapter")
    return {n: p for n, p in model.named_parameters() if "lora_" in n}


def assert_saved_is_step(out: Path, step: int) -> None:
    at_step = load_file(out / f"{PREFIX}{step:06d}" / "trainable.safetensors")
    saved = saved_parameters(out)
    assert sorted(saved) == sorted(at_step)
    for name, tensor in at_step.items():
        assert torch.equal(saved[name], tensor), name


def test_the_saved_adapter_is_the_step_with_the_lowest_held_out_loss(tmp_path):
    cfg = best_run(tmp_path)
    result = run(cfg)
    out = Path(cfg.output.dir)
    losses = heldout(out)
    best = min(losses, key=losses.get)
    assert sorted(losses) == list(range(1, 13))  # every step, the last one too
    assert 1 < best < 12 and losses[12] > losses[best]  # the loss rose late
    assert (result.kept_step, result.last_step) == (best, 12)
    assert_saved_is_step(out, best)
    assert result.after.loss == result.kept_loss == losses[best]  # the final evaluation: step best

    summary = json.loads((out / "summary.json").read_text())
    assert (summary["kept_step"], summary["kept_loss"], summary["last_step"]) == (
        best,
        losses[best],
        12,
    )
    report = (out / "report.md").read_text()
    assert f"- saved adapter: step {best}, the lowest held-out loss ({losses[best]:.4f})" in report
    assert f"| | before training | after training (step {best}, kept) |" in report


def test_keep_best_false_saves_the_last_step(tmp_path):
    cfg = best_run(tmp_path, output={"keep_best": False})
    result = run(cfg)
    assert result.kept_step == result.last_step == 12
    assert_saved_is_step(Path(cfg.output.dir), 12)


def test_early_stopping_stops_after_patience_evaluations_without_a_better_loss(tmp_path):
    run(best_run(tmp_path / "whole"))
    losses = heldout(tmp_path / "whole" / "run")  # the same run, not stopped
    lowest, stale = float("inf"), 0
    for step in range(1, 13):  # the rule, written out: stop after 2 evaluations not lower
        if losses[step] < lowest:
            lowest, kept, stale = losses[step], step, 0
        else:
            stale += 1
        if stale == 2:
            break
    assert step < 12

    cfg = best_run(tmp_path / "stopped", training={"early_stopping": 2})
    result = run(cfg)
    out = Path(cfg.output.dir)
    assert result.stopped_early and (result.last_step, result.kept_step) == (step, kept)
    assert max(r["step"] for r in read_metrics(out / "metrics.jsonl")) == step
    assert_saved_is_step(out, kept)
    assert json.loads((out / "summary.json").read_text())["stopped_early"] is True


@pytest.mark.parametrize("crash_at", [5, 11])
def test_a_resumed_run_keeps_the_same_best(tmp_path, crash_at):
    whole = run(best_run(tmp_path / "whole"))
    cfg = best_run(tmp_path / "b")
    with pytest.raises(Crash):
        run(cfg, loggers=[CrashAt(crash_at)])
    start = Path(cfg.output.dir) / f"{PREFIX}{crash_at - 1:06d}"
    losses = heldout(tmp_path / "whole" / "run")
    best_so_far = min(range(1, crash_at), key=losses.get)
    assert (start / "best.safetensors").is_file() == (best_so_far != crash_at - 1)
    again = run(resumed(cfg))
    assert again.start_step == crash_at - 1
    assert again.kept_step == whole.kept_step and again.kept_loss == whole.kept_loss
    assert_saved_is_step(Path(cfg.output.dir), whole.kept_step)
