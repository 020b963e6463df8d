"""The OpenAI API as the official ``openai`` client sees it: completions, chat, streaming, ``n``,
stop strings, seeds, log-probabilities and the model list, over real HTTP on loopback."""

from __future__ import annotations

import math

PROMPT = [{"role": "user", "content": "what is a date?"}]


def test_models_lists_the_base_and_each_adapter_with_the_base_as_parent(server):
    models = {m.id: m for m in server.client().models.list().data}
    assert set(models) == {server.base, "alpha", "beta", "gamma"}
    for name in ("alpha", "beta", "gamma"):
        assert models[name].model_extra["parent"] == server.base
    assert models["gamma"].model_extra["root"].endswith("gamma/adapter")  # a run's adapter/


def test_completion_and_chat_answer_with_usage_and_finish_reason(server):
    client = server.client()
    out = client.completions.create(model="alpha", prompt="abc", max_tokens=5, temperature=0)
    assert out.object == "text_completion" and out.model == "alpha"
    (choice,) = out.choices
    assert choice.finish_reason in ("stop", "length") and isinstance(choice.text, str)
    assert out.usage.prompt_tokens == 3 and out.usage.completion_tokens <= 5
    assert out.usage.total_tokens == out.usage.prompt_tokens + out.usage.completion_tokens
    chat = client.chat.completions.create(
        model="beta", messages=PROMPT, max_tokens=6, temperature=0
    )
    assert chat.object == "chat.completion"
    assert chat.choices[0].message.role == "assistant"
    assert chat.usage.completion_tokens == 6 or chat.choices[0].finish_reason == "stop"


def test_adapters_and_the_base_answer_differently(server):
    client = server.client()
    texts = {
        name: client.chat.completions.create(
            model=name, messages=PROMPT, max_tokens=12, temperature=0
        )
        .choices[0]
        .message.content
        for name in (server.base, "alpha", "beta")
    }
    assert len(set(texts.values())) == 3, texts


