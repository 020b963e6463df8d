"""Greedy decoding with an unmerged adapter: tokens per second against the base, and PEFT's.

SmolLM2-135M-shaped Llama, r=16 on every linear layer, batch 1, 32-token prompt, 64 new tokens with
the KV cache. Decoding a token is a tiny amount of arithmetic per layer, so per-call Python overhead
shows here: an adapter layer must add as little work per call as possible.

Decoding one token reads every weight once and is bound by memory bandwidth, so the adapter's own
weights cost time in proportion to their bytes, whatever the code around them. Two diagnostic rows
separate the two costs: the adapter's bytes as a share of the base's (the slowdown a perfect
implementation could not avoid) and the same decoding with a rank-1 adapter (the same kernel calls
reading 1/16 of the bytes).
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
    import lorakit

    base = C.smollm2_shaped()
    ours = C.with_lorakit(base)
    rank1 = C.with_lorakit(base, rank=1)
    theirs = C.with_peft(base)
    prompt = torch.randint(0, C.SMOLLM2["vocab_size"], (1, 32))

    def gen(m):
        return lambda: m.generate(
            prompt, max_new_tokens=NEW, min_new_tokens=NEW, do_sample=False, pad_token_id=0
        )

    with torch.inference_mode():
        fns = {"base": gen(base), "lorakit": gen(ours), "peft": gen(theirs), "rank1": gen(rank1)}
        times = C.interleaved(fns, ROUNDS)
    # tokens/s ratio = inverse time ratio
    ours_speed = 1 / C.median_ratio(times, "lorakit", "base")
    peft_speed = 1 / C.median_ratio(times, "peft", "base")
    rank1_speed = 1 / C.median_ratio(times, "rank1", "base")
    base_tps = NEW / min(times["base"])
    adapter_bytes = C.nbytes(lorakit.adapter_parameters(ours))
    # a token reads every weight once: the embedding matrix in full through the tied head (the
    # lookup itself reads one row), every other weight by its layer
    base_bytes = C.nbytes(base.parameters())
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
        C.row(
            "diagnostic: adapter bytes read per token / base bytes read per token",
            adapter_bytes / base_bytes,
            None,
            "",
            None,
            "",
            "",
        ),
        C.row(
            "diagnostic: tokens/s with a rank-1 adapter (same calls, 1/16 of the bytes) / base",
            rank1_speed,
            None,
            "",
            None,
            "",
            "x",
        ),
    ]
