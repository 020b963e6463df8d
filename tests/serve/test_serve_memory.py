"""``--max-lora-memory``: the bytes of the adapters in memory stay within a budget beside
``--max-loras``. Adapters of different sizes under a budget that holds two small ones or one large
one: eviction by least recent use and by bytes, the bytes in ``/metrics`` against the files'
tensors, an adapter larger than the whole budget failing alone, a load waiting for adapters in
use, the stacks of many-adapter batches, the flag's parsing; and sliding-window models (Mistral,
Qwen2), served with the window as transformers applies it."""

from __future__ import annotations

import argparse
import gc
import threading
import time
import weakref

import openai
import pytest
import torch
from safetensors.torch import load_file

from lorakit import adapter_parameters
from lorakit.cli.main import build_parser
from lorakit.cli.serve import size_bytes
from lorakit.serve.adapter_bytes import stack_projection
from serving import Running, save_adapter_for

SMALL = (2, ["q_proj", "v_proj"])  # 2 layers x (2·(32+32) + 2·(32+16)) = 448 values
LARGE = (2, ["q_proj", "k_proj", "v_proj", "o_proj"])  # 896 values: 2 small ones
HUGE = (8, "all-linear")
LONG = {"extra_body": {"ignore_eos": True}}  # a request that runs its whole max_tokens


@pytest.fixture(scope="module")
def memory_adapters(served, tmp_path_factory):
    """(adapters directory, {name: bytes of its tensors in its safetensors file})."""
    base_dir, _ = served
    root = tmp_path_factory.mktemp("memory")
    kinds = {"s1": SMALL, "s2": SMALL, "s3": SMALL, "large": LARGE, "huge": HUGE}
    sizes = {}
    for seed, (name, (r, targets)) in enumerate(kinds.items()):
        save_adapter_for(base_dir, root / name, r, targets, seed + 10)
        tensors = load_file(root / name / "adapter_model.safetensors")
        sizes[name] = sum(t.numel() * t.element_size() for t in tensors.values())
    small, large = sizes["s1"], sizes["large"]
    assert small < large < 3 * small  # the budget max(2 small, large) holds no large + small
    return root, sizes


def start(served, adapters, **options) -> Running:
    return Running(base=str(served[0]), adapters=str(adapters), **options)


def chat(client, model, new=4, **kw):
    return client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": "hi"}], max_tokens=new, **kw
    )


def gauge(running: Running, name: str) -> float:
    text = running.get("/metrics").text
    values = [line.split()[1] for line in text.splitlines() if line.startswith(name + " ")]
    assert len(values) == 1, text
    return float(values[0])


def loaded(running: Running) -> set[str]:
    return {e.name for e in running.engine.store.loaded()}


def test_the_budget_evicts_least_recently_used_idle_adapters_until_a_load_fits(
    served, memory_adapters
):
    root, sizes = memory_adapters
    budget = max(2 * sizes["s1"], sizes["large"])
    running = start(served, root, max_lora_memory=budget)
    store = running.engine.store
    try:
        client = running.client()
        assert gauge(running, "lorakit_adapter_memory_budget_bytes") == budget
        assert gauge(running, "lorakit_adapter_memory_bytes") == 0
        chat(client, "s1")
        chat(client, "s2")
        assert loaded(running) == {"s1", "s2"} and store.evictions == 0
        assert gauge(running, "lorakit_adapter_memory_bytes") == sizes["s1"] + sizes["s2"]
        chat(client, "s1")  # s2 is now the least recently used
        tensors = [weakref.ref(p) for p in adapter_parameters(running.engine.model, "s2")]
        chat(client, "s3")
        assert loaded(running) == {"s1", "s3"} and store.evictions == 1
        gc.collect()
        assert tensors and all(ref() is None for ref in tensors)  # s2's tensors are freed
        assert gauge(running, "lorakit_adapter_memory_bytes") == sizes["s1"] + sizes["s3"]
        chat(client, "large")  # needs both small ones' bytes, though one adapter would do by count
        assert loaded(running) == {"large"} and store.evictions == 3
        assert gauge(running, "lorakit_adapter_memory_bytes") == sizes["large"]
        assert gauge(running, "lorakit_adapter_evictions_total") == 3
        assert gauge(running, "lorakit_adapter_stack_bytes") == 0  # one adapter: no stack
    finally:
        running.stop()


