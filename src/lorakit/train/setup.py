"""A run's setup, before its first step: packages, data, output directory, model, method, tokens.

:func:`setup` does it in that order and returns a :class:`Setup`, so that everything a user can
get wrong (a missing package, a bad data line, an output directory holding someone's files) is
found before any weight loads. The training loop (``loop.py``) and a distributed run share it.
"""

from __future__ import annotations

import math
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import ConfigError
from ..generate import Encoded, Formatter
from ..model import apply_lora, count_parameters
from .config import TrainConfig, resolve_auto
from .data import encode_all, pack, read_jsonl
from .distributed import World, full
from .metrics import read_metrics
from .output import prepare
from .requirements import check_requirements


@dataclass
class Setup:
    """What the steps of a run need, ready: the model with its method applied, on its device,
    the encoded rows and the number of steps."""

    cfg: TrainConfig
    model: nn.Module
    tokenizer: Any
    model_name: str  # as the report names it
    device: torch.device
    train_rows: list[Encoded]
    eval_rows: list[Encoded]
    examples: int  # training rows read, before packing
    truncated: int  # training rows cut to data.max_length
    pad: int  # the padding token id
    steps: int  # optimizer steps in all
    trainable: int
    total: int


def setup(
    config: TrainConfig,
    *,
    model: nn.Module | None = None,
    tokenizer: Any = None,
    say: Any = print,
    world: World | None = None,
) -> Setup:
    """Steps 1 to 3 of a run (see ``loop.py``); ``model``/``tokenizer``: use these instead of
    loading ``config.model.source`` (the model is changed in place). The returned ``cfg`` has its
    ``auto`` values (``training.lr``, ``training.epochs``) computed. ``world``: in a distributed
    run, every rank checks and loads; a failure on any rank stops every rank."""
    cfg, tc, ec = config, config.training, config.evaluation
    out = Path(cfg.output.dir)
    world = world or World()

    # 1. Packages, data and the output directory, checked before any weight is loaded.
    with world.together():
        check_requirements(cfg, load_model=model is None)
        train_examples = read_jsonl(cfg.data.train)
        eval_examples = read_jsonl(cfg.data.eval) if cfg.data.eval else []
        eval_examples = eval_examples[: ec.max_rows] if ec.max_rows else eval_examples
        if world.main:  # the output directory is rank 0's
            prepare(out, tc.resume, cfg.output.overwrite)
    if tc.resume:
        with world.together():  # a damaged line is an error now, not after loading
            read_metrics(out / "metrics.jsonl")

    # 2. The model, then the method: LoRA adapters, a 4-bit base with adapters, or every weight.
    if tc.threads:
        torch.set_num_threads(tc.threads)
    model_name = cfg.model.source or "SmolLM2-135M-Instruct (embedded)"
    if model is not None:
        model_name = f"a {type(model).__name__} given in code"
    with world.together():
        if model is None:
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
        device = device_of(cfg.model.device, world)
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
    # lr and epochs "auto": computed for this base's size and these rows (config.resolve_auto)
    cfg = resolve_auto(cfg, total - trainable if tc.method != "full" else total, len(train_rows))
    for key in ("lr", "epochs"):
        if getattr(tc, key) == "auto" and (key == "lr" or not tc.steps):
            say(f"training.{key}: auto = {getattr(cfg.training, key):.3g}")
    tc = cfg.training
    steps = tc.steps or max(1, math.ceil(tc.epochs * len(train_rows) / rows_per_step))
    return Setup(
        cfg, model, tokenizer, model_name, device, train_rows, eval_rows,
        len(train_examples), truncated, pad, steps, trainable, total,
    )  # fmt: skip


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


def save_trained(
    model: nn.Module, tokenizer: Any, out: Path, method: str, world: World | None = None
) -> Path:
    """The adapter in PEFT's layout (``out/adapter``), or the whole model for method ``full``.
    In a distributed run rank 0 writes; with FSDP every rank takes part in gathering the
    adapter's shards (and the fingerprint is the one taken before sharding)."""
    world = world or World()
    target = out / ("model" if method == "full" else "adapter")
    contents = None
    if world.sharded:
        from ..io.adapter import adapter_contents

        contents = adapter_contents(model, fingerprint=world.fingerprint, gather=full)
    with world.together():  # rank 0 writes; a failure there stops every rank
        if not world.main:
            pass
        elif contents is not None:
            from ..io.adapter import write_adapter

            write_adapter(target, contents, overwrite=True)
        elif method == "full":
            model.save_pretrained(target)
            if tokenizer is not None:
                tokenizer.save_pretrained(target)
        else:
            from ..io import save_adapter

            save_adapter(model, target, overwrite=True)
    return target


def device_of(name: str, world: World | None = None) -> torch.device:
    """The device ``model.device`` names; in a distributed run on CUDA, this process's GPU."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and world is not None and world.backend == "nccl":
        return torch.device("cuda", world.local_rank)
    return torch.device(name)
