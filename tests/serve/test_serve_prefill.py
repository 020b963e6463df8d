"""Prompts admitted together are prefilled in one forward (left-padded, a row per prompt, each on
its own adapter) and still get the offline greedy answers; the token budget splits the forward;
a prompt that breaks the forward fails alone. Driven on the engine itself (its thread started
after the requests are queued, so they are admitted together), and the cache's join checked
against each prompt decoded alone in float64."""

from __future__ import annotations

import threading

import pytest
import torch

import lorakit
from lorakit.generate import Formatter, generate
from lorakit.models import load_model
from lorakit.sampling import Sampling
from lorakit.serve.batch import BatchCache, layers_of, new_cache
from lorakit.serve.engine import Engine, Request
from lorakit.serve.store import AdapterStore
from tiny_models import tiny_llama

PROMPTS = ["hello there", "a date: 5 Mar 1987", "x", "what now?", "zz top", "tell me more"]
NAMES = [None, "alpha", "beta", "gamma", "alpha", None]
NEW = 12


@pytest.fixture(scope="module")
def engine_parts(served):
    """(a running engine over the served adapters, every adapter attached; its tokenizer; an
    offline model with the same adapters)."""
    base_dir, adapters = served
    model, tokenizer = load_model(base_dir)
    offline = load_model(base_dir)[0]
    for name in ("alpha", "beta", "gamma"):
        path = adapters / name / "adapter" if name == "gamma" else adapters / name
        offline = lorakit.load_adapter(offline, path, adapter_name=name)
    store = AdapterStore(str(adapters), {}, max_loras=8)
    engine = Engine(model, tokenizer, store, eos={tokenizer.eos_token_id})
    engine.start()
    warm = [(name, prompt_ids(tokenizer, "hi"), 1) for name in ("alpha", "beta", "gamma")]
    run_together((engine, tokenizer), warm)  # each adapter read and attached
    yield engine, tokenizer, offline
    engine.shutdown(1.0)


class Collected:
    """A request's events, and a flag set when it has ended (done or failed)."""

    def __init__(self, choices: int) -> None:
        self.text = [""] * choices
        self.error: dict | None = None
        self.left = choices
        self.ended = threading.Event()

    def __call__(self, event: dict) -> None:
        if event["kind"] == "delta":
            self.text[event["index"]] += event["text"]
        elif event["kind"] == "done":
            self.left -= 1
        elif event["kind"] == "error":
            self.error = event
        if self.left == 0 or self.error:
            self.ended.set()


def run_together(parts, asks):
    """Queue every (adapter, token ids, n) of ``asks`` while the engine's thread is held between
    two steps, so that they are admitted together; their events once all have ended."""
    engine, tokenizer = parts[:2]
    gate = threading.Event()
    engine.call(lambda: gate.wait(30))
    collected = []
    try:
        for i, (name, ids, n) in enumerate(asks):
            out = Collected(n)
            entry = engine.store.get(name, "") if name else None
            request = Request(
                str(i), name or "base", name, [ids], n, NEW, Sampling(0.0), (), out, tokenizer
            )
            request.entry = entry
            engine.submit(request)
            collected.append(out)
    finally:
        gate.set()
    for out in collected:
        assert out.ended.wait(120), "a request did not end"
    return collected


def prompt_ids(tokenizer, prompt):
    return Formatter(tokenizer, 10**9).prompt_ids(prompt)


def test_prompts_admitted_together_share_one_prefill_and_get_the_offline_answers(engine_parts):
    engine, tokenizer, offline = engine_parts
    ids = [prompt_ids(tokenizer, p) for p in PROMPTS]
    assert len({len(x) for x in ids}) > 1  # padding is exercised
    before = dict(engine.stats)
    got = run_together(engine_parts, [(n, x, 1) for n, x in zip(NAMES, ids)])
    want = [generate(offline, tokenizer, [x], NEW, adapters=[n])[0] for n, x in zip(NAMES, ids)]
    assert [c.error for c in got] == [None] * len(got)
    assert [c.text[0].strip() for c in got] == want
    assert engine.stats["prefills"] - before["prefills"] == 1  # one forward for six prompts
    assert engine.stats["prompt_tokens"] - before["prompt_tokens"] == sum(map(len, ids))


