"""Adapt the embedded SmolLM2-135M-Instruct with LoRA, train a few steps, merge, and check.

    python examples/quickstart.py [--steps 30]

Teaches the model to answer "Convert to ISO date: March 5, 1987" with "1987-03-05" for a handful
of examples: enough to watch the loss fall, then shows that the merged model computes what the
adapted one does and holds no lorakit class.
"""

from __future__ import annotations

import argparse
import random
import time

import torch

import lorakit
from lorakit.models import load_model

MONTHS = "January February March April May June July August September October November December"


def examples(n: int, seed: int) -> list[tuple[str, str]]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        y, m, d = rng.randint(1950, 2030), rng.randint(1, 12), rng.randint(1, 28)
        out.append((f"{MONTHS.split()[m - 1]} {d}, {y}", f"{y:04d}-{m:02d}-{d:02d}"))
    return out


def encode(tokenizer, date: str, answer: str | None):
    """Chat-formatted prompt ids, plus labels that score only the answer tokens."""
    messages = [{"role": "user", "content": f"Convert to ISO date (YYYY-MM-DD): {date}"}]
    prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    if answer is None:
        return torch.tensor([prompt_ids]), None
    answer_ids = tokenizer(answer + tokenizer.eos_token, add_special_tokens=False)["input_ids"]
    ids = prompt_ids + answer_ids
    labels = [-100] * len(prompt_ids) + answer_ids
    return ids, labels


def batch(tokenizer, pairs):
    rows = [encode(tokenizer, d, a) for d, a in pairs]
    width = max(len(ids) for ids, _ in rows)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    ids = torch.full((len(rows), width), pad)
    labels = torch.full((len(rows), width), -100)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, (x, y) in enumerate(rows):  # left-aligned, right padding
        ids[i, : len(x)] = torch.tensor(x)
        labels[i, : len(y)] = torch.tensor(y)
        mask[i, : len(x)] = 1
    return ids, labels, mask


def answer(model, tokenizer, date: str) -> str:
    ids, _ = encode(tokenizer, date, None)
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=12, do_sample=False)
    return tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True).strip()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--rank", type=int, default=16)
    args = parser.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(min(2, torch.get_num_threads()))

    t0 = time.perf_counter()
    model, tokenizer = load_model()
    print(f"loaded SmolLM2-135M-Instruct in {time.perf_counter() - t0:.1f} s")
    held_out = examples(4, seed=1)
    before = [answer(model, tokenizer, d) for d, _ in held_out]

    config = lorakit.LoraConfig(r=args.rank, alpha=2 * args.rank, target_modules="all-linear")
    plan = lorakit.plan(model, config)
    print(f"plan: {len(plan.rows)} modules, {plan.adapter_params:,} adapter parameters")
    model = lorakit.apply_lora(model, config)
    lorakit.print_trainable_parameters(model)

    train = examples(64, seed=0)
    optimizer = torch.optim.AdamW(lorakit.adapter_parameters(model), lr=2e-3)
    model.train()
    for step in range(1, args.steps + 1):
        ids, labels, mask = batch(tokenizer, random.Random(step).sample(train, 8))
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if step == 1 or step % 5 == 0:
            print(f"step {step:3d}  loss {loss.item():.4f}")
    model.eval()

    ids, _, mask = batch(tokenizer, held_out)
    with torch.no_grad():
        unmerged = model(input_ids=ids, attention_mask=mask).logits
        lorakit.merge(model)
        merged = model(input_ids=ids, attention_mask=mask).logits
        lorakit.unmerge(model)
        with lorakit.disable_adapters(model):
            base = model(input_ids=ids, attention_mask=mask).logits
    after = [answer(model, tokenizer, d) for d, _ in held_out]
    model = lorakit.merge_and_unload(model)
    leftover = [type(m).__name__ for m in model.modules() if "lorakit" in type(m).__module__]
    with torch.no_grad():
        unloaded = model(input_ids=ids, attention_mask=mask).logits

    print(f"max |merged - unmerged| logits: {(merged - unmerged).abs().max().item():.2e}")
    gap = (unloaded - unmerged).abs().max().item()
    print(f"max |merge_and_unload - unmerged| logits: {gap:.2e}")
    print(f"adapter changed the logits by up to {(unmerged - base).abs().max().item():.2f}")
    print(f"lorakit classes left after merge_and_unload: {leftover or 'none'}")
    print("held-out answers (expected | before | after):")
    for (date, iso), b, a in zip(held_out, before, after, strict=True):
        print(f"  {date:20s} {iso} | {b[:24]!r} | {a[:24]!r}")
    ok = torch.allclose(merged, unmerged, atol=1e-3, rtol=1e-3) and not leftover
    print("check:", "ok" if ok else "FAILED")
    raise SystemExit(0 if ok else 1)


if __name__ == "__main__":
    main()
