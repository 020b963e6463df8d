"""torch.compile: the adapter forward traces into one graph and compiles to the eager result.

TorchDynamo tracing (``explain``, the ``eager`` backend) needs no C compiler; the inductor test
does and is skipped where none is found, or where the platform has no TorchDynamo at all.
"""

import copy
import os
import shutil

import pytest
import torch
from torch import nn

import lorakit
from lorakit import LoraConfig
from tiny_models import tiny_llama

IN, HIDDEN, OUT, BATCH = 16, 32, 8, 4

HAS_DYNAMO = torch._dynamo.is_dynamo_supported()
HAS_COMPILER = any(
    shutil.which(c) for c in (os.environ.get("CXX", ""), "g++", "clang++", "c++") if c
)
needs_dynamo = pytest.mark.skipif(not HAS_DYNAMO, reason="TorchDynamo is not supported here")
needs_inductor = pytest.mark.skipif(
    not (HAS_DYNAMO and HAS_COMPILER), reason="torch.compile's inductor needs a C++ compiler"
)
# Inductor writes C++ for this CPU's own vector instructions, which torch's headers do not declare
# under an ATEN_CPU_CAPABILITY override (scripts/test_other_kernels.sh): it cannot build there.
needs_native_kernels = pytest.mark.skipif(
    bool(os.environ.get("ATEN_CPU_CAPABILITY")),
    reason="inductor cannot compile under an ATEN_CPU_CAPABILITY override",
)


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    """Each test traces from scratch: no cached graphs or guards from another test."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def adapted_mlp(**config) -> nn.Module:
    model = nn.Sequential(nn.Linear(IN, HIDDEN), nn.ReLU(), nn.Linear(HIDDEN, OUT))
    model = lorakit.apply_lora(model, LoraConfig(r=4, alpha=8, **config))
    with torch.no_grad():  # a non-zero update, so a dropped adapter would show
        for _, layer in lorakit.lora_layers(model):
            for b in layer.lora_B.values():
                b.normal_(0.0, 0.2)
    return model.eval()


@needs_dynamo
@pytest.mark.parametrize("training", [False, True], ids=["eval", "train-with-dropout"])
def test_adapter_forward_has_no_graph_breaks(training):
    model = adapted_mlp(dropout=0.1 if training else 0.0)
    model.train(training)
    explanation = torch._dynamo.explain(model)(torch.randn(BATCH, IN))
    assert explanation.graph_break_count == 0, explanation.break_reasons
    assert explanation.graph_count == 1


@needs_dynamo
def test_traced_forward_follows_adapter_switches():
    """Switching, disabling and merging change guarded state: the traced model must follow."""
    model = adapted_mlp()
    lorakit.apply_lora(model, LoraConfig(r=2, alpha=2), adapter_name="other")
    with torch.no_grad():
        for _, layer in lorakit.lora_layers(model):
            layer.lora_B["other"].normal_(0.0, 0.2)
    compiled = torch.compile(model, backend="eager", fullgraph=True)
    x = torch.randn(BATCH, IN)
    outputs = {}
    for name in ("default", "other", None):
        lorakit.set_adapter(model, name)
        with torch.no_grad():
            outputs[name] = compiled(x)
            torch.testing.assert_close(outputs[name], model(x))
    assert not torch.allclose(outputs["default"], outputs["other"])
    lorakit.set_adapter(model, "default")
    with lorakit.disable_adapters(model), torch.no_grad():
        torch.testing.assert_close(compiled(x), outputs[None])
    lorakit.merge(model)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), outputs["default"])


@needs_inductor
@needs_native_kernels
def test_compiled_fullgraph_matches_eager_forward_and_gradients():
    model = adapted_mlp()
    x = torch.randn(BATCH, IN)
    compiled = torch.compile(model, fullgraph=True)
    eager_out = model(x)
    eager_out.square().mean().backward()
    eager_grads = [p.grad.clone() for p in lorakit.adapter_parameters(model)]
    model.zero_grad(set_to_none=True)
    compiled_out = compiled(x)
    compiled_out.square().mean().backward()
    torch.testing.assert_close(compiled_out, eager_out)
    for p, expected in zip(lorakit.adapter_parameters(model), eager_grads):
        torch.testing.assert_close(p.grad, expected)


@needs_dynamo
def test_lora_adds_no_graph_breaks_to_llama():
    base = tiny_llama()
    ids = torch.randint(0, 128, (2, 8))
    base_explanation = torch._dynamo.explain(base)(input_ids=ids)
    torch._dynamo.reset()
    model = lorakit.apply_lora(copy.deepcopy(base), LoraConfig(r=4, target_modules="all-linear"))
    explanation = torch._dynamo.explain(model)(input_ids=ids)
    assert explanation.graph_break_count == base_explanation.graph_break_count, (
        explanation.break_reasons
    )
    assert explanation.graph_count == base_explanation.graph_count


@needs_dynamo
def test_mixed_adapter_batch_has_no_graph_breaks():
    model = adapted_mlp()
    lorakit.apply_lora(model, LoraConfig(r=2), adapter_name="other")
    with lorakit.adapter_per_row(model, ["default", "other", None, "default"]):
        explanation = torch._dynamo.explain(model)(torch.randn(BATCH, IN))
    assert explanation.graph_break_count == 0, explanation.break_reasons


@needs_dynamo
@pytest.mark.parametrize("name", ["opt", "phi3", "t5"])
def test_other_architectures_trace_without_graph_breaks(name):
    """OPT (mixed batches on its flattened MLP input), Phi-3 (fused projections), T5 (encoder-
    decoder): one adapter and a mixed batch trace into as many graphs as the base does."""
    from test_architectures import MODELS, inputs, two_adapters

    base, kwargs = MODELS[name]().eval(), inputs(name)
    expected = torch._dynamo.explain(base)(**kwargs).graph_break_count
    torch._dynamo.reset()
    model = two_adapters(copy.deepcopy(base))
    explanation = torch._dynamo.explain(model)(**kwargs)
    assert explanation.graph_break_count == expected, explanation.break_reasons
    torch._dynamo.reset()
    with lorakit.adapter_per_row(model, ["a", "b", None]):
        explanation = torch._dynamo.explain(model)(**kwargs)
    assert explanation.graph_break_count == expected, explanation.break_reasons
