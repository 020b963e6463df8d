"""Bad input over HTTP: every malformed body, wrong type, unknown or unimplemented parameter and
out-of-range value is a 4xx naming what is wrong, never a 500; keys on both kinds of endpoint;
limits (body size, prompt length, max_tokens, the waiting queue); a client that goes away."""

from __future__ import annotations

import threading
import time

import httpx
import openai
import pytest

from serving import Running

CHAT = "/v1/chat/completions"
MESSAGES = [{"role": "user", "content": "hi"}]


def body(server, **fields):
    return {"model": "alpha", "messages": MESSAGES, "max_tokens": 2, **fields}


def error_of(response, status):
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    return error


@pytest.mark.parametrize(
    "raw, says",
    [
        (b"{not json", "not valid JSON"),
        (b"", "no JSON body"),
        (b"[1, 2]", "must be a JSON object"),
        (b'"text"', "must be a JSON object"),
        (b"\xff\xfe", "not valid JSON"),
    ],
)
def test_malformed_bodies_are_400s(server, raw, says):
    response = server.post(CHAT, content=raw, headers={"Content-Type": "application/json"})
    assert says in error_of(response, 400)["message"]


@pytest.mark.parametrize(
    "fields, param",
    [
        ({"temperature": "hot"}, "temperature"),
        ({"temperature": 3}, "temperature"),
        ({"top_p": 0}, "top_p"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"max_tokens": "5"}, "max_tokens"),
        ({"n": 0}, "n"),
        ({"n": 1000}, "n"),
        ({"stop": ["a", "b", "c", "d", "e"]}, "stop"),
        ({"stop": 5}, "stop"),
        ({"stream": "yes"}, "stream"),
        ({"seed": 1.5}, "seed"),
        ({"seed": 2**64 - 1}, "seed"),
        ({"stop": [1]}, "'stop': expected a string or a list of up to 4 strings"),
        ({"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, "text parts"),
        ({"messages": []}, "messages"),
        ({"messages": [{"role": "wizard", "content": "x"}]}, "messages.0.role"),
        ({"messages": [{"role": "user"}]}, "messages.0.content"),
        ({"model": 7}, "model"),
        ({"top_logprobs": 50, "logprobs": True}, "top_logprobs"),
        ({"min_tokens": -1}, "min_tokens"),
        ({"min_tokens": 3}, "'min_tokens' is 3, more than max_tokens (2)"),
        ({"ignore_eos": "yes"}, "ignore_eos"),
    ],
)
def test_a_wrong_type_or_value_is_a_400_naming_the_field(server, fields, param):
    error = error_of(server.post(CHAT, json=body(server, **fields)), 400)
    assert param in error["message"]


def test_an_unknown_parameter_is_named(server):
    error = error_of(server.post(CHAT, json=body(server, temprature=0.5)), 400)
    assert error["message"] == "unknown parameter 'temprature'"


@pytest.mark.parametrize(
    "fields, name",
    [
        ({"presence_penalty": 0.5}, "presence_penalty"),
        ({"frequency_penalty": 1}, "frequency_penalty"),
        ({"logit_bias": {"5": 10}}, "logit_bias"),
        ({"tools": [{"type": "function"}]}, "tools"),
        ({"response_format": {"type": "json_object"}}, "response_format"),
        ({"stream_options": {"include_usage": True}}, "stream_options"),
        ({"top_logprobs": 2}, "top_logprobs"),
    ],
)
def test_an_unimplemented_parameter_is_refused_not_ignored(server, fields, name):
    error = error_of(server.post(CHAT, json=body(server, **fields)), 400)
    assert name in error["message"]


def test_no_op_values_of_unimplemented_parameters_are_accepted(server):
    fields = {"presence_penalty": 0, "frequency_penalty": 0.0, "logit_bias": {}, "user": "u"}
    assert server.post(CHAT, json=body(server, **fields)).status_code == 200


def test_completion_bad_inputs(server):
    url = "/v1/completions"
    base = {"model": "alpha", "max_tokens": 2}
    assert "prompt" in error_of(server.post(url, json=base), 400)["message"]
    assert error_of(server.post(url, json={**base, "prompt": ""}), 400)["param"] == "prompt"
    mixed = error_of(server.post(url, json={**base, "prompt": [1, "a"]}), 400)["message"]
    assert mixed.startswith("'prompt': expected a string, a list of strings or a list of token")
    big = error_of(server.post(url, json={**base, "prompt": [10**6]}), 400)
    assert "vocabulary" in big["message"]
    assert (
        "echo"
        in error_of(server.post(url, json={**base, "prompt": "a", "echo": True}), 400)["message"]
    )


def test_an_unknown_model_is_a_404_listing_what_is_available(server):
    with pytest.raises(openai.NotFoundError) as caught:
        server.client().chat.completions.create(model="nope", messages=MESSAGES)
    message = caught.value.message
    assert "'nope'" in message and server.base in message and "beta" in message


def test_limits_on_max_tokens_prompt_length_and_context(served):
    base_dir, adapters = served
    running = Running(
        base=str(base_dir), adapters=str(adapters), max_tokens=8, max_prompt_tokens=40
    )
    try:
        client = running.client()
        with pytest.raises(openai.BadRequestError, match="at most 8"):
            client.completions.create(model="alpha", prompt="a", max_tokens=9)
        with pytest.raises(openai.BadRequestError, match="at most 40"):
            client.completions.create(model="alpha", prompt="a" * 41, max_tokens=2)
        out = client.completions.create(model="alpha", prompt="a", temperature=0)
        assert out.usage.completion_tokens <= 8  # the default is capped by --max-tokens
    finally:
        running.stop()
    running = Running(base=str(base_dir), adapters=str(adapters), max_prompt_tokens=600)
    try:
        with pytest.raises(openai.BadRequestError, match="context length"):
            running.client().completions.create(model="alpha", prompt="a" * 500, max_tokens=100)
    finally:
        running.stop()


def test_a_body_over_the_limit_is_a_413(served):
    base_dir, adapters = served
    running = Running(base=str(base_dir), adapters=str(adapters), max_body_bytes=1000)
    try:
        big = {"model": "alpha", "prompt": "a" * 2000, "max_tokens": 1}
        error = error_of(running.post("/v1/completions", json=big), 413)
        assert "1000 bytes" in error["message"]

        def chunks():
            yield b'{"model": "alpha", "prompt": "'
            for _ in range(10):
                yield b"a" * 500
            yield b'"}'

        streamed = httpx.post(running.url + "/v1/completions", content=chunks(), timeout=30)
        assert streamed.status_code == 413
    finally:
        running.stop()


def test_api_key_guards_inference_and_the_admin_key_is_separate(served):
    base_dir, adapters = served
    running = Running(
        base=str(base_dir), adapters=str(adapters), api_key="user-key", admin_key="admin-key"
    )
    try:
        with pytest.raises(openai.AuthenticationError):
            running.client("wrong").models.list()
        with pytest.raises(openai.AuthenticationError):
            running.client("wrong").chat.completions.create(model="alpha", messages=MESSAGES)
        assert running.get("/metrics").status_code == 401
        assert running.get("/health").status_code == 200
        ok = running.client("user-key").chat.completions.create(
            model="alpha", messages=MESSAGES, max_tokens=2
        )
        assert ok.choices
        body = {"lora_name": "x", "lora_path": str(adapters / "alpha")}
        user = {"Authorization": "Bearer user-key"}
        assert running.post("/v1/load_lora_adapter", json=body, headers=user).status_code == 401
    finally:
        running.stop()


def test_keys_come_from_the_environment_and_never_reach_the_log(served, monkeypatch, caplog):
    monkeypatch.setenv("LORAKIT_API_KEY", "env-secret-key")
    base_dir, adapters = served
    running = Running(base=str(base_dir), adapters=str(adapters))
    try:
        with pytest.raises(openai.AuthenticationError):
            running.client("bad").models.list()
        assert running.client("env-secret-key").models.list().data
    finally:
        running.stop()
    assert "env-secret-key" not in caplog.text


def test_a_full_waiting_queue_is_a_503_with_retry_after(served):
    base_dir, adapters = served
    running = Running(base=str(base_dir), adapters=str(adapters), max_seqs=1, max_waiting=1)
    try:
        client = running.client()
        first = client.completions.create(
            model="alpha",
            prompt="a",
            max_tokens=400,
            stream=True,
            temperature=0,
            extra_body={"ignore_eos": True},  # runs its 400 tokens
        )
        next(iter(first))
        second = iter(
            client.completions.create(model="alpha", prompt="b", max_tokens=2, stream=True)
        )
        deadline = time.monotonic() + 30
        while running.engine.counts[1] < 1 and time.monotonic() < deadline:
            time.sleep(0.01)
        response = running.post(
            "/v1/completions", json={"model": "alpha", "prompt": "c", "max_tokens": 1}
        )
        assert error_of(response, 503)["message"].startswith("the waiting queue is full")
        assert response.headers["retry-after"] == "1"
        first.response.close()
        assert list(second)[-1].choices[0].finish_reason
    finally:
        running.stop()


def test_a_client_that_goes_away_frees_its_row(served):
    base_dir, adapters = served
    running = Running(base=str(base_dir), adapters=str(adapters))
    try:
        stream = running.client().completions.create(
            model="beta",
            prompt="a",
            max_tokens=450,
            stream=True,
            temperature=0,
            extra_body={"ignore_eos": True},
        )
        chunks = iter(stream)
        next(chunks)
        assert running.engine.counts[0] == 1
        stream.response.close()
        deadline = time.monotonic() + 30
        while running.engine.counts[0] and time.monotonic() < deadline:
            time.sleep(0.01)
        assert running.engine.counts == (0, 0)
        assert running.engine.stats["cancelled"] == 1
        # and one that is not streaming: its row goes too. The engine is held between two steps
        # once the row runs, so the answer cannot be done before the client gives up (unheld, it
        # took about the client's 0.3 s here and the test raced it).
        gate, gave_up = threading.Event(), []

        def ask() -> None:
            try:
                httpx.post(
                    running.url + "/v1/completions",
                    json={
                        "model": "beta",
                        "prompt": "a",
                        "max_tokens": 450,
                        "temperature": 0,
                        "ignore_eos": True,
                    },
                    timeout=0.3,
                )
            except httpx.ReadTimeout:
                gave_up.append(True)

        client = threading.Thread(target=ask)
        client.start()
        deadline = time.monotonic() + 30
        while not running.engine.counts[0] and time.monotonic() < deadline:
            time.sleep(0.002)
        running.engine.call(lambda: gate.wait(30))
        try:
            client.join(30)
            assert gave_up == [True]
            deadline = time.monotonic() + 30
            jobs = list(running.engine.running)
            while not all(j.request.cancelled.is_set() for j in jobs):
                assert time.monotonic() < deadline, "the server did not see the client go"
                time.sleep(0.01)
        finally:
            gate.set()
        deadline = time.monotonic() + 30
        while running.engine.stats["cancelled"] < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert running.engine.stats["cancelled"] == 2
    finally:
        running.stop()
