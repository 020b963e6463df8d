"""Forward cost of an adapter: merged and unmerged, against the base and against PEFT.

SmolLM2-135M-shaped Llama, r=16 on every linear layer, prefill of 4 × 128 tokens. A merged adapter
should cost nothing (same shapes, same kernels). An unmerged one adds two small matmuls per layer:
the physical floor is the FLOP ratio of the adapter path to the base model's matmuls,
``sum r·(in+out) / (sum in·out + attention)``, computed here from the model's shapes.
"""

from __future__ import annotations

import copy

import torch

import _common as C

NAME = "forward"
TITLE = "Forward: merged and unmerged adapters vs the base (prefill 4 x 128)"
ANCHOR_PACKAGES = ["peft", "transformers"]
ROUNDS = 15
BATCH, TOKENS = 4, 128


def flop_ratio(model, plan) -> float:
    """Adapter multiply-adds over the base's (every linear layer incl. the head, plus attention)."""
    cfg = model.config
    linears = [m for m in model.modules() if type(m).__name__ == "Linear"]
    linear = sum(m.in_features * m.out_features for m in linears)
    head_dim = cfg.hidden_size // cfg.num_attention_heads
    # QK^T and AV per token, causal: on average half the sequence, per head
    attention = cfg.num_hidden_layers * cfg.num_attention_heads * head_dim * 2 * (TOKENS / 2)
    adapter = sum(row.r * (row.in_features + row.out_features) for row in plan.rows)
    return adapter / (linear + attention)


def run(threads: int) -> list[dict]:
    import lorakit

    base = C.smollm2_shaped()
    ours = C.with_lorakit(base)
    merged = copy.deepcopy(ours)
    lorakit.merge(merged)
    theirs = C.with_peft(base)
    rho = flop_ratio(base, lorakit.plan(base, lorakit.LoraConfig(r=C.RANK)))
    x = torch.randint(0, C.SMOLLM2["vocab_size"], (BATCH, TOKENS))

    def fwd(m):
        return lambda: m(input_ids=x, use_cache=False)

    with torch.inference_mode():
        times = C.interleaved(
            {"base": fwd(base), "unmerged": fwd(ours), "merged": fwd(merged), "peft": fwd(theirs)},
            ROUNDS,
        )
    unmerged = C.median_ratio(times, "unmerged", "base")
    peft = C.median_ratio(times, "peft", "base")
    mer = C.median_ratio(times, "merged", "base")
    return [
        C.row("merged forward / base forward", mer, None, "", mer, "<= 1.03x", "x"),
        C.row(
            "unmerged forward / base forward",
            unmerged,
            peft,
            "peft unmerged / base",
            unmerged / peft,
            "",
            "x",
        ),
        C.row(
            "unmerged overhead minus FLOP ratio, points "
            f"(overhead {100 * (unmerged - 1):.1f}%, FLOP ratio {100 * rho:.1f}%)",
            100 * (unmerged - 1 - rho),
            100 * (peft - 1 - rho),
            "peft, same",
            None,
            "<= 2",
            "pt",
        ),
    ]
