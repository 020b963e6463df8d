"""Tiny models built in code (nothing downloaded) and the helpers most tests share.

A plain module on pytest's path (``pythonpath`` in pyproject.toml): tests/ has no packages.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
)

import lorakit

LLAMA = dict(
    hidden_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    intermediate_size=128,
    vocab_size=128,
)
GPT2 = dict(n_embd=64, n_layer=2, n_head=4, vocab_size=128, n_positions=64)
BERT = dict(
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=2,
    intermediate_size=64,
    vocab_size=100,
    max_position_embeddings=64,
    num_labels=3,
)
BATCH, SEQ = 2, 10


def tiny_llama(seed: int = 0, **overrides) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(**{**LLAMA, **overrides})).eval()


def tiny_gpt2(seed: int = 0) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    return GPT2LMHeadModel(GPT2Config(**GPT2)).eval()


def tiny_bert(seed: int = 0) -> BertForSequenceClassification:
    torch.manual_seed(seed)
    return BertForSequenceClassification(BertConfig(**BERT)).eval()


class ConvNet(nn.Module):
    """A small image model: two convolutions and a linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 8, 3, stride=2)
        self.head = nn.Linear(8 * 7 * 7, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.conv2(torch.relu(self.conv1(x)))).flatten(1))


def conv_net(seed: int = 0) -> ConvNet:
    torch.manual_seed(seed)
    return ConvNet().eval()


def tokens(vocab: int, seed: int = 1) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (BATCH, SEQ), generator=gen)


def randomise(model: nn.Module, seed: int = 2) -> nn.Module:
    """Random A, B and saved copies, so every adapter tensor changes the output."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in lorakit.adapter_parameters(model):
            p.copy_(torch.randn(p.shape, generator=gen) * 0.2)
    return model


def logits(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        out = model(x)
    return out if isinstance(out, torch.Tensor) else out.logits


def each_row_alone(model: nn.Module, names, run) -> list:
    """``run(i)`` for every row i with only that row's adapter on (None: adapters disabled): the
    reference a mixed-adapter batch is compared with."""
    results = []
    for i, name in enumerate(names):
        if name is None:
            with lorakit.disable_adapters(model):
                results.append(run(i))
        else:
            lorakit.set_adapter(model, name)
            results.append(run(i))
    return results