def test_streaming_sends_one_id_the_role_first_and_the_same_text(server):
    client = server.client()
    whole = client.chat.completions.create(
        model="gamma", messages=PROMPT, max_tokens=10, temperature=0
    )
    chunks = list(
        client.chat.completions.create(
            model="gamma",
            messages=PROMPT,
            max_tokens=10,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert len({c.id for c in chunks}) == 1
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finishes[-1] == whole.choices[0].finish_reason and not any(finishes[:-1])
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == (
        whole.usage.completion_tokens
    )
    assert chunks[-1].usage.prompt_tokens == whole.usage.prompt_tokens


def test_streamed_completion_without_usage_has_no_usage_chunk(server):
    chunks = list(
        server.client().completions.create(
            model="alpha", prompt="xyz", max_tokens=4, temperature=0, stream=True
        )
    )
    assert all(c.choices for c in chunks) and chunks[-1].choices[0].finish_reason


def test_n_gives_n_choices_and_greedy_choices_agree(server):
    out = server.client().chat.completions.create(
        model="alpha", messages=PROMPT, max_tokens=8, temperature=0, n=3
    )
    assert [c.index for c in out.choices] == [0, 1, 2]
    assert len({c.message.content for c in out.choices}) == 1
    assert (
        out.usage.completion_tokens
        == sum(8 if c.finish_reason == "length" else 0 for c in out.choices)
        or out.usage.completion_tokens <= 24
    )


def test_the_same_seed_gives_the_same_text_and_choices_differ(server):
    client = server.client()

    def sample(seed):
        out = client.chat.completions.create(
            model="beta", messages=PROMPT, max_tokens=16, temperature=1.5, seed=seed, n=2
        )
        return [c.message.content for c in out.choices]

    first, again, other = sample(7), sample(7), sample(8)
    assert first == again
    assert first != other
    assert first[0] != first[1]  # each choice its own random stream


def test_top_p_near_zero_is_greedy(server):
    client = server.client()
    greedy = client.completions.create(model="alpha", prompt="q", max_tokens=8, temperature=0)
    nucleus = client.completions.create(
        model="alpha", prompt="q", max_tokens=8, temperature=1.0, top_p=1e-6, seed=3
    )
    assert nucleus.choices[0].text == greedy.choices[0].text


def test_stop_strings_end_the_answer_and_are_not_echoed(server):
    client = server.client()
    full = client.completions.create(model="beta", prompt="stop", max_tokens=20, temperature=0)
    text = full.choices[0].text
    assert len(text) >= 6, text
    stop = text[3:5]
    cut = client.completions.create(
        model="beta", prompt="stop", max_tokens=20, temperature=0, stop=[stop, "\u2603"]
    )
    assert cut.choices[0].text == text[: text.index(stop)]
    assert cut.choices[0].finish_reason == "stop"
    streamed = client.completions.create(
        model="beta", prompt="stop", max_tokens=20, temperature=0, stop=stop, stream=True
    )
    assert "".join(c.choices[0].text for c in streamed) == text[: text.index(stop)]


def test_chat_logprobs_are_the_models_log_softmax(server):
    out = server.client().chat.completions.create(
        model="alpha", messages=PROMPT, max_tokens=4, temperature=0, logprobs=True, top_logprobs=3
    )
    content = out.choices[0].logprobs.content
    assert len(content) == out.usage.completion_tokens
    for entry in content:
        assert len(entry.top_logprobs) == 3
        assert entry.top_logprobs[0].logprob == entry.logprob  # greedy: the chosen is the top
        assert entry.logprob <= 0 and bytes(entry.bytes).decode() == entry.token
        tops = [t.logprob for t in entry.top_logprobs]
        assert tops == sorted(tops, reverse=True)
        assert sum(math.exp(t) for t in tops) <= 1 + 1e-5


def test_completion_logprobs_have_tokens_offsets_and_tops(server):
    out = server.client().completions.create(
        model="gamma", prompt="abc", max_tokens=5, temperature=0, logprobs=2
    )
    lp = out.choices[0].logprobs
    assert "".join(lp.tokens) == out.choices[0].text or out.choices[0].finish_reason == "stop"
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(len(lp.tokens))]
    assert all(len(top) == 2 for top in lp.top_logprobs)


def test_a_completion_may_send_several_prompts_and_token_ids(server):
    client = server.client()
    out = client.completions.create(model="alpha", prompt=["ab", "cd"], max_tokens=3, temperature=0)
    assert [c.index for c in out.choices] == [0, 1]
    one = client.completions.create(model="alpha", prompt="cd", max_tokens=3, temperature=0)
    assert out.choices[1].text == one.choices[0].text
    ids = client.completions.create(model="alpha", prompt=[70, 71], max_tokens=3, temperature=0)
    assert ids.usage.prompt_tokens == 2


def test_health_and_metrics(server):
    assert server.get("/health").json() == {"status": "ok"}
    server.client().completions.create(model="alpha", prompt="m", max_tokens=2, temperature=0)
    text = server.get("/metrics").text
    for name in (
        "lorakit_requests_total",
        "lorakit_generation_tokens_total",
        "lorakit_num_requests_running",
        "lorakit_num_requests_waiting",
        "lorakit_batch_size_bucket",
        "lorakit_adapter_loads_total",
        "lorakit_adapter_evictions_total",
    ):
        assert f"\n{name}" in "\n" + text, name
    requests = next(line for line in text.splitlines() if line.startswith("lorakit_requests_total"))
    assert int(float(requests.split()[1])) >= 1


def _greedy_with_an_end_token(server):
    """A greedy completion's token ids, and an index ``i >= 2`` whose token has not come before
    it: made an end-of-text id, it ends the answer there."""
    client = server.client()
    full = client.completions.create(
        model="beta", prompt="stop", max_tokens=12, temperature=0, logprobs=0
    )
    tokenizer = server.engine.tokenizer
    ids = tokenizer.convert_tokens_to_ids(full.choices[0].logprobs.tokens)
    assert len(ids) == 12 and full.choices[0].finish_reason == "length"
    i = next(i for i in range(2, 12) if ids[i] not in ids[:i])
    return client, full.choices[0].text, ids, i


def _ids_of(choice, tokenizer):
    return tokenizer.convert_tokens_to_ids(choice.logprobs.tokens)


def test_min_tokens_and_ignore_eos_hold_off_the_end_of_text(server):
    """vLLM's ``min_tokens`` (no end-of-text token before that many tokens: it is never chosen)
    and ``ignore_eos`` (an end-of-text token does not end the answer), sent as ``extra_body``."""
    client, text, ids, i = _greedy_with_an_end_token(server)
    engine, tokenizer = server.engine, server.engine.tokenizer
    saved = engine.eos
    engine.eos = saved | {ids[i]}
    try:
        ask = dict(model="beta", prompt="stop", max_tokens=12, temperature=0, logprobs=0)
        ended = client.completions.create(**ask).choices[0]
        assert ended.finish_reason == "stop" and _ids_of(ended, tokenizer) == ids[: i + 1]
        assert text.startswith(ended.text) and len(ended.text) < len(text)
        ignored = client.completions.create(**ask, extra_body={"ignore_eos": True}).choices[0]
        assert ignored.finish_reason == "length" and _ids_of(ignored, tokenizer) == ids
        held = client.completions.create(**ask, extra_body={"min_tokens": i + 2}).choices[0]
        got = _ids_of(held, tokenizer)
        assert got[:i] == ids[:i] and got[i] != ids[i] and len(got) >= i + 2
        assert ids[i] not in got[: i + 1]  # never chosen before min_tokens
        chat = client.chat.completions.create(
            model="beta",
            messages=PROMPT,
            max_tokens=6,
            temperature=0,
            extra_body={"min_tokens": 6, "ignore_eos": False},
        )
        assert chat.usage.completion_tokens == 6
    finally:
        engine.eos = saved


def test_stop_strings_count_only_after_min_tokens(server):
    client, text, ids, _ = _greedy_with_an_end_token(server)
    stop = text[1:3]
    ask = dict(model="beta", prompt="stop", max_tokens=12, temperature=0, stop=stop)
    assert client.completions.create(**ask).choices[0].text == text[: text.index(stop)]
    held = client.completions.create(**ask, extra_body={"min_tokens": 4}).choices[0]
    shown = server.engine.tokenizer.decode(ids[:4], skip_special_tokens=True)
    later = text.find(stop, len(shown))
    assert held.text == (text if later < 0 else text[:later])
    assert held.finish_reason == ("length" if later < 0 else "stop")
    streamed = client.completions.create(**ask, stream=True, extra_body={"min_tokens": 4})
    assert "".join(c.choices[0].text for c in streamed) == held.text
