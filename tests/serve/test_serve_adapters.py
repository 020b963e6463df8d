"""Adapters at run time: first-use loading beside running requests, eviction past --max-loras,
admin load and unload, a corrupt adapter failing only its own requests, and names that cannot
reach outside the adapters directory."""

from __future__ import annotations

import shutil
import threading

import httpx
import openai
import pytest

from serving import Running

ADMIN = {"Authorization": "Bearer admin-secret"}


def chat(client, model, new=8, **kw):
    return client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": "hi"}],
        max_tokens=new,
        temperature=0,
        **kw,
    )


@pytest.fixture
def adapters_copy(served, tmp_path):
    """A private copy of the adapters directory that a test may change."""
    _, adapters = served
    target = tmp_path / "adapters"
    shutil.copytree(adapters, target)
    return target


def start(served, adapters, **options):
    base_dir, _ = served
    return Running(base=str(base_dir), adapters=str(adapters), **options)


def test_past_max_loras_the_least_recently_used_idle_adapter_is_evicted(served):
    running = start(served, served[1], max_loras=1)
    try:
        client = running.client()
        first = chat(client, "alpha").choices[0].message.content
        chat(client, "beta")
        again = chat(client, "alpha").choices[0].message.content
        store = running.engine.store
        assert (store.loads, store.evictions) == (3, 2)
        assert [e.name for e in store.loaded()] == ["alpha"]
        assert again == first  # reloaded from its files: the same adapter
    finally:
        running.stop()


def test_an_adapter_loads_on_first_use_while_another_request_runs(served):
    running = start(served, served[1])
    try:
        client = running.client()
        stream = iter(chat(client, "alpha", new=300, stream=True, extra_body={"ignore_eos": True}))
        next(stream)  # alpha is decoding
        assert "beta" not in [e.name for e in running.engine.store.loaded()]
        answer = chat(client, "beta", new=4)
        assert answer.choices[0].finish_reason in ("stop", "length")
        assert running.engine.counts[0] >= 1 or running.engine.stats["generated_tokens"] > 4
        rest = list(stream)
        assert rest[-1].choices[0].finish_reason in ("stop", "length")
    finally:
        running.stop()


def test_a_corrupt_adapter_fails_its_requests_and_the_server_serves_everyone_else(
    served, adapters_copy
):
    broken = adapters_copy / "broken"
    shutil.copytree(adapters_copy / "alpha", broken)
    (broken / "adapter_model.safetensors").write_bytes(b"\x00" * 7 + b"not a tensor file")
    running = start(served, adapters_copy)
    try:
        client = running.client()
        with pytest.raises(openai.APIStatusError) as caught:
            chat(client, "broken")
        assert caught.value.status_code == 422
        assert "broken" in caught.value.message and "could not be loaded" in caught.value.message
        assert chat(client, "alpha").choices[0].finish_reason in ("stop", "length")
        with pytest.raises(openai.APIStatusError):  # still broken: the same error, no retry loop
            chat(client, "broken")
        shutil.rmtree(broken)
        shutil.copytree(adapters_copy / "beta", broken)  # mended on disk: loads next time
        assert chat(client, "broken").choices[0].finish_reason in ("stop", "length")
    finally:
        running.stop()


def test_a_new_run_in_the_directory_is_servable_without_a_restart(served, adapters_copy):
    running = start(served, adapters_copy)
    try:
        shutil.copytree(adapters_copy / "gamma", adapters_copy / "newrun")
        ids = [m.id for m in running.client().models.list().data]
        assert "newrun" in ids
        assert chat(running.client(), "newrun").choices[0].finish_reason in ("stop", "length")
    finally:
        running.stop()


@pytest.mark.parametrize(
    "name", ["../base", "alpha/../beta", "/etc/passwd", "alpha/", "..", "gamma/adapter", "ALPHA"]
)
def test_names_resolve_inside_the_directory_only(server, name):
    with pytest.raises(openai.NotFoundError) as caught:
        chat(server.client(), name)
    assert "available:" in caught.value.message and "alpha" in caught.value.message


def test_a_symlink_out_of_the_directory_is_not_served(served, adapters_copy, tmp_path):
    outside = tmp_path / "outside"
    shutil.copytree(adapters_copy / "alpha", outside)
    (adapters_copy / "escape").symlink_to(outside, target_is_directory=True)
    running = start(served, adapters_copy)
    try:
        assert "escape" not in [m.id for m in running.client().models.list().data]
        with pytest.raises(openai.NotFoundError):
            chat(running.client(), "escape")
    finally:
        running.stop()


