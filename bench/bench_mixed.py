"""Mixed-adapter batches: every row its own adapter, against the base and PEFT's ``adapter_names``.

SmolLM2-135M-shaped Llama, q/k/v/o adapted at r=16. 16 distinct adapters on a batch of 16 rows ×
64 tokens, and 64 adapters on 64 rows × 16 tokens. lorakit gathers each row's adapter from a stack
padded to a common rank and adds all rows' updates with two batched matmuls per layer; PEFT loops
over the adapters in the batch with boolean masks. Also: training 4 adapters at once (one
forward/backward over a batch whose rows are tagged with their adapter) against training them one
after another on the same rows, and greedy generation with the KV cache in a mixed batch.
"""

from __future__ import annotations

import copy
import statistics

import torch

import _common as C

NAME = "mixed"
TITLE = "Mixed-adapter batches and several adapters trained at once (q/k/v/o, r=16)"
ANCHOR_PACKAGES = ["peft", "transformers"]
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]
ROUNDS = 9


def lorakit_many(base, n):
    import lorakit

    model = copy.deepcopy(base)
    config = lorakit.LoraConfig(r=C.RANK, alpha=C.ALPHA, target_modules=TARGETS)
    for i in range(n):
        model = lorakit.apply_lora(model, config, f"a{i}")
    bs = [layer.lora_B[name] for _, layer in lorakit.lora_layers(model) for name in layer.lora_B]
    C.nonzero_b(bs)
    return model.eval()


def peft_many(base, n):
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=C.RANK, lora_alpha=C.ALPHA, target_modules=TARGETS)
    model = get_peft_model(copy.deepcopy(base), config, adapter_name="a0")
    for i in range(1, n):
        model.add_adapter(f"a{i}", config)
    C.nonzero_b([p for name, p in model.named_parameters() if "lora_B" in name])
    return model.eval()


def copy_into_peft(ours, theirs) -> None:
    """The same adapter weights on both sides, so both compute the same function."""
    import lorakit

    with torch.no_grad():
        for path, layer in lorakit.lora_layers(ours):
            target = theirs.base_model.model.get_submodule(path)
            for name in layer.adapter_names:
                target.lora_A[name].weight.copy_(layer.lora_A[name])
                target.lora_B[name].weight.copy_(layer.lora_B[name])


def mixed_forward(base, n, rows, tokens):
    import lorakit

    ours, theirs = lorakit_many(base, n), peft_many(base, n)
    copy_into_peft(ours, theirs)
    names = [f"a{i % n}" for i in range(rows)]
    x = torch.randint(0, C.SMOLLM2["vocab_size"], (rows, tokens))

    def run_ours():
        with lorakit.adapter_per_row(ours, names):
            return ours(input_ids=x, use_cache=False)

    with torch.inference_mode():
        # same answers first: a benchmark of a wrong computation is worth nothing
        with lorakit.adapter_per_row(ours, names):
            got = ours(input_ids=x, use_cache=False).logits
        want = theirs(input_ids=x, adapter_names=names, use_cache=False).logits
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
        times = C.interleaved(
            {
                "base": lambda: base(input_ids=x, use_cache=False),
                "lorakit": run_ours,
                "peft": lambda: theirs(input_ids=x, adapter_names=names, use_cache=False),
            },
            ROUNDS,
        )
    vs_base = C.median_ratio(times, "lorakit", "base")
    peft_vs_base = C.median_ratio(times, "peft", "base")
    vs_peft = C.median_ratio(times, "lorakit", "peft")
    label = f"{n} adapters, {rows} rows x {tokens} tokens"
    return [
        C.row(
            f"{label}: forward / base forward",
            vs_base,
            peft_vs_base,
            "peft / base",
            None,
            "<= 1.10",
            "x",
        ),
        C.row(
            f"{label}: lorakit forward / peft forward", vs_peft, None, "", vs_peft, "<= 0.8x", "x"
        ),
    ]


def mixed_generate(base, n=16, prompt_tokens=16, new_tokens=24):
    """Greedy generation with the KV cache, every row its own adapter, against the base and PEFT.

    Decoding is memory-bound, and each step reads every row's adapter: with n distinct adapters
    that is n adapters' bytes per step (here about 22% of the base's), the floor of this ratio.
    """
    import lorakit

    ours, theirs = lorakit_many(base, n), peft_many(base, n)
    copy_into_peft(ours, theirs)
    names = [f"a{i}" for i in range(n)]
    prompt = torch.randint(0, C.SMOLLM2["vocab_size"], (n, prompt_tokens))
    options = dict(
        max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, pad_token_id=0
    )

    def run_ours():
        with lorakit.adapter_per_row(ours, names):
            return ours.generate(prompt, **options)

    def run_peft():
        return theirs.generate(input_ids=prompt, adapter_names=names, **options)

    with torch.inference_mode():
        if not torch.equal(run_ours(), run_peft()):
            raise AssertionError("mixed-batch generation: lorakit's tokens differ from PEFT's")
        fns = {"base": lambda: base.generate(prompt, **options), "lorakit": run_ours}
        times = C.interleaved({**fns, "peft": run_peft}, 3)
    vs_base = C.median_ratio(times, "lorakit", "base")
    peft_vs_base = C.median_ratio(times, "peft", "base")
    adapter_bytes = C.nbytes(lorakit.adapter_parameters(ours))
    base_bytes = C.nbytes(base.parameters())
    label = f"{n} adapters, greedy generation of {n} rows ({prompt_tokens} + {new_tokens} tokens)"
    return [
        C.row(
            f"{label}: time / base time (same tokens as PEFT)",
            vs_base,
            peft_vs_base,
            "peft / base",
            vs_base / peft_vs_base,
            "",
            "x",
        ),
        C.row(
            f"diagnostic: {n} adapters' bytes / base bytes (read per decoding step)",
            adapter_bytes / base_bytes,
            None,
            "",
            None,
            "",
            "",
        ),
    ]


