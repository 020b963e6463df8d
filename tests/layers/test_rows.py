"""Row plans: one plan per adapter_per_row call, read by every layer, per thread and per model."""

import copy
import threading

import pytest
import torch

import lorakit
from lorakit import LoraConfig
from lorakit.layers.rows import MixedRows
from tiny_models import BATCH, SEQ, randomise, tiny_llama, tokens

VOCAB = 128


def two_adapter_llama(layers: int = 2):
    model = tiny_llama(num_hidden_layers=layers)
    config = LoraConfig(r=4, target_modules="all-linear")
    model = lorakit.apply_lora(model, config, "a")
    model = lorakit.apply_lora(model, LoraConfig(r=2, target_modules=["q_proj"]), "b")
    return randomise(model).eval()


def logits(model, x):
    with torch.no_grad():
        return model(x).logits


def test_entering_a_plan_writes_nothing_into_the_layers():
    model = two_adapter_llama()
    layers = [m for _, m in lorakit.lora_layers(model)]
    before = [dict(vars(m)) for m in layers]
    with lorakit.adapter_per_row(model, ["a", "b"]):
        for layer, state in zip(layers, before):
            assert vars(layer).keys() == state.keys()
            assert all(vars(layer)[k] is v for k, v in state.items())


def test_two_threads_with_different_plans_on_one_model_get_their_own_rows():
    model = two_adapter_llama()
    x = tokens(VOCAB)
    plans = {"first": ["a", "b"], "second": ["b", None]}
    expected = {}
    for key, names in plans.items():
        with lorakit.adapter_per_row(model, names):
            expected[key] = logits(model, x)
    assert not torch.equal(expected["first"], expected["second"])

    results = {key: [] for key in plans}
    start = threading.Barrier(len(plans))
    errors = []

    def run(key):
        try:
            with lorakit.adapter_per_row(model, plans[key]):
                start.wait()
                for _ in range(20):  # the two threads' forwards interleave
                    results[key].append(logits(model, x))
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(key,)) for key in plans]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    for key, outs in results.items():
        assert len(outs) == 20
        for out in outs:  # the same model, inputs and kernels as the reference
            assert torch.equal(out, expected[key]), key


def test_a_plan_is_for_its_own_model_only():
    model = two_adapter_llama()
    other = copy.deepcopy(model)
    lorakit.set_adapter(other, "a")
    x = tokens(VOCAB)
    alone = logits(other, x)
    with lorakit.adapter_per_row(model, ["b", None]):
        assert torch.equal(logits(other, x), alone)  # the copy keeps its own active adapter
        mixed = logits(model, x)
    lorakit.set_adapter(model, "b")
    torch.testing.assert_close(mixed[:1], logits(model, x[:1]))


def test_nested_plans_on_one_model_restore_the_outer_one():
    model = two_adapter_llama()
    x = tokens(VOCAB)
    with lorakit.adapter_per_row(model, ["a", "b"]):
        outer = logits(model, x)
        with lorakit.adapter_per_row(model, [None, None]):
            with lorakit.disable_adapters(model):
                base = logits(model, x)
            assert torch.equal(logits(model, x), base)
        assert torch.equal(logits(model, x), outer)
    assert x.shape == (BATCH, SEQ)


def test_equal_blocks_of_adapters_in_one_batched_product_equal_each_block_alone():
    """A many-adapter training batch (equal consecutive blocks, one per adapter; adapters of
    different ranks and targets, one layer without some of them): logits and every adapter's
    gradients equal each block run alone with its adapter set, in float64."""
    model = tiny_llama(num_hidden_layers=2).double()
    model = lorakit.apply_lora(model, LoraConfig(r=4, target_modules="all-linear"), "a")
    model = lorakit.apply_lora(model, LoraConfig(r=2, target_modules=["q_proj", "v_proj"]), "b")
    rs = LoraConfig(r=8, alpha=4, use_rslora=True, target_modules=["q_proj", "down_proj"])
    model = randomise(lorakit.apply_lora(model, rs, "c")).train()
    names = ["a", "a", "b", "b", "c", "c"]
    x = torch.randint(0, VOCAB, (len(names), 7), generator=torch.Generator().manual_seed(5))
    weights = torch.randn(len(names), 7, VOCAB, dtype=torch.float64)
    params = dict(model.named_parameters())

    def grads():
        got = {k: p.grad.clone() for k, p in params.items() if p.grad is not None}
        model.zero_grad(set_to_none=True)
        return got

    with lorakit.adapter_per_row(model, names):
        together = model(x).logits
    (together * weights).sum().backward()
    together_grads = grads()
    alone = []
    for start in range(0, len(names), 2):
        lorakit.set_adapter(model, names[start])
        out = model(x[start : start + 2]).logits
        (out * weights[start : start + 2]).sum().backward()
        alone.append(out)
    torch.testing.assert_close(together, torch.cat(alone))
    alone_grads = grads()
    assert together_grads.keys() == alone_grads.keys() and together_grads
    for key in together_grads:
        torch.testing.assert_close(together_grads[key], alone_grads[key], msg=key)


@pytest.mark.parametrize("per_block", [1, 2])
def test_equal_blocks_at_inference_use_the_kept_stack_and_follow_changes(per_block, monkeypatch):
    """The same many-adapter blocks without autograd (a server's decoding step has one row per
    adapter): each block's A and B come from the layer's kept stack, once per plan; the logits
    equal each block alone in float64 on every call, and after an adapter changes in place."""
    model = tiny_llama(num_hidden_layers=2).double()
    model = lorakit.apply_lora(model, LoraConfig(r=4, target_modules="all-linear"), "a")
    model = lorakit.apply_lora(model, LoraConfig(r=2, target_modules=["q_proj", "v_proj"]), "b")
    rs = LoraConfig(r=8, alpha=4, use_rslora=True, target_modules=["q_proj", "down_proj"])
    model = randomise(lorakit.apply_lora(model, rs, "c")).eval()
    for name in ("d", "e"):
        model = randomise(lorakit.apply_lora(model, LoraConfig(r=3), name))
    names = [n for n in "abcde" for _ in range(per_block)]
    x = torch.randint(0, VOCAB, (len(names), 5), generator=torch.Generator().manual_seed(9))

    gathered = []
    stack_blocks = MixedRows._stack_blocks
    monkeypatch.setattr(
        MixedRows,
        "_stack_blocks",
        lambda self, plan, names: gathered.append(id(self)) or stack_blocks(self, plan, names),
    )

    def alone():
        out = []
        for start in range(0, len(names), per_block):
            lorakit.set_adapter(model, names[start])
            out.append(model(x[start : start + per_block]).logits)
        return torch.cat(out)

    with torch.no_grad():
        with lorakit.adapter_per_row(model, names):
            first, second, third = (model(x).logits for _ in range(3))
        assert gathered and len(gathered) == 3 * len(set(gathered))  # each layer, each call
        torch.testing.assert_close(first, alone())
        assert torch.equal(first, second) and torch.equal(first, third)
        for _, layer in lorakit.lora_layers(model):
            if "c" in layer.lora_B:
                layer.lora_B["c"].mul_(-2.0)  # in place, as an optimizer step does
        with lorakit.adapter_per_row(model, names):
            changed = model(x).logits
        torch.testing.assert_close(changed, alone())
        assert not torch.allclose(changed, first)
