"""DoRA's cost: lorakit's DoRA against its own LoRA and against PEFT's DoRA, in one process.

SmolLM2-135M-shaped Llama (random weights: the speed does not depend on their values), r=16 on
every linear layer, adapters unmerged, B non-zero. Inference: a no-grad forward of 8 rows x 64
tokens, and of 8 rows x 1 token (the per-call overhead a decoding step pays). Training: one AdamW
step on 8 x 64 tokens, the last 9 labelled, every side computing its loss the same way
(``lorakit.train.loss.token_loss``), so the ratios show the adapter layers alone. Every figure is
the median over interleaved rounds of the ratio measured within a round.
"""

from __future__ import annotations

import copy
import statistics

import torch

import _common as C

NAME = "dora"
TITLE = "DoRA: lorakit's against its LoRA and PEFT's DoRA (r=16 all-linear, unmerged)"
ANCHOR_PACKAGES = ["peft", "transformers"]
ROUNDS = 9
BATCH, TOKENS, LABELLED = 8, 64, 9
SIDES = ("lorakit_lora", "lorakit_dora", "peft_lora", "peft_dora")


def adapted(base, side: str):
    """(model, trainable parameters) for one side, with non-zero B."""
    base = copy.deepcopy(base)
    dora = side.endswith("dora")
    if side.startswith("peft"):
        from peft import LoraConfig, get_peft_model

        config = LoraConfig(
            r=C.RANK, lora_alpha=C.ALPHA, target_modules="all-linear", use_dora=dora
        )
        model = get_peft_model(base, config)
        params = [p for p in model.parameters() if p.requires_grad]
        C.nonzero_b([p for n, p in model.named_parameters() if "lora_B" in n])
    else:
        import lorakit

        config = lorakit.LoraConfig(
            r=C.RANK, alpha=C.ALPHA, target_modules="all-linear", use_dora=dora
        )
        model = lorakit.apply_lora(base, config)
        params = list(lorakit.adapter_parameters(model))
        C.nonzero_b([layer.lora_B["default"] for _, layer in lorakit.lora_layers(model)])
    return model, params


def batch(tokens: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, C.SMOLLM2["vocab_size"], (BATCH, tokens), generator=gen)
    labels = ids.clone()
    labels[:, : max(0, tokens - LABELLED)] = -100
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}


def forward_fn(model, tokens: int):
    x = batch(tokens)
    inputs = {"input_ids": x["input_ids"], "attention_mask": x["attention_mask"]}

    def forward():
        with torch.no_grad():
            model(**inputs, use_cache=False, logits_to_keep=1)

    return forward


def step_fn(model, params):
    from lorakit.train import loss as L

    x = batch(TOKENS)
    optimizer = torch.optim.AdamW(params, lr=1e-4)

    def step():
        total, n = L.token_loss(model, x)
        (total / n).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def ratio(times, num, den) -> float:
    return C.median_ratio(times, num, den)


def median(times, name) -> float:
    return statistics.median(times[name])


def run(threads: int) -> list[dict]:
    base = C.smollm2_shaped()
    models = {side: adapted(base, side) for side in SIDES}
    rows = []
    for tokens in (TOKENS, 1):
        for _, (model, _) in models.items():
            model.eval()
        fns = {side: forward_fn(m, tokens) for side, (m, _) in models.items()}
        t = C.interleaved(fns, ROUNDS)
        shape = f"{BATCH} x {tokens} tokens"
        rows += [
            C.row(
                f"unmerged inference, {shape}: DoRA / LoRA time (lorakit; anchor: PEFT's)",
                ratio(t, "lorakit_dora", "lorakit_lora"),
                ratio(t, "peft_dora", "peft_lora"),
                "peft",
                None,
                "<= 1.1" if tokens == TOKENS else "",
                "x",
            ),
            C.row(
                f"unmerged DoRA inference, {shape}: lorakit vs PEFT",
                median(t, "lorakit_dora"),
                median(t, "peft_dora"),
                "peft",
                ratio(t, "lorakit_dora", "peft_dora"),
                "< 1.0x",
                "s",
            ),
        ]
    for _, (model, _) in models.items():
        model.train()
    fns = {side: step_fn(m, p) for side, (m, p) in models.items()}
    t = C.interleaved(fns, ROUNDS)
    rows += [
        C.row(
            f"training step ({BATCH} x {TOKENS}, AdamW): DoRA / LoRA time "
            "(lorakit; anchor: PEFT's)",
            ratio(t, "lorakit_dora", "lorakit_lora"),
            ratio(t, "peft_dora", "peft_lora"),
            "peft",
            None,
            "<= 1.3",
            "x",
        ),
        C.row(
            "DoRA training step: lorakit vs PEFT",
            median(t, "lorakit_dora"),
            median(t, "peft_dora"),
            "peft",
            ratio(t, "lorakit_dora", "peft_dora"),
            "< 1.0x",
            "s",
        ),
    ]
    return rows
