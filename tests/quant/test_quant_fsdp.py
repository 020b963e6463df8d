"""QLoRA under FSDP2: two real processes (gloo, CPU) shard a 4-bit base with ``fully_shard``.

Each rank builds the same tiny Llama (NF4, double quantization, LoRA on every linear), shards
each decoder block and the root, and reports what it holds and computes (``fsdp_worker.py``).
The reference is the same model in this process, unsharded. Tolerances: float32 defaults of
``assert_close``; the ranks run one thread and this process may run more, and the gradient is
averaged across ranks, so sums may round in another order.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("transformers")
dist = pytest.importorskip("torch.distributed")
if not dist.is_available() or not dist.is_gloo_available():
    pytest.skip("needs torch.distributed with gloo", allow_module_level=True)

import fsdp_worker as W  # noqa: E402  (after the skips: it imports transformers)
from quant_models import LLAMA  # noqa: E402

import lorakit  # noqa: E402

LINEARS = 7 * LLAMA["num_hidden_layers"]  # q, k, v, o, gate, up, down in each block


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    return W.run_ranks(tmp_path_factory.mktemp("fsdp"))


@pytest.fixture(scope="module")
def reference():
    """The unsharded model's logits, its state after the same SGD step on the whole batch."""
    torch.manual_seed(0)
    model = W.build()
    x = W.tokens()
    before = {k: v.clone() for k, v in W.quantized_parameters(model).items()}
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        logits = model(x).logits
    weight = model.get_submodule(W.PROBE).weight.dequantize()
    W.sgd_step(model, x)
    lora = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}
    stored = [
        t
        for _, w in lorakit.quant.quantized_weights(model)
        for t in (w.packed, w.absmax, w.nested_absmax)
    ]
    whole = sum(t.numel() * t.element_size() for t in stored)  # codes and scales, no codebooks
    return dict(
        logits=logits, lora=lora, codes=before, state_dict=state, weight=weight, whole=whole
    )


def test_each_rank_holds_half_of_the_quantized_base(ranks, reference):
    """Codes, absmax and nested absmax are sharded on dim 0: rank r holds its chunk, padded to
    the chunk size; that padding is at most one row (1 byte of codes, 4 of a float32 scale) per
    tensor, so each rank holds half of the whole plus at most 6 bytes per weight."""
    weights = sum(1 for name in ranks[0]["codes"] if name.endswith(".packed"))
    assert weights == LINEARS and ranks[0]["whole"] == reference["whole"]
    for r, rank in enumerate(ranks):
        assert rank["all_dtensors"], f"rank {r} holds an unsharded code or scale"
        assert rank["whole"] / 2 <= rank["held"] <= rank["whole"] / 2 + 6 * weights, (r, rank)
    assert sum(rank["local"] for rank in ranks) == ranks[0]["whole"]  # no element twice


def test_sharded_logits_equal_the_unsharded_model(ranks, reference):
    for rank in ranks:
        torch.testing.assert_close(rank["logits"], reference["logits"])


def test_one_step_on_half_the_batch_per_rank_equals_the_step_on_the_whole(ranks, reference):
    """The loss is a mean over equally many tokens per rank, so the averaged gradient is the
    gradient of the whole batch: each rank's adapters equal the single-process ones."""
    for rank in ranks:
        assert rank["lora"].keys() == reference["lora"].keys()
        assert all(".lora_" in name for name in rank["lora"])
        for name, value in rank["lora"].items():
            torch.testing.assert_close(value, reference["lora"][name], msg=name)


def test_gradient_checkpointing_gives_the_same_step(ranks, reference):
    for rank in ranks:
        for name, value in rank["checkpointed_lora"].items():
            torch.testing.assert_close(value, reference["lora"][name], msg=name)


def test_a_weight_decodes_when_gathered_and_says_why_not_when_sharded(ranks, reference):
    for rank in ranks:
        assert "sharded by FSDP" in rank["sharded_error"]
        assert "nf4 weight of shape (64, 64)" in rank["sharded_error"]
        assert torch.equal(rank["unsharded_weight"], reference["weight"])


def test_codes_are_unchanged_and_never_get_a_gradient(ranks, reference):
    for rank in ranks:
        assert rank["code_grads"] == []
        assert rank["codes"].keys() == reference["codes"].keys()
        for name, value in rank["codes"].items():
            assert value.dtype == torch.uint8 and torch.equal(value, reference["codes"][name]), name


def test_the_gathered_state_dict_is_the_bitsandbytes_layout(ranks, reference):
    frozen = {k: v for k, v in reference["state_dict"].items() if ".lora_" not in k}
    for rank in ranks:
        got = {k: v for k, v in rank["state_dict"].items() if ".lora_" not in k}
        assert list(got) == list(frozen)
        for key, value in got.items():
            assert value.dtype == frozen[key].dtype and torch.equal(value, frozen[key]), key


def test_a_bfloat16_mixed_precision_policy_leaves_the_weights_bit_exact(ranks, reference):
    """``MixedPrecisionPolicy(param_dtype=bfloat16)`` casts floating-point parameters for the
    all-gather; the codes and scales are stored as bytes, so the weight a layer decodes during
    the sharded forward is bitsandbytes' weight, bit for bit."""
    for rank in ranks:
        assert torch.equal(rank["mixed_weight"], reference["weight"])
        assert rank["mixed_logits"].dtype == torch.bfloat16
        assert torch.isfinite(rank["mixed_logits"]).all()