def test_the_prefill_token_budget_splits_the_forward(engine_parts):
    engine, tokenizer, offline = engine_parts
    ids = [prompt_ids(tokenizer, p) for p in PROMPTS[:4]]
    width = max(map(len, ids))
    before, budget = engine.stats["prefills"], engine.prefill_tokens
    engine.prefill_tokens = 2 * width  # two prompts per forward at most
    try:
        got = run_together(engine_parts, [(None, x, 1) for x in ids])
    finally:
        engine.prefill_tokens = budget
    want = [generate(offline, tokenizer, [x], NEW, adapters=[None])[0] for x in ids]
    assert [c.text[0].strip() for c in got] == want
    assert engine.stats["prefills"] - before == 2


def test_n_choices_of_prompts_prefilled_together_are_each_prompts_rows(engine_parts):
    _, tokenizer, offline = engine_parts
    a, b = (prompt_ids(tokenizer, p) for p in PROMPTS[1:3])
    got = run_together(engine_parts, [("beta", a, 3), ("alpha", b, 2)])
    assert got[0].text and {t.strip() for t in got[0].text} == {
        generate(offline, tokenizer, [a], NEW, adapters=["beta"])[0]
    }
    assert {t.strip() for t in got[1].text} == {
        generate(offline, tokenizer, [b], NEW, adapters=["alpha"])[0]
    }


def test_a_prompt_that_breaks_the_forward_fails_alone(engine_parts):
    """An id past the embeddings (the HTTP side refuses it; here it reaches the engine) makes
    the shared forward raise: each prompt is then tried alone, and only that one fails."""
    engine, tokenizer, offline = engine_parts
    vocab = engine.model.get_input_embeddings().weight.shape[0]
    good = [prompt_ids(tokenizer, p) for p in PROMPTS[:2]]
    asks = [("alpha", good[0], 1), (None, [5, vocab + 7, 6], 1), (None, good[1], 1)]
    got = run_together(engine_parts, asks)
    assert got[1].error is not None and got[1].error["status"] == 500
    assert got[0].error is None and got[2].error is None
    assert (
        got[0].text[0].strip()
        == generate(offline, tokenizer, [good[0]], NEW, adapters=["alpha"])[0]
    )
    assert (
        got[2].text[0].strip() == generate(offline, tokenizer, [good[1]], NEW, adapters=[None])[0]
    )


def test_a_left_padded_join_decodes_as_each_prompt_alone_in_float64():
    """BatchCache.join of a padded multi-prompt prefill (with copies) next to an earlier row:
    every row's next logits equal its prompt's own cache stepped alone."""
    model = tiny_llama(3, hidden_size=32, intermediate_size=64).double().eval()
    prompts = [[5, 9, 11, 3], [7, 8], [4, 4, 4, 4, 4, 4]]
    earlier = [12, 13, 14]
    batch = BatchCache()
    with torch.no_grad():
        cache = new_cache()
        model(input_ids=torch.tensor([earlier]), past_key_values=cache, use_cache=True)
        batch.join(layers_of(cache), [len(earlier)], [1])
        width = max(map(len, prompts))
        ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts])
        lengths = [len(p) for p in prompts]
        mask = torch.tensor([[0] * (width - n) + [1] * n for n in lengths])
        cache = new_cache()
        model(
            input_ids=ids,
            attention_mask=mask,
            position_ids=(mask.cumsum(1) - 1).clamp(min=0),
            past_key_values=cache,
            use_cache=True,
        )
        batch.join(layers_of(cache), lengths, [1, 2, 1])
        rows = [earlier, prompts[0], prompts[1], prompts[1], prompts[2]]
        assert batch.lengths == [len(r) for r in rows]
        nxt = torch.tensor([[20], [21], [22], [23], [24]])
        step_cache, step_mask, positions = batch.step_inputs()
        got = model(
            input_ids=nxt,
            attention_mask=step_mask,
            position_ids=positions,
            past_key_values=step_cache,
            use_cache=True,
        ).logits[:, -1]
        for i, row in enumerate(rows):
            alone = model(input_ids=torch.tensor([row + [int(nxt[i])]])).logits[0, -1]
            torch.testing.assert_close(got[i], alone, rtol=1e-10, atol=1e-10)
