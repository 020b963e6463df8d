"""Continuous batching gives each request what ``lorakit generate`` gives it alone: concurrent
clients on different adapters and on the base, and a request that joins a batch mid-way, get the
offline greedy answers; the batch really is shared (one step, many rows)."""

from __future__ import annotations

import threading

import pytest

import lorakit
from lorakit.generate import Formatter, generate
from lorakit.models import load_model

PROMPTS = ["hello there", "a date: 5 Mar 1987", "x", "what now?", "zz top", "tell me"]
NEW = 24


@pytest.fixture(scope="module")
def offline(served):
    """(adapter or None, prompt) -> the greedy answer of ``lorakit.generate`` for it alone."""
    base_dir, adapters = served
    model, tokenizer = load_model(base_dir)
    for name in ("alpha", "beta", "gamma"):
        path = adapters / name / "adapter" if name == "gamma" else adapters / name
        model = lorakit.load_adapter(model, path, adapter_name=name)
    formatter = Formatter(tokenizer, 10**9)

    def answer(name, prompt, new=NEW):
        ids = formatter.prompt_ids(prompt)
        return generate(model, tokenizer, [ids], new, adapters=[name])[0]

    return answer


def ask(server, model, prompt, new=NEW, **kw):
    out = server.client().chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": prompt}],
        max_tokens=new,
        temperature=0,
        **kw,
    )
    return out.choices[0].message.content.strip()


def concurrently(calls):
    results, errors = [None] * len(calls), []

    def run(i, call):
        try:
            results[i] = call()
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(i, c)) for i, c in enumerate(calls)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors, errors
    return results


def test_concurrent_clients_on_adapters_and_the_base_get_the_offline_answers(server, offline):
    names = [None, "alpha", "beta", "gamma"]
    jobs = [(names[i % 4], p) for i, p in enumerate(PROMPTS * 2)]
    before = sum(n for size, n in server.engine.batch_sizes.items() if size > 1)
    got = concurrently([lambda n=n, p=p: ask(server, n or server.base, p) for n, p in jobs])
    want = [offline(n, p) for n, p in jobs]
    assert got == want
    shared = sum(n for size, n in server.engine.batch_sizes.items() if size > 1)
    assert shared > before  # steps ran with several rows at once


def test_a_request_joining_mid_batch_gets_its_offline_answer(server, offline):
    """A long request is running when a short one arrives: the short one joins the running
    batch (prefilled alone, then stepped with it) and both answers are the offline ones."""
    long_stream = server.client().chat.completions.create(
        model="beta",
        messages=[{"role": "user", "content": PROMPTS[0]}],
        max_tokens=200,
        temperature=0,
        stream=True,
    )
    chunks = iter(long_stream)
    first = next(chunks)  # the long one is running now
    joined = ask(server, "gamma", PROMPTS[1])
    rest = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    text = (first.choices[0].delta.content or "") + rest
    assert joined == offline("gamma", PROMPTS[1])
    assert text.strip() == offline("beta", PROMPTS[0], 200)


def test_n_choices_and_other_requests_share_steps_without_changing_answers(server, offline):
    out = server.client().chat.completions.create(
        model="alpha",
        messages=[{"role": "user", "content": PROMPTS[3]}],
        max_tokens=NEW,
        temperature=0,
        n=4,
    )
    assert {c.message.content.strip() for c in out.choices} == {offline("alpha", PROMPTS[3])}


def test_a_4bit_base_serves_unmerged_adapters_with_the_offline_answers(served):
    """--quantize nf4: the base's linear layers are NF4 (QLoRA's base); adapters stay unmerged
    on it, and each answer equals generate() on the same quantized model."""
    from lorakit.quant import QuantizedWeight
    from serving import Running

    base_dir, adapters = served
    model, tokenizer = load_model(base_dir, quantize="nf4")
    model = lorakit.load_adapter(model, adapters / "alpha", adapter_name="alpha")
    ids = Formatter(tokenizer, 10**9).prompt_ids(PROMPTS[1])
    want = generate(model, tokenizer, [ids], NEW, adapters=["alpha"])[0]
    base_want = generate(model, tokenizer, [ids], NEW, adapters=[None])[0]
    running = Running(base=str(base_dir), adapters=str(adapters), quantize="nf4")
    try:
        quantized = [m for m in running.engine.model.modules() if isinstance(m, QuantizedWeight)]
        assert quantized
        got = concurrently(
            [
                lambda: ask(running, "alpha", PROMPTS[1]),
                lambda: ask(running, running.base, PROMPTS[1]),
            ]
        )
        assert got == [want, base_want]
    finally:
        running.stop()
