"""A training step of lorakit against PEFT: same model, same batch, same rank and targets.

SmolLM2-135M-shaped Llama (random weights), r=16 on every linear layer, AdamW, a batch shaped like
the demo task's: 8 rows of 64 tokens whose last 9 carry labels (a chat-formatted prompt, then the
answer). Each side runs the step its users run: lorakit's loop computes the loss on the labelled
tokens only (``lorakit.train.loss.token_loss``: logits only where a label is); PEFT's users call the
model with ``labels`` (transformers computes logits for every position). A second row gives lorakit
the full logits too, to show what the adapter layers alone cost against PEFT's.

Peak memory: each variant runs alone in a fresh process (this file with ``--memory NAME``): the peak
resident memory during three steps (the kernel's peak counter is reset before the first, where
Linux allows it) minus the memory before the first.
"""

from __future__ import annotations

import copy
import json
import resource
import subprocess
import sys
from pathlib import Path

import torch

import _common as C

NAME = "train"
TITLE = "Training step: lorakit vs PEFT (r=16 all-linear, AdamW, 8 x 64 tokens, 9 labelled)"
ANCHOR_PACKAGES = ["peft", "transformers"]
ROUNDS = 7
BATCH, TOKENS, LABELLED = 8, 64, 9
VARIANTS = ("lorakit", "lorakit_full_logits", "peft")


def batch() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, C.SMOLLM2["vocab_size"], (BATCH, TOKENS), generator=gen)
    labels = ids.clone()
    labels[:, : TOKENS - LABELLED] = -100
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}


def make_step(name: str, base, copy_base: bool = True):
    """A function doing one optimizer step of variant ``name`` on (a copy of) ``base``."""
    import lorakit
    from lorakit.train import loss as L

    x = batch()
    base = copy.deepcopy(base) if copy_base else base
    if name == "peft":
        from peft import LoraConfig, get_peft_model

        config = LoraConfig(r=C.RANK, lora_alpha=C.ALPHA, target_modules="all-linear")
        model = get_peft_model(base, config)
        params = [p for p in model.parameters() if p.requires_grad]
    else:
        config = lorakit.LoraConfig(r=C.RANK, alpha=C.ALPHA, target_modules="all-linear")
        model = lorakit.apply_lora(base, config)
        params = list(lorakit.adapter_parameters(model))
    model.train()
    optimizer = torch.optim.AdamW(params, lr=1e-4)

    def step():
        if name == "peft":
            loss = model(**x, use_cache=False).loss
        else:
            L._KEEPS_LOGITS[type(model)] = name == "lorakit"  # full logits for the second row
            total, n = L.token_loss(model, x)
            loss = total / n
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


def memory(name: str, threads: int) -> float:
    """Peak memory growth (MiB) of three steps of ``name``, measured in a fresh process."""
    out = subprocess.run(
        [sys.executable, str(Path(__file__).resolve()), "--memory", name, str(threads)],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return json.loads(out.splitlines()[-1])["growth_mib"]


def run(threads: int) -> list[dict]:
    base = C.smollm2_shaped().train()
    steps = {name: make_step(name, base) for name in VARIANTS}
    times = C.interleaved(steps, ROUNDS)
    ratio = C.median_ratio(times, "lorakit", "peft")
    same_loss = C.median_ratio(times, "lorakit_full_logits", "peft")
    median = {name: sorted(t)[len(t) // 2] for name, t in times.items()}
    mem = {name: memory(name, threads) for name in ("lorakit", "peft")}
    return [
        C.row(
            f"step time, median of {ROUNDS} (lorakit's loop vs PEFT + labels=)",
            median["lorakit"],
            median["peft"],
            "peft",
            ratio,
            "<= 0.9x",
            "s",
        ),
        C.row(
            "step time with full logits on both sides (the adapter layers alone)",
            median["lorakit_full_logits"],
            median["peft"],
            "peft",
            same_loss,
            "",
            "s",
        ),
        C.row(
            "peak memory growth over three steps (fresh process each)",
            mem["lorakit"],
            mem["peft"],
            "peft",
            None,
            "<= 1.0x",
            "MiB",
        ),
    ]


def reset_peak() -> bool:
    """Reset the kernel's peak-resident counter (VmHWM) so the peak covers the steps alone."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_mib(reset: bool) -> float:
    if reset:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # peak since start


if __name__ == "__main__" and sys.argv[1:2] == ["--memory"]:
    torch.set_num_threads(int(sys.argv[3]))
    step = make_step(sys.argv[2], C.smollm2_shaped().train(), copy_base=False)
    before = rss_mib()
    reset = reset_peak()
    for _ in range(3):
        step()
    print(json.dumps({"growth_mib": max(0.0, peak_mib(reset) - before)}))