def test_admin_loads_and_unloads_an_adapter_by_path(served, tmp_path):
    _, adapters = served
    running = start(served, tmp_path, admin_key="admin-secret")
    try:
        body = {"lora_name": "mine", "lora_path": str(adapters / "alpha")}
        assert running.post("/v1/load_lora_adapter", json=body).status_code == 401
        wrong = {"Authorization": "Bearer nope"}
        assert running.post("/v1/load_lora_adapter", json=body, headers=wrong).status_code == 401
        ok = running.post("/v1/load_lora_adapter", json=body, headers=ADMIN)
        assert ok.status_code == 200, ok.text
        assert [e.name for e in running.engine.store.loaded()] == ["mine"]
        answer = chat(running.client(), "mine").choices[0].message.content
        assert answer
        bad = {"lora_name": "bad", "lora_path": str(tmp_path / "nothing")}
        refused = running.post("/v1/load_lora_adapter", json=bad, headers=ADMIN)
        assert refused.status_code == 400 and "not an adapter directory" in refused.text
        gone = running.post("/v1/unload_lora_adapter", json={"lora_name": "mine"}, headers=ADMIN)
        assert gone.status_code == 200
        with pytest.raises(openai.NotFoundError):
            chat(running.client(), "mine")
        again = running.post("/v1/unload_lora_adapter", json={"lora_name": "mine"}, headers=ADMIN)
        assert again.status_code == 404
    finally:
        running.stop()


def test_without_an_admin_key_runtime_loading_is_off(server, served):
    body = {"lora_name": "mine", "lora_path": str(served[1] / "alpha")}
    response = server.post("/v1/load_lora_adapter", json=body)
    assert response.status_code == 403 and "--admin-key" in response.json()["error"]["message"]


def test_a_corrupt_adapter_loaded_by_an_admin_is_a_clear_error(served, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(served[1] / "alpha", bad)
    (bad / "adapter_config.json").write_text("{not json")
    (tmp_path / "empty").mkdir()
    running = start(served, tmp_path / "empty", admin_key="admin-secret")
    try:
        body = {"lora_name": "bad", "lora_path": str(bad)}
        response = running.post("/v1/load_lora_adapter", json=body, headers=ADMIN)
        assert response.status_code == 422
        assert "adapter_config.json" in response.json()["error"]["message"]
        assert "bad" not in [m.id for m in running.client().models.list().data]
    finally:
        running.stop()


def test_unloading_during_a_request_lets_it_finish(served, tmp_path):
    running = start(served, tmp_path, admin_key="admin-secret")
    try:
        body = {"lora_name": "mine", "lora_path": str(served[1] / "beta")}
        assert running.post("/v1/load_lora_adapter", json=body, headers=ADMIN).status_code == 200
        stream = iter(chat(running.client(), "mine", new=60, stream=True))
        next(stream)
        running.post("/v1/unload_lora_adapter", json={"lora_name": "mine"}, headers=ADMIN)
        rest = list(stream)
        assert rest[-1].choices[0].finish_reason in ("stop", "length")
        with httpx.Client() as c:
            assert c.get(running.url + "/health").status_code == 200
        done = threading.Event()
        running.engine.call(done.set)
        assert done.wait(10)
        assert running.engine.store.loaded() == []
    finally:
        running.stop()


def test_an_adapter_that_ships_a_tokenizer_uses_its_chat_template(served, adapters_copy):
    """The adapter's own tokenizer (saved beside it, with another chat template) renders its chat
    requests; the base and other adapters keep the base's template."""
    from char_tokenizer import char_tokenizer

    own = char_tokenizer()
    own.chat_template = "{% for m in messages %}{{ m['content'] }}{% endfor %}>"
    own.save_pretrained(adapters_copy / "alpha")
    running = start(served, adapters_copy)
    try:
        client = running.client()
        mine = chat(client, "alpha", new=2)
        theirs = chat(client, "beta", new=2)
        assert mine.usage.prompt_tokens == len("hi>")
        base_ids = char_tokenizer().apply_chat_template(
            [{"role": "user", "content": "hi"}], add_generation_prompt=True, tokenize=False
        )
        assert theirs.usage.prompt_tokens == len(char_tokenizer()(base_ids)["input_ids"]) - 0
    finally:
        running.stop()