def test_both_limits_apply_together(served, memory_adapters):
    root, sizes = memory_adapters
    running = start(served, root, max_loras=2, max_lora_memory=10 * sizes["s1"])
    try:
        client = running.client()
        for name in ("s1", "s2", "s3"):
            chat(client, name)
        assert loaded(running) == {"s2", "s3"} and running.engine.store.evictions == 1
        assert gauge(running, "lorakit_adapter_memory_bytes") == sizes["s2"] + sizes["s3"]
    finally:
        running.stop()


def test_on_a_bfloat16_base_adapters_are_counted_as_attached_in_float32(served, memory_adapters):
    root, sizes = memory_adapters
    running = start(served, root, dtype="bfloat16", max_lora_memory=sizes["s1"])
    try:
        client = running.client()
        chat(client, "s1")
        assert gauge(running, "lorakit_adapter_memory_bytes") == sizes["s1"]  # float32 files
        chat(client, "s2")  # one small adapter's bytes: s1 goes
        assert loaded(running) == {"s2"} and running.engine.store.evictions == 1
    finally:
        running.stop()


def test_an_adapter_larger_than_the_budget_fails_and_evicts_nothing(served, memory_adapters):
    root, sizes = memory_adapters
    budget = 2 * sizes["s1"]
    running = start(served, root, max_lora_memory=budget, admin_key="admin-secret")
    try:
        client = running.client()
        chat(client, "s1")
        body = {"lora_name": "mine", "lora_path": str(root / "huge")}
        headers = {"Authorization": "Bearer admin-secret"}
        refused = running.post("/v1/load_lora_adapter", json=body, headers=headers)
        assert refused.status_code == 422 and f"{budget:,} bytes" in refused.text
        for _ in range(2):  # the second time at once, from the same verdict
            with pytest.raises(openai.APIStatusError) as caught:
                chat(client, "huge")
            assert caught.value.status_code == 422
            message = caught.value.message
            assert "'huge'" in message and "--max-lora-memory" in message, message
            assert f"{sizes['huge']:,} bytes" in message and f"{budget:,} bytes" in message
        assert loaded(running) == {"s1"} and running.engine.store.evictions == 0
        assert gauge(running, "lorakit_adapter_memory_bytes") == sizes["s1"]
        assert chat(client, "s2").choices[0].finish_reason in ("stop", "length")
    finally:
        running.stop()


def test_a_load_waits_while_the_budget_is_held_by_a_running_request(served, memory_adapters):
    root, sizes = memory_adapters
    running = start(served, root, max_lora_memory=sizes["s1"])  # one small adapter at a time
    store = running.engine.store
    try:
        client = running.client()
        stream = iter(chat(client, "s3", new=400, stream=True, temperature=0, **LONG))
        next(stream)  # s3 is decoding (400 tokens: an end-of-text token does not end it)
        answers = []
        waiter = threading.Thread(target=lambda: answers.append(chat(client, "s2", new=4)))
        waiter.start()
        deadline = time.monotonic() + 30
        while "s2" not in store.entries or not _read_and_waiting(store.entries["s2"]):
            assert time.monotonic() < deadline, "s2 was never read"
            time.sleep(0.002)
        assert loaded(running) == {"s3"} and waiter.is_alive()  # s2 waits, nothing failed
        rest = list(stream)
        assert rest[-1].choices[0].finish_reason in ("stop", "length")
        waiter.join(timeout=60)
        assert answers and answers[0].choices[0].finish_reason in ("stop", "length")
        assert loaded(running) == {"s2"} and store.evictions == 1
    finally:
        running.stop()


def _read_and_waiting(entry) -> bool:
    future = entry.future
    return entry.state == "loading" and future is not None and future.done()


