"""Generation with a KV cache in a mixed-adapter batch equals generating each row alone."""

from __future__ import annotations

import pytest
import torch

import lorakit
from lorakit.layers import LoraLayer
from tiny_models import tiny_llama

ROWS = ["a", None, "b", "a", "c"]
NEW_TOKENS = 6


def adapted_llama() -> torch.nn.Module:
    model = tiny_llama()
    # different ranks, alphas and target sets, an embedding adapter among them
    model = lorakit.apply_lora(model, lorakit.LoraConfig(r=4, target_modules="all-linear"), "a")
    model = lorakit.apply_lora(
        model, lorakit.LoraConfig(r=2, alpha=7, target_modules=["q_proj", "v_proj"]), "b"
    )
    model = lorakit.apply_lora(
        model, lorakit.LoraConfig(r=3, target_modules=["embed_tokens", "down_proj"]), "c"
    )
    with torch.no_grad():
        for p in lorakit.adapter_parameters(model):
            p.normal_(0.0, 0.5)  # large updates: each adapter changes the greedy tokens
    return model


@pytest.mark.parametrize("grouped_max", [4, 0], ids=["grouped", "stacked"])
def test_mixed_generate_equals_each_row_alone(monkeypatch, grouped_max):
    monkeypatch.setattr(LoraLayer, "GROUPED_MAX_ADAPTERS", grouped_max)
    model = adapted_llama()
    prompt = torch.randint(0, 128, (len(ROWS), 5))
    settings = dict(max_new_tokens=NEW_TOKENS, do_sample=False, use_cache=True, pad_token_id=0)
    with torch.no_grad(), lorakit.adapter_per_row(model, ROWS):
        mixed = model.generate(prompt, **settings)
    alone = []
    with torch.no_grad():
        for i, name in enumerate(ROWS):
            lorakit.set_adapter(model, name)
            alone.append(model.generate(prompt[i : i + 1], **settings))
    assert torch.equal(mixed, torch.cat(alone))
    # the adapters matter: the rows of one prompt differ between adapters
    lorakit.set_adapter(model, None)
    with torch.no_grad():
        base = model.generate(prompt, **settings)
    assert not torch.equal(base, mixed)
