"""``apply_lora`` is all or nothing: an adapter that cannot be added leaves the model as it was.

A failure in the middle of the injection (an allocation that fails for a late module, a switch
refused at the end) must put back every module already replaced, drop every adapter already
added and restore every ``requires_grad`` flag; the error names the module, r and the size.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import lorakit
import lorakit.adapter_memory as adapter_memory
from lorakit import LoraConfig, MergeError
from lorakit.errors import ConfigError
from tiny_models import LLAMA, tiny_llama

HUGE_R = 1_000_000_000


def impossible_r(in_features: int) -> int:
    """A rank whose float32 lora_A (r, in) takes 2**60 bytes (1.15 EB): more than any address
    space can map (even 57-bit), yet a valid size, so the allocator itself refuses it wherever
    the test runs, and nothing is ever written."""
    return 2**60 // (4 * in_features)


LAST_LINEAR = "model.layers.1.mlp.down_proj"
LAST_IN = LLAMA["intermediate_size"]  # its in_features


def snapshot(model: nn.Module):
    return {
        "types": [(p, type(m)) for p, m in model.named_modules(remove_duplicate=False)],
        "params": [(n, id(p), p.requires_grad) for n, p in model.named_parameters()],
        "state": {k: v.clone() for k, v in model.state_dict().items()},
        "adapters": lorakit.list_adapters(model),
        "active": lorakit.active_adapter(model),
    }


def assert_unchanged(model: nn.Module, before: dict) -> None:
    after = snapshot(model)
    for key in ("types", "params", "adapters", "active"):
        assert after[key] == before[key], key
    assert list(after["state"]) == list(before["state"])
    for key, value in after["state"].items():
        assert torch.equal(value, before["state"][key]), key


def test_an_impossible_rank_is_refused_before_anything_changes():
    model = tiny_llama()
    before = snapshot(model)
    with pytest.raises(ConfigError) as caught:
        lorakit.apply_lora(model, LoraConfig(r=HUGE_R, target_modules="all-linear"))
    message = str(caught.value)
    assert f"r={HUGE_R:,}" in message and "GB" in message, message
    assert "model.layers." in message, message  # the module that needs the most
    assert_unchanged(model, before)
    assert not hasattr(model, "lorakit_configs")


def test_an_allocation_failing_late_puts_back_every_module(monkeypatch):
    """The first adapter stays as it was; the second fails at the last module, for real."""
    model = lorakit.apply_lora(tiny_llama(), LoraConfig(r=2, target_modules="all-linear"), "a")
    before = snapshot(model)
    # No size known for the device: the allocator itself is what refuses.
    monkeypatch.setattr(adapter_memory, "memory_of", lambda device: None)
    config = LoraConfig(
        r=4,
        target_modules="all-linear",
        rank_pattern={LAST_LINEAR: impossible_r(LAST_IN)},
        bias="all",
    )
    with pytest.raises(ConfigError) as caught:
        lorakit.apply_lora(model, config, "b")
    message = str(caught.value)
    assert LAST_LINEAR in message and f"r={impossible_r(LAST_IN):,}" in message, message
    assert "EB" in message, message
    assert_unchanged(model, before)


def test_an_allocation_failing_on_a_fresh_model_gives_back_the_base_tensors(monkeypatch):
    model = tiny_llama()
    before = snapshot(model)
    monkeypatch.setattr(adapter_memory, "memory_of", lambda device: None)
    config = LoraConfig(
        r=4, target_modules="all-linear", rank_pattern={LAST_LINEAR: impossible_r(LAST_IN)}
    )
    with pytest.raises(ConfigError, match=LAST_LINEAR):
        lorakit.apply_lora(model, config)
    assert_unchanged(model, before)
    assert not hasattr(model, "lorakit_configs")
    ids = torch.randint(0, 50, (1, 5))
    with torch.no_grad():
        model(ids)  # the linear layers have their weights again


def test_a_switch_refused_at_the_end_undoes_the_injection():
    """With an adapter merged, the new one cannot become active: nothing of it is left."""
    model = lorakit.apply_lora(tiny_llama(), LoraConfig(r=2, target_modules=["q_proj"]), "a")
    lorakit.merge(model, "a")
    before = snapshot(model)
    config = LoraConfig(r=2, target_modules=["q_proj", "v_proj"], modules_to_save=["lm_head"])
    with pytest.raises(MergeError):
        lorakit.apply_lora(model, config, "b")
    assert_unchanged(model, before)
    assert lorakit.adapter_configs(model).keys() == {"a"}


def test_a_shared_module_goes_back_to_every_path(monkeypatch):
    monkeypatch.setattr(adapter_memory, "memory_of", lambda device: None)
    shared = nn.Linear(4, 4)
    net = nn.Sequential(shared, nn.ReLU(), shared, nn.Linear(4, 4))
    before = snapshot(net)
    config = LoraConfig(r=2, target_modules=["0", "3"], rank_pattern={"3": impossible_r(4)})
    with pytest.raises(ConfigError, match="^3: cannot allocate"):
        lorakit.apply_lora(net, config)
    assert_unchanged(net, before)
    assert net[0] is net[2] is shared and shared.weight is not None


def test_a_bare_linear_gets_its_weight_back(monkeypatch):
    monkeypatch.setattr(adapter_memory, "memory_of", lambda device: None)
    linear = nn.Linear(4, 4)
    weight, bias = linear.weight, linear.bias
    with pytest.raises(ConfigError, match=r"\(root\): cannot allocate"):
        lorakit.apply_lora(linear, LoraConfig(r=impossible_r(4), target_modules=".*"))
    assert linear.weight is weight and linear.bias is bias
