"""A run's setup, before its first step: packages, data, output directory, model, method, tokens.

:func:`setup` does it in that order and returns a :class:`Setup`, so that everything a user can
get wrong (a missing package, a bad data line, an output directory holding someone's files) is
found before any weight loads. The training loop (``loop.py``) and a distributed run share it.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import ConfigError
from ..generate import Encoded, Example, Formatter
from ..model import apply_lora, count_parameters
from .config import (
    AdapterSection,
    DataSection,
    EvaluationSection,
    TrainConfig,
    TrainingSection,
    auto_lr_note,
    resolve_auto,
)
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
    cfg, tc = config, config.training
    out = Path(cfg.output.dir)
    world = world or World()

    # 1. Packages, data and the output directory, checked before any weight is loaded.
    ((train_examples, eval_examples),) = check_and_read(
        cfg, [(cfg.data, cfg.evaluation)], [out / "metrics.jsonl"], world, model is None
    )

    # 2. The model, then the method: LoRA adapters, a 4-bit base with adapters, or every weight.
    model, tokenizer, model_name, device = load_and_adapt(cfg, model, tokenizer, say, world)
    trainable, total = count_parameters(model)
    say(f"{tc.method}: trainable {trainable:,} / {total:,} ({100 * trainable / total:.2f}%)")

    # 3. Tokens and loss masks.
    rows = encode_rows(train_examples, eval_examples, tokenizer, cfg.data, say)
    pad = pad_id(tokenizer)
    cfg, steps = resolve_steps(cfg, total - trainable if tc.method != "full" else total, rows, say)
    return Setup(
        cfg, model, tokenizer, model_name, device, rows.train, rows.eval,
        rows.examples, rows.truncated, pad, steps, trainable, total,
    )  # fmt: skip


@dataclass
class Rows:
    """One adapter's data, encoded: training rows (packed, if asked), held-out rows, and how many
    training rows were read and truncated."""

    train: list[Encoded]
    eval: list[Encoded]
    examples: int
    truncated: int


def check_and_read(
    cfg: TrainConfig,
    sources: list[tuple[DataSection, EvaluationSection]],
    metrics: list[Path],
    world: World,
    load_model: bool,
) -> list[tuple[list[Example], list[Example]]]:
    """Step 1: the packages, every source's training and held-out examples (the first
    ``evaluation.max_rows`` of these), the output directory and, when resuming, the metrics
    files: all checked on every rank before any weight loads."""
    with world.together():
        check_requirements(cfg, load_model=load_model)
        read = []
        for data, ec in sources:
            evals = read_jsonl(data.eval) if data.eval else []
            read.append((read_jsonl(data.train), evals[: ec.max_rows] if ec.max_rows else evals))
        if world.main:  # the output directory is rank 0's
            prepare(Path(cfg.output.dir), cfg.training.resume, cfg.output.overwrite)
    if cfg.training.resume:
        with world.together():  # a damaged line is an error now, not after loading
            for path in metrics:
                read_metrics(path)
    return read


def load_and_adapt(
    cfg: TrainConfig,
    model: nn.Module | None,
    tokenizer: Any,
    say: Any,
    world: World,
    adapters: Sequence[AdapterSection] = (),
) -> tuple[nn.Module, Any, str, torch.device]:
    """Step 2: (model, tokenizer, the model's name in the report, device): the base loaded (or
    ``model``), the method applied (``adapters``: each of them, see :func:`prepare_model`) and
    the model moved to its device."""
    tc = cfg.training
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
        model = prepare_model(model, cfg, adapters)
        device = device_of(cfg.model.device, world)
        model.to(device)
    return model, tokenizer, model_name, device


def encode_rows(
    train_examples: list[Example],
    eval_examples: list[Example],
    tokenizer: Any,
    data: DataSection,
    say: Any,
    who: str = "",
) -> Rows:
    """Step 3: tokens and loss masks, packed if ``data.packing``; truncation is said (``who``:
    whose rows, in a many-adapter run)."""
    fmt = Formatter(tokenizer, data.max_length, data.chat_template, data.system_prompt)
    train_rows, truncated = encode_all(train_examples, fmt)
    eval_rows, _ = encode_all(eval_examples, fmt) if eval_examples else ([], 0)
    if data.packing:
        train_rows = pack(train_rows, data.max_length)
    if truncated:
        say(
            f"{truncated} of {len(train_examples)} {who}training rows truncated to "
            f"data.max_length={data.max_length} tokens"
        )
    return Rows(train_rows, eval_rows, len(train_examples), truncated)


def pad_id(tokenizer: Any) -> int:
    """The padding token id (the end-of-sequence token when the tokenizer has no pad token)."""
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


def resolve_steps(
    cfg: TrainConfig, base_params: int, rows: Rows, say: Any
) -> tuple[TrainConfig, int]:
    """(the config with its ``auto`` values computed, optimizer steps in all): ``training.steps``,
    or ``epochs`` passes over ``rows``' training rows (in a many-adapter run, the largest
    adapter's)."""
    tc = cfg.training
    rows_per_step = tc.batch_size * tc.grad_accum
    # lr and epochs "auto": computed for this base's size and these rows (config.resolve_auto)
    cfg = resolve_auto(cfg, base_params, len(rows.train))
    for key in ("lr", "epochs"):
        if getattr(tc, key) == "auto" and (key == "lr" or not tc.steps):
            why = auto_lr_note(cfg)[1] if key == "lr" else ""
            value = f"{getattr(cfg.training, key):.3g}" + (f" ({why})" if why else "")
            say(f"training.{key}: auto = {value}")
    tc = cfg.training
    return cfg, tc.steps or max(1, math.ceil(tc.epochs * len(rows.train) / rows_per_step))