def test_the_stack_of_a_many_adapter_batch_is_shown_and_freed_when_adapters_change(
    served, memory_adapters
):
    """A decoding step with the base and five adapters builds each layer's stack of all
    adapters: ``(n + 1) · R · (in + out)`` values a layer for n adapters of largest rank R there
    (computed here from the files' shapes); an unload frees it."""
    root, _ = memory_adapters
    names = ["s1", "s2", "s3", "large", "huge"]
    running = start(served, root, admin_key="admin-secret")
    engine = running.engine
    try:
        client = running.client()
        for name in names:
            chat(client, name, new=1)
        assert gauge(running, "lorakit_adapter_stack_bytes") == 0
        assert gauge(running, "lorakit_adapter_memory_budget_bytes") == float("inf")  # no budget
        base = iter(chat(client, running.base, new=400, stream=True, temperature=0, **LONG))
        next(base)  # the base is decoding
        gate, held = threading.Event(), threading.Event()
        engine.call(lambda: (held.set(), gate.wait(30)))  # no step until all five are queued
        assert held.wait(30)
        threads = [threading.Thread(target=chat, args=(client, n, 16)) for n in names]
        for thread in threads:
            thread.start()
        deadline = time.monotonic() + 30
        while engine.counts[1] < len(names):
            assert time.monotonic() < deadline
            time.sleep(0.002)
        gate.set()  # admitted together: the next steps run the base and five adapters
        for thread in threads:
            thread.join(timeout=60)
        list(base)
        assert max(engine.batch_sizes) == 1 + len(names)
        expected = stack_bytes(root, names)
        assert expected > 0 and gauge(running, "lorakit_adapter_stack_bytes") == expected
        assert stack_projection(engine.store.loaded()) == expected  # what the budget counts
        headers = {"Authorization": "Bearer admin-secret"}
        running.post("/v1/unload_lora_adapter", json={"lora_name": "s1"}, headers=headers)
        done = threading.Event()
        engine.call(done.set)
        assert done.wait(10)
        assert gauge(running, "lorakit_adapter_stack_bytes") == 0
    finally:
        running.stop()


def test_the_budget_counts_the_stack_that_more_than_four_adapters_may_need(served, memory_adapters):
    """Four adapters are applied from their parameters; a fifth makes every layer's stack of all
    five possible, and the budget holds it: a budget of the five adapters' bytes without their
    stack evicts one to load the fifth, one with it holds all five."""
    root, sizes = memory_adapters
    names = ["s1", "s2", "s3", "large", "huge"]
    tensors = sum(sizes[n] for n in names)
    with_stack = tensors + stack_bytes(root, names)
    for budget, evicted in ((with_stack - 1, 1), (with_stack, 0)):
        running = start(served, root, max_lora_memory=budget)
        try:
            client = running.client()
            for name in names:
                chat(client, name)
            store = running.engine.store
            assert store.evictions == evicted, budget
            assert loaded(running) == set(names[evicted:])  # the least recently used went
            ready = store.loaded()
            assert sum(e.bytes for e in ready) + stack_projection(ready) <= budget
        finally:
            running.stop()


def stack_bytes(root, names) -> int:
    """Bytes of the float32 stacks of ``names``' adapters, from their files' shapes alone."""
    modules: dict[str, list[int]] = {}  # module -> [largest r, in, out]
    for name in names:
        for key, t in load_file(root / name / "adapter_model.safetensors").items():
            if key.endswith(".lora_A.weight"):
                module = modules.setdefault(key.removesuffix(".lora_A.weight"), [0, 0, 0])
                module[0], module[1] = max(module[0], t.shape[0]), t.shape[1]
            elif key.endswith(".lora_B.weight"):
                modules.setdefault(key.removesuffix(".lora_B.weight"), [0, 0, 0])[2] = t.shape[0]
    return sum((len(names) + 1) * r * (n_in + n_out) * 4 for r, n_in, n_out in modules.values())


@pytest.mark.parametrize(
    "text, size",
    [("1000", 1000), ("512MiB", 512 * 2**20), ("2GB", 2 * 10**9), ("1.5kB", 1500), ("3 KiB", 3072)],
)
def test_sizes_parse_in_decimal_and_binary_units(text, size):
    assert size_bytes(text) == size


