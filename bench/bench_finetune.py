"""LoRA against full fine-tuning on the demo task (the LoRA paper's claim in miniature).

Runs ``lorakit train examples/date_demo.yaml`` twice in fresh processes on the embedded
SmolLM2-135M-Instruct, with the settings this bench has always measured (``SETTINGS``: LoRA r=16 on
every linear layer, lr 2e-3, 80 steps of 8 rows after 8 warm-up steps; the demo itself now runs on
the defaults): as configured and with
``training.method=full`` (every weight trained, lr 5e-5: LoRA's learning rate would wreck a full
fine-tune), same data, steps, batch and schedule; then with ``training.method=qlora`` (the same
LoRA on a 4-bit NF4 base, which must land within 2 points of LoRA's held-out exact match). Reports
held-out exact match, trainable parameters, seconds per step and the process's peak resident
memory, from each run's ``summary.json``. Takes about 20 minutes on 2 cores.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path

import _common as C

NAME = "finetune"
TITLE = "LoRA vs full fine-tuning on the demo task (dates to ISO, SmolLM2-135M-Instruct)"
ANCHOR_PACKAGES = ["transformers"]
DEMO = Path(__file__).resolve().parents[1] / "examples" / "date_demo.yaml"
SETTINGS = [
    "lora.r=16", "lora.alpha=32", "training.lr=2e-3", "training.steps=80",
    "training.warmup_steps=8", "data.max_length=96",
    "evaluation.max_new_tokens=12", "evaluation.batch_size=64",
]  # fmt: skip
FULL = ["training.method=full", "training.lr=5e-5"]
QLORA = ["training.method=qlora"]


def train(out: Path, threads: int, overrides: list[str]) -> dict:
    command = [
        sys.executable, "-m", "lorakit.cli.main", "train", str(DEMO), f"output.dir={out}",
        f"training.threads={threads}", "training.checkpoint_every=0", "evaluation.every=0",
        "output.plot=false", *SETTINGS, *overrides,
    ]  # fmt: skip
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
    return json.loads((out / "summary.json").read_text())


def run(threads: int) -> list[dict]:
    with tempfile.TemporaryDirectory() as tmp:
        lora = train(Path(tmp) / "lora", threads, [])
        full = train(Path(tmp) / "full", threads, FULL)
        qlora = train(Path(tmp) / "qlora", threads, QLORA)

    def row(figure, key, unit, goal=""):
        a, b = key(lora), key(full)
        ratio = a / b if b else None
        return C.row(figure, a, b, "full fine-tuning", ratio, goal, unit)

    def exact(s):
        return 100 * s["after"]["exact"] / s["after"]["total"]

    return [
        row("held-out exact match after training (64 rows)", exact, "%"),
        row("held-out exact match before training", lambda s: exact({"after": s["before"]}), "%"),
        row("trainable parameters", lambda s: s["trainable"], "params"),
        row(
            f"seconds per step ({lora['steps']} steps of {lora['batch_rows']} rows)",
            lambda s: s["step_seconds"],
            "s",
            "<= 1.0x",
        ),
        row("peak resident memory of the run", lambda s: s["peak_memory_mb"], "MB", "<= 1.0x"),
        *qlora_rows(qlora, lora, exact),
    ]


def qlora_rows(qlora: dict, lora: dict, exact) -> list[dict]:
    """QLoRA against LoRA on the float32 base: the accuracy goal is a difference in points."""
    gap = exact(lora) - exact(qlora)
    return [
        C.row(
            "QLoRA (NF4 base): held-out exact match after training",
            exact(qlora),
            exact(lora),
            "LoRA, float32 base",
            None,
            "within 2 points",
            "%",
            met=gap <= 2.0,
        ),
        C.row(
            "QLoRA: seconds per step",
            qlora["step_seconds"],
            lora["step_seconds"],
            "LoRA, float32 base",
            unit="s",
        ),
        C.row(
            "QLoRA: peak resident memory of the run",
            qlora["peak_memory_mb"],
            lora["peak_memory_mb"],
            "LoRA, float32 base",
            unit="MB",
        ),
    ]
