"""Several adapters trained at once on one frozen base: each learns only from its own rows."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import lorakit
from lorakit.layers import LoraLayer

NAMES = ["a", "b", "a", "c", "b", "a", "c", "c"]
STEPS = 5
LR = 0.01


@pytest.mark.parametrize("grouped_max", [4, 0], ids=["grouped", "stacked"])
def test_training_together_equals_training_each_alone(monkeypatch, grouped_max):
    monkeypatch.setattr(LoraLayer, "GROUPED_MAX_ADAPTERS", grouped_max)
    base = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 4))
    model = lorakit.apply_lora(base, lorakit.LoraConfig(r=2), "a")
    model = lorakit.apply_lora(model, lorakit.LoraConfig(r=3, alpha=4), "b")
    model = lorakit.apply_lora(model, lorakit.LoraConfig(r=2, target_modules=["2"]), "c")
    with torch.no_grad():
        for p in lorakit.adapter_parameters(model):
            p.normal_(0.0, 0.1)
            p.requires_grad_(True)
    alone = copy.deepcopy(model)
    x, y = torch.randn(len(NAMES), 8), torch.randn(len(NAMES), 4)

    optimizer = torch.optim.SGD(lorakit.adapter_parameters(model), lr=LR)
    for _ in range(STEPS):
        with lorakit.adapter_per_row(model, NAMES):
            # a sum over rows: each row's loss is the same term it is in its adapter's own run
            loss = (model(x) - y).square().sum()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()

    for name in ("a", "b", "c"):
        rows = [i for i, n in enumerate(NAMES) if n == name]
        lorakit.set_adapter(alone, name)
        own = torch.optim.SGD(lorakit.adapter_parameters(alone, name), lr=LR)
        for _ in range(STEPS):
            (alone(x[rows]) - y[rows]).square().sum().backward()
            own.step()
            own.zero_grad()
        together = list(lorakit.adapter_parameters(model, name))
        separate = list(lorakit.adapter_parameters(alone, name))
        assert len(together) == len(separate) > 0
        for p, q in zip(together, separate):  # other shapes, other sums: float32 rounding
            torch.testing.assert_close(p, q, rtol=1e-4, atol=5e-5)
    # the base did not move
    for key, value in alone.state_dict().items():
        if ".lora_" not in key:
            assert torch.equal(model.state_dict()[key], value)
