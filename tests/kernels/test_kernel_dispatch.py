"""The layers' dispatch to the kernels: off by default, and when switched on a tiny Llama gives
the eager path's outputs and gradients (LoRA, QLoRA on an NF4 base, a mixed-adapter batch)."""

from __future__ import annotations

import copy
import os
import subprocess
import sys

import pytest
import torch

pytest.importorskip("triton", reason="triton is not installed (the kernels extra)")

import lorakit  # noqa: E402
from lorakit import LoraConfig, kernels  # noqa: E402
from lorakit.errors import ConfigError  # noqa: E402
from tiny_models import LLAMA, tiny_gpt2, tiny_llama  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # else the interpreter (conftest)
IDS = torch.randint(2, LLAMA["vocab_size"], (6, 5), generator=torch.Generator().manual_seed(4))


def _adapted(names=("default",), quantized=False, model=None, **options):
    model = model or tiny_llama()
    if quantized:
        model = lorakit.quantize(model)
    for i, name in enumerate(names):
        config = LoraConfig(r=2 + 3 * i, alpha=8, **{"target_modules": "all-linear", **options})
        lorakit.apply_lora(model, config, adapter_name=name)
    with torch.no_grad():
        for _, layer in lorakit.lora_layers(model):
            for b in layer.lora_B.values():
                b.normal_(std=0.2)  # every adapter computes something
    return model.to(DEVICE)


def _loss_and_grads(model):
    logits = model(IDS.to(DEVICE)).logits
    loss = logits.float().square().mean()
    params = [p for p in model.parameters() if p.requires_grad]
    return logits.detach(), torch.autograd.grad(loss, params)


def test_kernels_are_off_by_default_and_triton_is_not_imported():
    env = {k: v for k, v in os.environ.items() if k != "LORAKIT_KERNELS"}
    code = "import sys, lorakit.kernels as k; print(k.kernels_enabled(), 'triton' in sys.modules)"
    result = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
    )
    assert result.stdout.split() == ["False", "False"]


def test_switching_on_restores_the_previous_setting():
    before = kernels.kernels_enabled()
    with kernels.use_kernels(not before):
        assert kernels.kernels_enabled() is (not before)
    assert kernels.kernels_enabled() is before


def test_switching_on_without_triton_is_a_config_error(monkeypatch):
    monkeypatch.setattr(kernels, "available", lambda: False)
    with pytest.raises(ConfigError, match="needs triton"):
        kernels.use_kernels(True)


@pytest.mark.parametrize(
    "build",
    [
        lambda: _adapted(),
        lambda: _adapted(quantized=True),
        lambda: _adapted(use_dora=True),
        # GPT-2's Conv1D, c_attn split in q/k/v with adapters on q and v only
        lambda: _adapted(
            model=tiny_gpt2(),
            target_modules=["c_attn", "c_fc"],
            fused_slices={"c_attn": (True, False, True)},
        ),
    ],
    ids=["lora", "qlora", "dora", "gpt2-fused-slices"],
)
def test_an_adapted_model_trains_the_same_with_kernels(build, monkeypatch):
    from lorakit.kernels import gemm, lora_linear

    calls = []

    def counted(*args, **kwargs):  # the real GEMM, counted
        calls.append(1)
        return real(*args, **kwargs)

    real = gemm.gemm
    monkeypatch.setattr(gemm, "gemm", counted)  # read at call time by nf4
    monkeypatch.setattr(lora_linear, "gemm", counted)
    model = build()
    twin = copy.deepcopy(model)
    want_logits, want_grads = _loss_and_grads(twin)
    assert not calls  # off by default
    with kernels.use_kernels(True):
        got_logits, got_grads = _loss_and_grads(model)
    assert calls
    # float32 sums in another order than torch's kernels, through 2 layers and a softmax
    torch.testing.assert_close(got_logits, want_logits, rtol=1e-4, atol=1e-5)
    for got, want in zip(got_grads, want_grads):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)


def test_a_mixed_batch_of_many_adapters_uses_the_sgmv_kernels():
    names = [f"n{i}" for i in range(6)]  # more than GROUPED_MAX_ADAPTERS: the stacked path
    model = _adapted(names)
    ids = torch.randint(2, LLAMA["vocab_size"], (8, 5), generator=torch.Generator().manual_seed(5))
    # 5 distinct adapters, not in blocks, a repeated one and a row without an adapter; then
    # another assignment and the first again (each plan's token segments are its own)
    first = ["n3", None, "n0", "n5", "n3", "n1", "n2", "n0"]
    for rows in (first, ["n1", "n2", "n4", None, "n5", "n0", "n0", "n3"], first):
        with torch.no_grad(), lorakit.adapter_per_row(model, rows):
            want = model(ids.to(DEVICE)).logits
            with kernels.use_kernels(True):
                got = model(ids.to(DEVICE)).logits
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)  # another summation order
    layer = next(layer for _, layer in lorakit.lora_layers(model))
    assert layer._packed_cache[1].ranks.tolist() == [2, 5, 8, 11, 14, 17]  # unpadded