def plan_per_step(base, n=16, prompt_tokens=16, steps=16, rounds=5):
    """What changing the rows' adapters at every decoding step costs, as a server does.

    One greedy decoding step of n rows with the KV cache, each row its own adapter (q/k/v/o, r=16).
    Three figures: building a row plan (entering and leaving ``adapter_per_row``) against a step;
    and a step under a new plan each step (the rows' adapters rotated: a fresh plan, so each
    layer gathers its rows' adapters afresh) against steps under one plan (picks kept).
    """
    import time

    import lorakit

    ours = lorakit_many(base, n)
    names = [f"a{i}" for i in range(n)]
    prompt = torch.randint(0, C.SMOLLM2["vocab_size"], (n, prompt_tokens))

    def decode(fresh: bool) -> float:
        with lorakit.adapter_per_row(ours, names):
            out = ours(input_ids=prompt, use_cache=True)
        cache, token = out.past_key_values, out.logits[:, -1:].argmax(-1)
        start = time.perf_counter()
        if fresh:
            for s in range(steps):
                with lorakit.adapter_per_row(ours, names[s % n :] + names[: s % n]):
                    out = ours(input_ids=token, past_key_values=cache, use_cache=True)
                token = out.logits[:, -1:].argmax(-1)
        else:
            with lorakit.adapter_per_row(ours, names):
                for _ in range(steps):
                    out = ours(input_ids=token, past_key_values=cache, use_cache=True)
                    token = out.logits[:, -1:].argmax(-1)
        return (time.perf_counter() - start) / steps

    def build(count: int = 2000) -> float:
        start = time.perf_counter()
        for s in range(count):
            with lorakit.adapter_per_row(ours, names[s % n :] + names[: s % n]):
                pass
        return (time.perf_counter() - start) / count

    with torch.inference_mode():
        decode(True), decode(False)  # warm-up
        kept, fresh, plans = [], [], []
        for _ in range(rounds):
            kept.append(decode(False))
            fresh.append(decode(True))
            plans.append(build())
    step = statistics.median(kept)
    plan = statistics.median(plans)
    fresh_ratio = statistics.median(f / k for f, k in zip(fresh, kept))
    label = f"{n} rows, {n} adapters, one decoding step with the KV cache"
    return [
        C.row(
            f"{label}: building a row plan / the step ({plan * 1e6:.0f} us / {step * 1e3:.1f} ms)",
            plan / step,
            None,
            "",
            plan / step,
            "<= 0.02",
            "x",
        ),
        C.row(
            f"{label}: step under a new plan each step / steps under one plan",
            fresh_ratio,
            None,
            "",
            fresh_ratio,
            "",
            "x",
        ),
    ]


def train_several(base, n=4, rows=8, tokens=64, labelled=9, steps=3):
    """n adapters trained at once on rows tagged with their adapter vs one after another.

    Each step is the one lorakit's training loop takes (``token_loss``: logits only where a label
    is, here the last ``labelled`` tokens of each row), so the figure is the adapters' cost and not
    that of a (rows × tokens × vocab) logits tensor four times as large.
    """
    import lorakit
    from lorakit.train.loss import token_loss

    model = lorakit_many(base, n)
    model.train()
    x = torch.randint(0, C.SMOLLM2["vocab_size"], (n * rows, tokens))
    labels = x.clone()
    labels[:, : tokens - labelled] = -100
    names = [f"a{i // rows}" for i in range(n * rows)]
    params = list(lorakit.adapter_parameters(model))
    optimizer = torch.optim.SGD(params, lr=1e-3)

    def step(part: slice) -> None:
        batch = {"input_ids": x[part], "attention_mask": torch.ones_like(x[part])}
        loss, count = token_loss(model, {**batch, "labels": labels[part]})
        (loss / count).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    def together():
        for _ in range(steps):
            with lorakit.adapter_per_row(model, names):
                step(slice(None))

    def one_by_one():
        for i in range(n):
            lorakit.set_adapter(model, f"a{i}")
            for _ in range(steps):
                step(slice(i * rows, (i + 1) * rows))

    times = C.interleaved({"together": together, "one_by_one": one_by_one}, 3)
    ratio = C.median_ratio(times, "together", "one_by_one")
    return [
        C.row(
            f"train {n} adapters at once / one after another ({n}x{rows} rows x {tokens} "
            f"tokens, {labelled} labelled, {steps} SGD steps)",
            ratio,
            None,
            "",
            ratio,
            "",
            "x",
        )
    ]


def run(threads: int) -> list[dict]:
    base = C.smollm2_shaped()
    rows = mixed_forward(base, 16, 16, 64)
    rows += mixed_forward(base, 64, 64, 16)
    rows += mixed_generate(base)
    rows += plan_per_step(base)
    rows += train_several(base)
    return rows
