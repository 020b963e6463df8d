"""The training loop on a tiny Llama: the loss falls, only what the method trains changes,
gradient accumulation equals one big batch, and a run resumed from a checkpoint (after an
exception or a real ``kill -9``) reproduces the uninterrupted run's losses exactly."""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import lorakit
from conftest import (
    Crash,
    CrashAt,
    char_tokenizer,
    date_rows,
    resumed,
    run,
    run_config,
    tiny_llama,
)
from lorakit.generate import Formatter
from lorakit.train import TrainingError
from lorakit.train.checkpoint import PREFIX, TMP_PREFIX, checkpoints
from lorakit.train.data import collate, parse_line
from lorakit.train.loss import token_loss
from lorakit.train.metrics import read_metrics

HERE = Path(__file__).parent


def train_losses(out_dir):
    return {
        r["step"]: r["loss"]
        for r in read_metrics(out_dir / "metrics.jsonl")
        if r["kind"] == "train"
    }


def test_a_few_steps_lower_the_loss_and_change_only_the_adapters(tmp_path):
    tokenizer = char_tokenizer()
    model = tiny_llama(len(tokenizer))
    base = {k: v.clone() for k, v in model.state_dict().items()}
    cfg = run_config(tmp_path, training={"steps": 12}, evaluation={"before": True})
    result = run(cfg, model, tokenizer)

    losses = [result.losses[s] for s in sorted(result.losses)]
    assert sum(losses[-3:]) / 3 < 0.7 * sum(losses[:3]) / 3
    assert result.after.loss < result.before.loss
    adapter_ids = {id(p) for p in lorakit.adapter_parameters(model)}
    assert adapter_ids == {id(p) for p in model.parameters() if p.requires_grad}
    for name, p in model.named_parameters():
        if id(p) in adapter_ids:
            continue
        torch.testing.assert_close(p, base[name], rtol=0, atol=0, msg=f"{name} changed")
    changed = [p for p in lorakit.adapter_parameters(model) if p.abs().sum() > 0]
    assert len(changed) == len(adapter_ids)  # B started at zero and moved
    assert (result.saved / "adapter_model.safetensors").is_file()
    assert result.trainable == sum(p.numel() for p in lorakit.adapter_parameters(model))


def test_full_fine_tuning_trains_every_parameter(tmp_path):
    tokenizer = char_tokenizer()
    model = tiny_llama(len(tokenizer))
    base = {k: v.clone() for k, v in model.state_dict().items()}
    result = run(run_config(tmp_path, training={"method": "full", "lr": 1e-3}), model, tokenizer)
    assert result.trainable == result.total == sum(p.numel() for p in model.parameters())
    assert all(not torch.equal(p, base[n]) for n, p in model.named_parameters())
    assert (result.saved / "config.json").is_file()


def test_qlora_trains_adapters_over_a_4_bit_base(tmp_path):
    from lorakit.quant import quantized_weights

    tokenizer = char_tokenizer()
    model = tiny_llama(len(tokenizer))
    cfg = run_config(
        tmp_path, training={"steps": 8, "method": "qlora"}, evaluation={"before": True}
    )
    result = run(cfg, model, tokenizer)
    assert len(list(quantized_weights(model))) == 14  # 7 linear layers in each of 2 blocks
    assert {id(p) for p in lorakit.adapter_parameters(model)} == {
        id(p) for p in model.parameters() if p.requires_grad
    }
    assert result.after.loss < result.before.loss
    assert (result.saved / "adapter_config.json").is_file()


def test_gradient_accumulation_equals_one_big_batch(tmp_path):
    tokenizer = char_tokenizer()
    formatter = Formatter(tokenizer, 64)
    rows = [formatter.encode(parse_line(json.dumps(r), "x:1")) for r in date_rows(8)]
    rows[0] = formatter.encode(parse_line('{"prompt": "long prompt", "completion": "xyz12"}', "x"))
    grads = []
    for chunks in ([rows], [rows[:3], rows[3:]]):
        model = lorakit.apply_lora(tiny_llama(len(tokenizer)), lorakit.LoraConfig(r=4))
        for p in lorakit.adapter_parameters(model):  # B = 0 gives A no gradient: start elsewhere
            torch.nn.init.normal_(p, std=0.1)
        batches = [collate(c, tokenizer.pad_token_id) for c in chunks]
        n = sum(int((b["labels"][:, 1:] != -100).sum()) for b in batches)
        for b in batches:
            loss, _ = token_loss(model, b)
            (loss / n).backward()
        grads.append([p.grad.clone() for p in lorakit.adapter_parameters(model)])
    for one, accumulated in zip(*grads):
        torch.testing.assert_close(accumulated, one)


def test_logits_only_where_labels_are_equal_full_logits(tokenizer):
    formatter = Formatter(tokenizer, 64)
    rows = [formatter.encode(parse_line(json.dumps(r), "x:1")) for r in date_rows(3)]
    batch = collate(rows, tokenizer.pad_token_id)
    model = tiny_llama(len(tokenizer))
    loss, n = token_loss(model, batch)
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    expected = torch.nn.functional.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]),
        batch["labels"][:, 1:].reshape(-1),
        reduction="sum",
    )
    torch.testing.assert_close(loss, expected)
    assert n == sum(sum(label != -100 for label in r.labels[1:]) for r in rows)


