"""Shared by the benches: the SmolLM2-135M-shaped model, adapter set-up, interleaved timing."""

from __future__ import annotations

import copy
import statistics
import time
from collections.abc import Callable

import torch

# SmolLM2-135M-Instruct's shape (random weights: speed does not depend on their values).
SMOLLM2 = dict(
    hidden_size=576,
    intermediate_size=1536,
    num_hidden_layers=30,
    num_attention_heads=9,
    num_key_value_heads=3,
    vocab_size=49152,
    tie_word_embeddings=True,
    max_position_embeddings=2048,
)
RANK = 16
ALPHA = 32


def smollm2_shaped(seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(**SMOLLM2)).eval()


def nonzero_b(params: list[torch.nn.Parameter], seed: int = 1) -> None:
    """Give every B a small random value so the adapters really compute (not the zero init)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in params:
            p.copy_(torch.randn(p.shape, generator=gen) * 0.01)


def nbytes(params) -> int:
    """Bytes held by these tensors (a decoding step reads each weight once)."""
    return sum(p.numel() * p.element_size() for p in params)


def with_lorakit(base, targets="all-linear", rank=RANK):
    import lorakit

    # alpha scales with the rank: every rank gets the scale alpha / r = ALPHA / RANK
    config = lorakit.LoraConfig(r=rank, alpha=ALPHA * rank // RANK, target_modules=targets)
    model = lorakit.apply_lora(copy.deepcopy(base), config)
    nonzero_b([layer.lora_B["default"] for _, layer in lorakit.lora_layers(model)])
    return model.eval()


def with_peft(base, targets="all-linear"):
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=targets)
    model = get_peft_model(copy.deepcopy(base), config)
    nonzero_b([p for n, p in model.named_parameters() if "lora_B" in n])
    return model.eval()


def interleaved(fns: dict[str, Callable[[], object]], rounds: int, warmup: int = 1):
    """Run each function once per round, round after round; return {name: [seconds per round]}."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    names = list(fns)
    for i in range(rounds):
        # rotate the order each round so no function always runs first or after the same one
        for name in names[i % len(names) :] + names[: i % len(names)]:
            start = time.perf_counter()
            fns[name]()
            times[name].append(time.perf_counter() - start)
    return times


def median_ratio(times: dict[str, list[float]], num: str, den: str) -> float:
    """Median over rounds of time(num) / time(den) measured in the same round."""
    return statistics.median(a / b for a, b in zip(times[num], times[den]))


def row(figure, lorakit, anchor=None, anchor_name="", ratio=None, goal="", unit="", **extra):
    out = dict(
        figure=figure,
        lorakit=lorakit,
        anchor=anchor,
        anchor_name=anchor_name,
        ratio=ratio,
        goal=goal,
        unit=unit,
    )
    out.update(extra)
    return out