@pytest.mark.parametrize(
    "text, says",
    [
        ("12XB", "expected a size such as 512MiB"),
        ("-5", "must be positive"),
        ("0", "at least 1 byte"),
        ("0.1B", "at least 1 byte"),
        ("lots", "expected a size"),
    ],
)
def test_bad_sizes_are_argparse_errors(capsys, text, says):
    with pytest.raises(argparse.ArgumentTypeError, match=says):
        size_bytes(text)
    with pytest.raises(SystemExit) as caught:
        build_parser().parse_args(["serve", f"--max-lora-memory={text}"])
    assert caught.value.code == 2
    err = capsys.readouterr().err
    assert "--max-lora-memory" in err and says in err


@pytest.mark.parametrize("kind", ["mistral", "qwen2"])
def test_a_sliding_window_model_answers_as_transformers_generate(tmp_path, kind):
    """An 8-token window (Mistral: every layer; Qwen2: the second of two, beside a full one):
    prompts longer than the window, of different lengths, decoded together past the window, get
    transformers' own greedy answers (its generate keeps a sliding-window cache; the server
    keeps every key and masks the window)."""
    from transformers import MistralConfig, MistralForCausalLM, Qwen2Config, Qwen2ForCausalLM

    from char_tokenizer import char_tokenizer

    sizes = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4)
    sizes |= dict(num_key_value_heads=2, max_position_embeddings=512, initializer_range=0.2)
    tokenizer = char_tokenizer()
    ids = dict(vocab_size=len(tokenizer), pad_token_id=0, bos_token_id=2, eos_token_id=4)
    if kind == "mistral":
        model_class, config_class, window = MistralForCausalLM, MistralConfig, {}
    else:  # layer 0 full attention, layer 1 sliding
        model_class, config_class = Qwen2ForCausalLM, Qwen2Config
        window = dict(use_sliding_window=True, max_window_layers=1)
    config = config_class(sliding_window=8, **window, **sizes, **ids)
    no_window = config_class(sliding_window=None, **sizes, **ids)
    torch.manual_seed(0)
    model = model_class(config).eval()
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    prompts = ["hello there, this is long", "a date: 5 Mar 1987 and more"]
    running = Running(base=str(tmp_path))
    its_tokenizer = running.engine.tokenizer  # as the server reads it from the directory

    def offline(prompt: str, model=model) -> str:
        ids = its_tokenizer(prompt, return_tensors="pt").input_ids
        out = model.generate(
            ids, attention_mask=torch.ones_like(ids), max_new_tokens=20, do_sample=False
        )
        return its_tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True)

    try:
        expected = [offline(p) for p in prompts]
        full = model_class(no_window).eval()
        full.load_state_dict(model.state_dict())
        assert [offline(p, full) for p in prompts] != expected  # the window changes the answers
        out = running.client().completions.create(
            model=running.base, prompt=prompts, max_tokens=20, temperature=0
        )
        assert [c.text for c in sorted(out.choices, key=lambda c: c.index)] == expected
        assert running.engine.stats["prefills"] == 1  # prefilled together, left-padded
    finally:
        running.stop()


def test_stack_shapes_of_linear_embedding_and_conv_modules():
    from types import SimpleNamespace

    from lorakit.serve.adapter_bytes import stack_shapes
    from lorakit.serve.store import Entry

    file = SimpleNamespace(
        shapes={
            "base_model.model.q.lora_A.weight": (4, 32),
            "base_model.model.q.lora_B.weight": (16, 4),
            "base_model.model.emb.lora_embedding_A": (2, 100),
            "base_model.model.emb.lora_embedding_B": (8, 2),
            "base_model.model.conv.lora_A.weight": (3, 5, 3, 3),
            "base_model.model.conv.lora_B.weight": (7, 3, 1, 1),
            "base_model.model.q.lora_magnitude_vector": (16,),
        }
    )
    shapes = stack_shapes(file, 4)
    assert shapes == {
        "base_model.model.q": (4, (32 + 16) * 4, False),
        "base_model.model.emb": (2, (100 + 8) * 4, True),
        "base_model.model.conv": (3, (45 + 7) * 4, True),
    }
    one = Entry.__new__(Entry)
    one.stacked = shapes
    # alone: only the embedding and the convolution stack (2 slots: the base's and its own)
    assert stack_projection([one]) == 2 * (2 * 108 * 4 + 3 * 52 * 4)
    assert stack_projection([one] * 5) == 6 * (4 * 48 + 2 * 108 + 3 * 52) * 4
