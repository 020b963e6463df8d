"""The same behaviour on every device: CPU always, CUDA when the machine has one.

Each test builds a tiny Llama (from a config, nothing downloaded) on the CPU, moves a copy to the
device under test and checks what users rely on there: adapters are created on the base's device
and in its dtype, the adapted model starts equal to the base, merged equals unmerged, disabling
gives the base exactly, mixed-adapter batches equal each row run alone, QLoRA's codes are the
CPU's to the bit, a training step moves only the adapters, and a saved adapter loads anywhere.
On an accelerator the results are also compared with the CPU's for the same weights.
"""

from __future__ import annotations

import copy

import pytest
import torch

import lorakit
from lorakit import LoraConfig
from lorakit.quant import QuantizedWeight
from tiny_models import BATCH, LLAMA, SEQ, each_row_alone, tiny_llama

VOCAB = LLAMA["vocab_size"]
DEVICES = [
    "cpu",
    pytest.param(
        "cuda",
        marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device"),
    ),
]
# float32 on an accelerator may use TF32 or another summation order than the CPU's
TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 3e-2, torch.float16: 5e-3}


def _adapted(device, dtype=torch.float32, names=("default",), **config):
    """(base, adapted) on ``device`` in ``dtype``, every adapter's B random (so each computes)."""
    base = tiny_llama().to(device=device, dtype=dtype).eval()
    model = copy.deepcopy(base)
    for i, name in enumerate(names):
        cfg = LoraConfig(r=4 + 2 * i, alpha=8, target_modules="all-linear", **config)
        lorakit.apply_lora(model, cfg, adapter_name=name)
    with torch.no_grad():
        for _, layer in lorakit.lora_layers(model):
            for b in layer.lora_B.values():
                b.normal_(std=0.2)
    return base, model


def _ids(device, rows=BATCH):
    return torch.randint(2, VOCAB, (rows, SEQ), generator=torch.Generator().manual_seed(3)).to(
        device
    )


def _close(actual, expected, dtype):
    tol = TOLERANCE[dtype]
    torch.testing.assert_close(actual.float().cpu(), expected.float().cpu(), atol=tol, rtol=tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("device", DEVICES)
def test_adapters_live_on_the_base_device(device, dtype):
    base, model = _adapted(device, dtype)
    for _, layer in lorakit.lora_layers(model):
        assert layer.weight.dtype == dtype
        for p in (*layer.lora_A.values(), *layer.lora_B.values()):
            # float32 adapters on a half-precision base (stable training), on the base's device
            assert p.device.type == device and p.dtype == torch.float32
    ids = _ids(device)
    with torch.no_grad():
        with lorakit.disable_adapters(model):
            assert torch.equal(model(ids).logits, base(ids).logits)
        unmerged = model(ids).logits
        assert not torch.equal(unmerged, base(ids).logits)
        lorakit.merge(model)
        merged = model(ids).logits
    _close(merged, unmerged, dtype)


@pytest.mark.parametrize("device", DEVICES)
def test_starts_equal_to_the_base(device):
    base = tiny_llama().to(device).eval()
    model = lorakit.apply_lora(copy.deepcopy(base), LoraConfig(r=4, target_modules="all-linear"))
    ids = _ids(device)
    with torch.no_grad():
        assert torch.equal(model(ids).logits, base(ids).logits)


@pytest.mark.parametrize("device", DEVICES)
def test_same_output_as_on_the_cpu(device):
    _, on_cpu = _adapted("cpu")
    on_device = copy.deepcopy(on_cpu).to(device)
    with torch.no_grad():
        _close(on_device(_ids(device)).logits, on_cpu(_ids("cpu")).logits, torch.float32)


@pytest.mark.parametrize("adapters", [2, 6], ids=["grouped", "stacked"])
@pytest.mark.parametrize("device", DEVICES)
def test_mixed_batch_rows_equal_each_row_alone(device, adapters):
    names = [f"a{i}" for i in range(adapters)]
    _, model = _adapted(device, names=names)
    rows = [*names, None]
    ids = _ids(device, rows=len(rows))
    with torch.no_grad(), lorakit.adapter_per_row(model, rows):
        mixed = model(ids).logits
    with torch.no_grad():
        alone = each_row_alone(model, rows, lambda i: model(ids[i : i + 1]).logits)
    for i, row in enumerate(alone):
        _close(mixed[i : i + 1], row, torch.float32)


@pytest.mark.parametrize("device", DEVICES)
def test_a_training_step_moves_only_the_adapters(device):
    _, model = _adapted(device)
    model.train()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-2)
    ids = _ids(device)
    model(ids, labels=ids).loss.backward()
    optimizer.step()
    for name, p in model.named_parameters():
        moved = not torch.equal(p, before[name])
        assert moved == ("lora_" in name), name


@pytest.mark.parametrize("device", DEVICES)
def test_qlora_codes_and_outputs_match_the_cpu(device):
    base = tiny_llama().eval()
    on_cpu = lorakit.quantize(copy.deepcopy(base))
    on_device = lorakit.quantize(copy.deepcopy(base).to(device))
    weights_cpu = dict(lorakit.quant.quantized_weights(on_cpu))
    weights_dev = dict(lorakit.quant.quantized_weights(on_device))
    assert weights_cpu.keys() == weights_dev.keys() and weights_cpu
    for path, ours in weights_dev.items():
        assert isinstance(ours, QuantizedWeight) and ours.device.type == device
        assert torch.equal(ours.packed.cpu(), weights_cpu[path].packed), path
        assert torch.equal(ours.absmax.cpu(), weights_cpu[path].absmax), path
    config = LoraConfig(r=4, target_modules="all-linear")
    torch.manual_seed(5)
    lorakit.apply_lora(on_cpu, config)
    torch.manual_seed(5)
    lorakit.apply_lora(on_device, config)
    on_device.load_state_dict(on_cpu.state_dict())  # the same adapters, moved to the device
    with torch.no_grad():
        _close(on_device(_ids(device)).logits, on_cpu(_ids("cpu")).logits, torch.float32)


@pytest.mark.parametrize("device", DEVICES)
def test_an_adapter_saved_on_a_device_loads_on_the_cpu(device, tmp_path):
    base, model = _adapted(device)
    lorakit.save_adapter(model, tmp_path / "adapter")
    # the same base on the CPU: its fingerprint (shapes, dtype, weight hash) must match the file's
    fresh = lorakit.load_adapter(copy.deepcopy(base).cpu(), tmp_path / "adapter")
    theirs = list(lorakit.adapter_parameters(model, "default"))
    ours = list(lorakit.adapter_parameters(fresh, "default"))
    assert len(ours) == len(theirs) > 0
    for p, q in zip(ours, theirs):
        assert p.device.type == "cpu" and torch.equal(p, q.cpu())
    ids = _ids(device)
    with torch.no_grad():
        _close(fresh(ids.cpu()).logits, model(ids).logits, torch.float32)
