"""Shared pieces of the training tests: a character-level tokenizer with a chat template and a
tiny Llama, both built in code (nothing downloaded), a JSONL writer, and the command lines of
``lorakit train`` in one process or under torchrun."""

import json
import os
import socket
import sys
from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from char_tokenizer import char_tokenizer


def tiny_llama(vocab_size: int) -> LlamaForCausalLM:
    config = LlamaConfig(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=64,
        vocab_size=vocab_size,
        max_position_embeddings=256,
        initializer_range=0.2,  # a frozen head with 0.02 weights cannot move the logits much
        pad_token_id=0,
        bos_token_id=2,
        eos_token_id=4,
    )
    torch.manual_seed(0)
    return LlamaForCausalLM(config)


def write_jsonl(path, rows) -> str:
    """Rows are dicts (written as JSON) or raw strings (written as they are)."""
    lines = [r if isinstance(r, str) else json.dumps(r) for r in rows]
    path.write_text("".join(line + "\n" for line in lines))
    return str(path)


@pytest.fixture
def tokenizer():
    return char_tokenizer()


@pytest.fixture
def tiny_model(tokenizer):
    return tiny_llama(len(tokenizer))


def date_rows(n: int, offset: int = 0) -> list[dict]:
    """Tiny prompt/completion rows: a short question whose answer is a fixed function of it."""
    return [
        {"prompt": f"d{(i + offset) % 10}", "completion": f"{(i + offset) % 10}x"} for i in range(n)
    ]


def run_config(tmp_path, train_rows=None, eval_rows=None, **sections):
    """A validated TrainConfig over JSONL files written to ``tmp_path``; ``sections`` are dicts
    merged over small defaults (``training={"steps": 4}``)."""
    from lorakit.train.config import build

    tmp_path.mkdir(parents=True, exist_ok=True)
    raw = {
        "data": {
            "train": write_jsonl(tmp_path / "train.jsonl", train_rows or date_rows(24)),
            "eval": write_jsonl(tmp_path / "eval.jsonl", eval_rows or date_rows(6, offset=3)),
            "max_length": 64,
        },
        "lora": {"r": 4, "alpha": 8},
        "training": {"steps": 4, "batch_size": 4, "lr": 1e-2, "log_every": 100},
        "evaluation": {"before": False, "max_new_tokens": 4},
        "output": {"dir": str(tmp_path / "run"), "plot": False, "report": False},
    }
    for name, values in sections.items():
        raw.setdefault(name, {}).update(values)
    return build(raw)


class Quiet:
    """A console that keeps what it is told instead of printing it."""

    def __init__(self):
        self.lines = []

    def message(self, text):
        self.lines.append(text)

    def log(self, kind, step, values):
        pass

    def close(self):
        pass


class Crash(Exception):
    pass


class CrashAt:
    """A logger that raises :class:`Crash` when step ``step`` is logged (a run that dies)."""

    def __init__(self, step):
        self.step = step

    def log(self, kind, step, values):
        if kind == "train" and step == self.step:
            raise Crash

    def close(self):
        pass


def run(cfg, model=None, tokenizer=None, loggers=None, console=None):
    """``train`` on a fresh tiny Llama (or ``model``), quietly."""
    from lorakit.train import train

    tokenizer = tokenizer or char_tokenizer()
    model = model if model is not None else tiny_llama(len(tokenizer))
    console = console if console is not None else Quiet()
    return train(cfg, model=model, tokenizer=tokenizer, loggers=loggers, console=console)


def resumed(cfg):
    """``cfg`` with ``training.resume`` true."""
    from lorakit.train.config import build

    raw = cfg.to_dict()
    return build({**raw, "training": {**raw["training"], "resume": True}})


# -- lorakit train in subprocesses: one process, or torchrun's ---------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def environment() -> dict:
    src = str(Path(__file__).resolve().parents[2] / "src")
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join([src, env.get("PYTHONPATH", "")]))
    return env


def command(processes: int, cfg: Path, *overrides: str) -> list[str]:
    if processes == 1:
        return [sys.executable, "-m", "lorakit", "train", str(cfg), *overrides]
    return [
        sys.executable, "-m", "torch.distributed.run", "--nnodes", "1",
        "--nproc_per_node", str(processes), "--master_addr", "127.0.0.1",
        "--master_port", str(free_port()), "-m", "lorakit", "train", str(cfg), *overrides,
    ]  # fmt: skip