# -- checkpoints and resume ---------------------------------------------------------------------

# threads=1 in both processes: a different thread count sums in another order (last-bit changes)
RESUME = {
    "training": {"steps": 8, "checkpoint_every": 3, "grad_accum": 2, "threads": 1},
    "lora": {"dropout": 0.1},
}


def test_resume_after_a_crash_reproduces_the_uninterrupted_losses(tmp_path):
    whole = run(run_config(tmp_path / "a", **RESUME))
    assert sorted(whole.losses) == list(range(1, 9))

    cfg = run_config(tmp_path / "b", **RESUME)
    with pytest.raises(Crash):
        run(cfg, loggers=[CrashAt(5)])  # steps 4 and 5 were done after the checkpoint at 3
    out = Path(cfg.output.dir)
    assert [p.name for p in checkpoints(out)] == [f"{PREFIX}000003"]
    assert max(train_losses(out)) == 4  # step 4 was logged after the checkpoint, then lost

    with pytest.raises(TrainingError, match="holds an earlier run: pass training.resume=true"):
        run(cfg)
    again = run(resumed(cfg))
    assert again.start_step == 3
    assert again.losses == {s: whole.losses[s] for s in range(4, 9)}  # exactly, not close
    assert train_losses(out) == whole.losses  # metrics.jsonl reads as one run
    assert again.after.loss == whole.after.loss


def test_resume_refuses_a_changed_config(tmp_path):
    cfg = run_config(tmp_path, training={"steps": 4, "checkpoint_every": 2})
    with pytest.raises(Crash):
        run(cfg, loggers=[CrashAt(3)])
    changed = run_config(tmp_path, training={"steps": 4, "lr": 0.5, "resume": True})
    with pytest.raises(TrainingError, match=r"different config.*training.lr: 0.01 -> 0.5"):
        run(changed)


def test_a_partial_checkpoint_is_ignored_and_removed(tmp_path):
    cfg = run_config(tmp_path, training={"steps": 4, "checkpoint_every": 2})
    with pytest.raises(Crash):
        run(cfg, loggers=[CrashAt(3)])
    out = Path(cfg.output.dir)
    partial = out / f"{TMP_PREFIX}000004-abc"  # what a kill during a checkpoint write leaves
    partial.mkdir()
    (partial / "trainable.safetensors").write_bytes(b"half")
    assert run(resumed(cfg)).start_step == 2 and not partial.exists()


KILLED_RUN = """
import os, signal, sys
sys.path[:0] = [{here!r}, {shared!r}]  # the conftest and the shared helpers
from conftest import char_tokenizer, run_config, tiny_llama
from pathlib import Path
from lorakit.train import train

class KillAt:
    def log(self, kind, step, values):
        if kind == "train" and step == 5:
            os.kill(os.getpid(), signal.SIGKILL)
    def close(self):
        pass

class Quiet:
    def message(self, text): pass
    def log(self, *a): pass
    def close(self): pass

tok = char_tokenizer()
cfg = run_config(Path({tmp!r}), **{sections!r})
train(cfg, model=tiny_llama(len(tok)), tokenizer=tok, loggers=[KillAt()], console=Quiet())
"""


def test_resume_after_kill_9_reproduces_the_uninterrupted_losses(tmp_path):
    whole = run(run_config(tmp_path / "a", **RESUME))
    (tmp_path / "b").mkdir()
    code = KILLED_RUN.format(
        here=str(HERE), shared=str(HERE.parent), tmp=str(tmp_path / "b"), sections=RESUME
    )
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()[-2000:]
    sections = {**RESUME, "training": {**RESUME["training"], "resume": True}}
    again = run(run_config(tmp_path / "b", **sections))
    assert again.start_step == 3
    assert again.losses == {s: whole.losses[s] for s in range(4, 9)}
    assert train_losses(tmp_path / "b" / "run") == whole.losses


def test_outputs_metrics_plot_and_report(tmp_path):
    cfg = run_config(
        tmp_path,
        training={"steps": 4},
        evaluation={"before": True, "every": 2, "samples": 2},
        output={"plot": True, "report": True},
    )
    result = run(cfg)
    out = Path(cfg.output.dir)
    kinds = [(r["kind"], r["step"]) for r in read_metrics(out / "metrics.jsonl")]
    assert kinds == [("eval", 0), ("train", 1), ("train", 2), ("eval", 2), ("train", 3),
                     ("train", 4), ("eval", 4)]  # fmt: skip
    assert (out / "loss.png").read_bytes()[:4] == b"\x89PNG"
    report = (out / "report.md").read_text()
    assert f"trainable parameters: {result.trainable:,} of {result.total:,}" in report
    assert "| exact match | 0/6 (0.0%) |" in report
    assert "## Sample generations" in report and "`d3`" in report
    assert "peak memory:" in report and "```yaml" in report
    summary = json.loads((out / "summary.json").read_text())
    assert summary["after"]["total"] == 6 and summary["trainable"] == result.trainable
