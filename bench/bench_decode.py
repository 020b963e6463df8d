"""Greedy decoding with an unmerged adapter: tokens per second against the base, and PEFT's.

SmolLM2-135M-shaped Llama, r=16 on every linear layer, batch 1, 32-token prompt, 64 new tokens with
the KV cache. Decoding a token is a tiny amount of arithmetic per layer, so per-call Python overhead
shows here: an adapter layer must add as little work per call as possible.
"""

from __future__ import annotations

import torch

import _common as C

NAME = "decode"
TITLE = "Greedy decoding tokens/s with an unmerged adapter (batch 1, 32 + 64 tokens)"
ANCHOR_PACKAGES = ["peft", "transformers"]
ROUNDS = 6
NEW = 64


def run(threads: int) -> list[dict]:
    base = C.smollm2_shaped()
    ours = C.with_lorakit(base)
    theirs = C.with_peft(base)
    prompt = torch.randint(0, C.SMOLLM2["vocab_size"], (1, 32))

    def gen(m):
        return lambda: m.generate(
            prompt, max_new_tokens=NEW, min_new_tokens=NEW, do_sample=False, pad_token_id=0
        )

    with torch.inference_mode():
        fns = {"base": gen(base), "lorakit": gen(ours), "peft": gen(theirs)}
        times = C.interleaved(fns, ROUNDS)
    # tokens/s ratio = inverse time ratio
    ours_speed = 1 / C.median_ratio(times, "lorakit", "base")
    peft_speed = 1 / C.median_ratio(times, "peft", "base")
    base_tps = NEW / min(times["base"])
    return [
        C.row("base tokens/s (best round)", base_tps, None, "", None, "", "tok/s"),
        C.row(
            "tokens/s with an unmerged adapter / base tokens/s",
            ours_speed,
            peft_speed,
            "peft unmerged / base",
            ours_speed / peft_speed,
            ">= 0.95",
            "x",
        ),
    ]