def build_optimizer(
    params: list[nn.Parameter],
    tc: TrainingSection,
    model: nn.Module | None = None,
    say: Any = None,
) -> torch.optim.Optimizer:
    """``training.optimizer``: AdamW (the default), or plain SGD (no momentum). Both keep their
    state per parameter, so adapters trained side by side step as each would alone.

    ``params``: the trainable parameters, one group at ``training.lr``; with
    ``training.loraplus_lr_ratio``, the four LoRA+ groups of :mod:`.param_groups` (``model``:
    where the LoRA layers are, holding ``params`` as they are now, e.g. after FSDP wrapped
    them); ``say``: told the groups and their rates in one line."""
    groups: list[Any] = params
    if tc.loraplus_lr_ratio is not None:
        if model is None:
            raise ValueError("LoRA+ groups need the model that holds the parameters")
        from .param_groups import describe, param_groups

        rates = dict(lr=tc.lr, ratio=tc.loraplus_lr_ratio, lr_embedding=tc.loraplus_lr_embedding)
        groups = param_groups(model, params, weight_decay=tc.weight_decay, **rates)
        if say is not None:
            say(describe(groups))
    if tc.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=tc.lr, weight_decay=tc.weight_decay)
    return torch.optim.AdamW(groups, lr=tc.lr, weight_decay=tc.weight_decay)


def prepare_model(
    model: nn.Module, cfg: TrainConfig, adapters: Sequence[AdapterSection] = ()
) -> nn.Module:
    """Make the parameters the method trains the only ones that need gradients. ``adapters``:
    a many-adapter run's, each applied under its own name with the random generator seeded
    afresh, so that its A matrices are the ones its own run alone starts from."""
    method = cfg.training.method
    # LoftQ, and PiSSA/OLoRA on a 4-bit base (QPiSSA), start from the full-precision weights:
    # the init quantizes the residuals of the layers it adapts, then the rest is quantized.
    from_full = method == "qlora" and not adapters and cfg.lora.changes_base
    if method == "qlora" and not from_full:
        from ..quant import quantize

        model = quantize(model, "nf4", double_quant=True)
    if adapters:
        for adapter in adapters:
            torch.manual_seed(cfg.training.seed)
            model = apply_lora(model, adapter.lora, adapter.name)
    elif method in ("lora", "qlora"):
        model = apply_lora(model, cfg.lora, quantize_base=from_full)
        if from_full:
            model = _quantize_rest(model)
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


def _quantize_rest(model: nn.Module) -> nn.Module:
    """``method: qlora``'s quantization of the linear layers an init left in full precision
    (all but the output head, as ``quantize`` does), if there are any."""
    from ..quant import quantize

    getter = getattr(model, "get_output_embeddings", None)
    head = getter() if callable(getter) else None
    if any(type(m) is nn.Linear and m is not head for m in model.modules()):
        model = quantize(model, "nf4", double_quant=True)
    return model


def save_trained(
    model: nn.Module,
    tokenizer: Any,
    out: Path,
    method: str,
    world: World | None = None,
    adapter_name: str = "default",
    fingerprint: dict | None = None,
) -> Path:
    """The adapter in PEFT's layout (``out/adapter``), or the whole model for method ``full``.
    In a distributed run rank 0 writes; with FSDP every rank takes part in gathering the
    adapter's shards (and the fingerprint is the one taken before sharding: ``fingerprint``,
    or the world's)."""
    world = world or World()
    target = out / ("model" if method == "full" else "adapter")
    contents = None
    if world.sharded:
        from ..io.adapter import adapter_contents

        fingerprint = fingerprint or world.fingerprint
        contents = adapter_contents(model, adapter_name, fingerprint=fingerprint, gather=full)
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

            save_adapter(model, target, adapter_name, overwrite=True)
    return target


def spread(model: nn.Module, world: World, say: Any, batch: str) -> tuple[nn.Module, nn.Module]:
    """(what the steps call: DDP's wrapper, or the model sharded in place by FSDP; the model
    everything else reads and writes, with names and parameters as one process has them).
    Says how many processes share the work (``batch``: what ``training.batch_size`` means)."""
    if world.size > 1:
        say(f"{world.size} processes ({world.mode}, {world.backend}); {batch}")
    net = world.wrap(model)
    model = world.inner(net)
    if world.sharded:
        mine, whole = world.held(model)
        say(
            f"fsdp: rank 0 holds {mine / 2**20:.2f} MiB of the model's {whole / 2**20:.2f} MiB "
            f"({mine / whole:.0%}) between steps"
        )
    return net, model


def device_of(name: str, world: World | None = None) -> torch.device:
    """The device ``model.device`` names; in a distributed run on CUDA, this process's GPU."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and world is not None and world.backend == "nccl":
        return torch.device("cuda", world.local_rank)
    return torch.device(name)
