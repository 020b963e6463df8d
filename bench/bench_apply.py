"""Time to inject adapters: ``lorakit.apply_lora`` against PEFT's ``get_peft_model``.

SmolLM2-135M-shaped Llama, r=16 on every linear layer (210 modules). Each round deep-copies the base
twice (not timed) and times one injection of each library; the figure is the median over rounds.
"""

from __future__ import annotations

import copy
import statistics
import time

import _common as C

NAME = "apply"
TITLE = "Injecting adapters: apply_lora vs get_peft_model"
ANCHOR_PACKAGES = ["peft", "transformers"]
ROUNDS = 7


def run(threads: int) -> list[dict]:
    from peft import LoraConfig, get_peft_model

    import lorakit

    base = C.smollm2_shaped()
    ours_cfg = lorakit.LoraConfig(r=C.RANK, alpha=C.ALPHA, target_modules="all-linear")
    peft_cfg = LoraConfig(r=C.RANK, lora_alpha=C.ALPHA, target_modules="all-linear")
    ours, theirs = [], []
    for i in range(ROUNDS + 1):
        a, b = copy.deepcopy(base), copy.deepcopy(base)
        start = time.perf_counter()
        lorakit.apply_lora(a, ours_cfg)
        t_ours = time.perf_counter() - start
        start = time.perf_counter()
        get_peft_model(b, peft_cfg)
        t_peft = time.perf_counter() - start
        if i:  # the first round warms caches and lazy imports
            ours.append(t_ours)
            theirs.append(t_peft)
        del a, b
    ratio = statistics.median(x / y for x, y in zip(ours, theirs))
    return [
        C.row(
            f"inject r={C.RANK} all-linear (210 modules), median of {ROUNDS}",
            statistics.median(ours),
            statistics.median(theirs),
            "peft get_peft_model",
            ratio,
            "<= 0.5x",
            "s",
        )
    ]
