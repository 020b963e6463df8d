"""torch.export: exporting an adapted model leaves the live model exactly as it was.

``torch.export`` traces with fake tensors and swaps a module's tensor-holding state while it does;
the model handed to it must afterwards compute the same outputs and the same gradients as before,
and the exported program must compute what the model computes.
"""

import pytest
import torch
from torch import nn

import lorakit
from lorakit import LoraConfig
from tiny_models import BATCH, SEQ, tiny_llama

IN, HIDDEN, OUT = 16, 32, 8

HAS_EXPORT = torch._dynamo.is_dynamo_supported()
pytestmark = pytest.mark.skipif(not HAS_EXPORT, reason="torch.export is not supported here")


def _nonzero_adapters(model: nn.Module) -> nn.Module:
    """Non-zero B, so a dropped adapter changes the output."""
    torch.manual_seed(1)
    with torch.no_grad():
        for p in lorakit.adapter_parameters(model):
            p.normal_(0.0, 0.2)
    return model


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(IN, HIDDEN), nn.ReLU(), nn.Linear(HIDDEN, OUT))
    model = lorakit.apply_lora(model, LoraConfig(r=4, alpha=8, target_modules=["0", "2"]))
    return _nonzero_adapters(model).eval()


def _llama() -> nn.Module:
    llama = tiny_llama()
    llama.config.use_cache = False  # export returns tensors only, not a KV cache object
    model = lorakit.apply_lora(llama, LoraConfig(r=4, target_modules="all-linear"))
    return _nonzero_adapters(model).eval()


def _output(model, x):
    out = model(x)
    return out if isinstance(out, torch.Tensor) else out.logits


def _forward_and_grads(model, x):
    model.zero_grad(set_to_none=True)
    out = _output(model, x)
    out.float().pow(2).mean().backward()
    grads = [p.grad.clone() for p in lorakit.adapter_parameters(model)]
    model.zero_grad(set_to_none=True)
    return out.detach(), grads


@pytest.mark.parametrize(
    "build, make_x",
    [
        (_mlp, lambda: torch.randn(4, IN)),
        (_llama, lambda: torch.randint(0, 128, (BATCH, SEQ))),
    ],
    ids=["mlp", "llama"],
)
def test_export_leaves_the_live_model_as_it_was(build, make_x):
    model = build()
    x = make_x()
    with torch.no_grad(), lorakit.disable_adapters(model):
        base = _output(model, x)
    out_before, grads_before = _forward_and_grads(model, x)
    assert not torch.equal(out_before, base)  # the adapters do change the output

    exported = torch.export.export(model, (x,))

    out_after, grads_after = _forward_and_grads(model, x)
    # same model, same inputs, same kernels: bit for bit
    assert torch.equal(out_after, out_before)
    assert len(grads_after) == len(grads_before)
    for after, before in zip(grads_after, grads_before):
        assert torch.equal(after, before)
    # the exported program computes the adapted model too (its own kernels: close, not equal)
    with torch.no_grad():
        torch.testing.assert_close(_output(exported.module(), x), out_before)


def test_export_after_a_mixed_batch_keeps_mixed_batches_working():
    """Exporting while a mixed batch's caches are kept does not poison them."""
    model = _mlp()
    lorakit.apply_lora(model, LoraConfig(r=2, target_modules=["0", "2"]), adapter_name="other")
    _nonzero_adapters(model)
    x = torch.randn(4, IN)
    names = ["default", "other", None, "other"]
    with torch.no_grad(), lorakit.adapter_per_row(model, names):
        before = model(x)
        model(x)  # a second call keeps each row's pick (generation's path)
    torch.export.export(model, (x,))
    with torch.no_grad(), lorakit.adapter_per_row(model, names):
        assert torch.equal(model(x), before)
        assert torch.equal(model(x), before)
