"""``load_quantized`` on a damaged checkpoint: a ``QuantError`` naming the entry, model untouched.

The checkpoints are written by bitsandbytes' ``Linear4bit`` (the layout transformers publishes),
then one entry of the LAST linear layer is damaged, so a loader that converts layer by layer
would already have replaced the first ones when it meets the damage. Every case must leave the
model exactly as it was: the same module types at the same paths, the same state dict.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
from torch import nn

from lorakit.errors import LorakitError, QuantError
from lorakit.quant import QuantLinear, load_quantized

bnb = pytest.importorskip("bitsandbytes")

IN, HIDDEN, OUT = 70, 130, 33
LAST = "2.weight"  # the entry every case damages belongs to the last quantized layer
STATE = {
    "nf4": f"{LAST}.quant_state.bitsandbytes__nf4",
    "fp4": f"{LAST}.quant_state.bitsandbytes__fp4",
}


def float_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(IN, HIDDEN), nn.ReLU(), nn.Linear(HIDDEN, OUT), nn.LayerNorm(OUT)
    )


def bnb_checkpoint(quant_type: str, double_quant: bool) -> dict[str, torch.Tensor]:
    """The state dict bitsandbytes writes for ``float_model()`` with its linear layers 4-bit."""
    source = float_model()
    state = {}
    for path, module in source.named_children():
        if isinstance(module, nn.Linear):
            layer = bnb.nn.Linear4bit(
                module.in_features,
                module.out_features,
                compute_dtype=torch.float32,
                compress_statistics=double_quant,
                quant_type=quant_type,
            )
            layer.load_state_dict(module.state_dict())
            module = layer.to("cpu")  # .to() quantizes
        state.update({f"{path}.{k}": v for k, v in module.state_dict().items()})
    return state


def fields_of(state: dict, quant_type: str) -> dict:
    return json.loads(bytes(state[STATE[quant_type]].tolist()).decode("utf-8"))


def with_fields(state: dict, kind: str, /, **changes) -> dict:
    """The checkpoint with the last layer's JSON quant state changed (None deletes a field)."""
    fields = {**fields_of(state, kind), **changes}
    fields = {k: v for k, v in fields.items() if v is not None}
    return with_state_bytes(state, kind, json.dumps(fields).encode("utf-8"))


def with_state_bytes(state: dict, quant_type: str, raw: bytes) -> dict:
    return {**state, STATE[quant_type]: torch.tensor(list(raw), dtype=torch.uint8)}


def replaced(key: str, fn):
    return lambda state: {**state, key: fn(state[key])}


def without(key: str):
    return lambda state: {k: v for k, v in state.items() if k != key}


def nan_at_0(t: torch.Tensor, value=math.nan) -> torch.Tensor:
    t = t.clone()
    t.view(-1)[0] = value
    return t


# (id, quant type, double quant, damage, words the message must hold)
CASES = [
    # the block scales
    ("absmax-short", "nf4", True, replaced(f"{LAST}.absmax", lambda t: t[:-1]), "absmax"),
    ("absmax-empty", "nf4", True, replaced(f"{LAST}.absmax", lambda t: t[:0]), "absmax"),
    ("absmax-float16", "nf4", True, replaced(f"{LAST}.absmax", lambda t: t.half()), "absmax"),
    (
        "absmax-float-for-codes",
        "nf4",
        True,
        replaced(f"{LAST}.absmax", lambda t: t.float()),
        "absmax",
    ),
    (
        "absmax-not-a-tensor",
        "nf4",
        True,
        replaced(f"{LAST}.absmax", lambda t: t.tolist()),
        "absmax",
    ),
    ("absmax-nan", "fp4", False, replaced(f"{LAST}.absmax", nan_at_0), "absmax"),
    (
        "absmax-inf",
        "fp4",
        False,
        replaced(f"{LAST}.absmax", lambda t: nan_at_0(t, math.inf)),
        "absmax",
    ),
    ("absmax-missing", "nf4", True, without(f"{LAST}.absmax"), "absmax"),
    (
        "nested-absmax-nan",
        "nf4",
        True,
        replaced(f"{LAST}.nested_absmax", nan_at_0),
        "nested_absmax",
    ),
    (
        "nested-absmax-inf",
        "nf4",
        True,
        replaced(f"{LAST}.nested_absmax", lambda t: nan_at_0(t, -math.inf)),
        "nested_absmax",
    ),
    (
        "nested-absmax-short",
        "nf4",
        True,
        replaced(f"{LAST}.nested_absmax", lambda t: t[:0]),
        "nested_absmax",
    ),
    ("nested-absmax-missing", "nf4", True, without(f"{LAST}.nested_absmax"), "nested_absmax"),
    (
        "nested-quant-map-missing",
        "nf4",
        True,
        without(f"{LAST}.nested_quant_map"),
        "nested_quant_map",
    ),
    (
        "nested-quant-map-nan",
        "nf4",
        True,
        replaced(f"{LAST}.nested_quant_map", nan_at_0),
        "nested_quant_map",
    ),
    ("quant-map-short", "nf4", True, replaced(f"{LAST}.quant_map", lambda t: t[:-1]), "quant_map"),
    ("quant-map-nan", "nf4", True, replaced(f"{LAST}.quant_map", nan_at_0), "quant_map"),
    ("quant-map-missing", "nf4", True, without(f"{LAST}.quant_map"), "quant_map"),
    # the packed codes
    ("codes-short", "nf4", True, replaced(LAST, lambda t: t[:-1]), LAST),
    ("codes-not-a-tensor", "nf4", True, replaced(LAST, lambda t: "weights"), LAST),
    ("codes-missing", "nf4", True, without(LAST), LAST),
    # the JSON quant state
    (
        "state-garbage",
        "nf4",
        True,
        lambda s: with_state_bytes(s, "nf4", b"{not json"),
        "quant_state",
    ),
    (
        "state-not-utf8",
        "nf4",
        True,
        lambda s: with_state_bytes(s, "nf4", b"\xff\xfe"),
        "quant_state",
    ),
    ("state-a-list", "nf4", True, lambda s: with_state_bytes(s, "nf4", b"[1, 2]"), "quant_state"),
    (
        "state-float-tensor",
        "nf4",
        True,
        replaced(STATE["nf4"], lambda t: t.float() + 0.5),
        "quant_state",
    ),
    ("state-not-a-tensor", "nf4", True, replaced(STATE["nf4"], lambda t: "{}"), "quant_state"),
    (
        "state-two-entries",
        "nf4",
        True,
        lambda s: {**s, STATE["fp4"]: s[STATE["nf4"]]},
        "quant_state",
    ),
    (
        "state-other-type-than-key",
        "nf4",
        True,
        lambda s: with_fields(s, "nf4", quant_type="fp4"),
        "fp4",
    ),
    ("dtype-Tensor", "nf4", True, lambda s: with_fields(s, "nf4", dtype="Tensor"), "dtype"),
    ("dtype-int8", "nf4", True, lambda s: with_fields(s, "nf4", dtype="int8"), "dtype"),
    ("dtype-unknown", "nf4", True, lambda s: with_fields(s, "nf4", dtype="float5"), "dtype"),
    ("dtype-missing", "nf4", True, lambda s: with_fields(s, "nf4", dtype=None), "dtype"),
    ("quant-type-unknown", "nf4", True, lambda s: with_fields(s, "nf4", quant_type="nf5"), "nf5"),
    ("blocksize-0", "nf4", True, lambda s: with_fields(s, "nf4", blocksize=0), "block"),
    ("blocksize-7", "nf4", True, lambda s: with_fields(s, "nf4", blocksize=7), "block"),
    (
        "blocksize-text",
        "nf4",
        True,
        lambda s: with_fields(s, "nf4", blocksize="sixty"),
        "blocksize",
    ),
    (
        "blocksize-missing",
        "nf4",
        True,
        lambda s: with_fields(s, "nf4", blocksize=None),
        "blocksize",
    ),
    ("shape-other", "nf4", True, lambda s: with_fields(s, "nf4", shape=[OUT + 1, HIDDEN]), "shape"),
    (
        "shape-negative",
        "nf4",
        True,
        lambda s: with_fields(s, "nf4", shape=[-OUT, -HIDDEN]),
        "shape",
    ),
    ("shape-text", "nf4", True, lambda s: with_fields(s, "nf4", shape="33x130"), "shape"),
    (
        "shape-three-dims",
        "nf4",
        True,
        lambda s: with_fields(s, "nf4", shape=[OUT, HIDDEN, 1]),
        "shape",
    ),
    ("shape-missing", "nf4", True, lambda s: with_fields(s, "nf4", shape=None), "shape"),
    (
        "nested-offset-nan",
        "nf4",
        True,
        lambda s: with_fields(s, "nf4", nested_offset=math.nan),
        "nested_offset",
    ),
    (
        "nested-offset-text",
        "nf4",
        True,
        lambda s: with_fields(s, "nf4", nested_offset="x"),
        "nested_offset",
    ),
    (
        "nested-blocksize-128",
        "nf4",
        True,
        lambda s: with_fields(s, "nf4", nested_blocksize=128),
        "nested",
    ),
    # the rest of the state dict
    ("extra-key-strict", "nf4", True, lambda s: {**s, "4.weight": torch.zeros(3)}, "4.weight"),
    (
        "extra-weight-entry-strict",
        "nf4",
        True,
        lambda s: {**s, f"{LAST}.scale": torch.zeros(3)},
        f"{LAST}.scale",
    ),
    ("missing-key-strict", "nf4", True, without("3.bias"), "3.bias"),
    ("bias-wrong-shape", "nf4", True, replaced("2.bias", lambda t: t[:-1]), "2.bias"),
    ("norm-wrong-shape", "nf4", True, replaced("3.weight", lambda t: t[:-1]), "3.weight"),
    ("norm-not-a-tensor", "nf4", True, replaced("3.weight", lambda t: t.tolist()), "3.weight"),
]


def snapshot(model: nn.Module):
    types = [(path, type(module)) for path, module in model.named_modules()]
    state = {k: (v.dtype, v.clone()) for k, v in model.state_dict().items()}
    grads = {k: p.requires_grad for k, p in model.named_parameters()}
    return types, state, grads


def assert_unchanged(model: nn.Module, before) -> None:
    types, state, grads = snapshot(model)
    assert types == before[0]
    assert list(state) == list(before[1])
    for key, (dtype, value) in state.items():
        assert dtype == before[1][key][0] and torch.equal(value, before[1][key][1]), key
    assert grads == before[2]


@pytest.mark.parametrize(
    "quant_type, double_quant, damage, words", [c[1:] for c in CASES], ids=[c[0] for c in CASES]
)
def test_a_damaged_checkpoint_is_refused_and_changes_nothing(
    quant_type, double_quant, damage, words
):
    state = damage(bnb_checkpoint(quant_type, double_quant))
    model = float_model()
    before = snapshot(model)
    with pytest.raises(QuantError) as caught:
        load_quantized(model, state)
    message = str(caught.value)
    assert words in message, message
    assert_unchanged(model, before)


@pytest.mark.parametrize("quant_type, double_quant", [("nf4", True), ("fp4", False)])
def test_the_intact_checkpoint_loads(quant_type, double_quant):
    """The checkpoint the cases damage is good: each damage alone is what is refused."""
    model = float_model()
    load_quantized(model, bnb_checkpoint(quant_type, double_quant))
    assert isinstance(model[0], QuantLinear) and isinstance(model[2], QuantLinear)


def test_a_non_strict_load_still_refuses_bad_values_and_changes_nothing():
    state = bnb_checkpoint("nf4", True)
    state = {k: v for k, v in state.items() if k != "3.bias"}  # allowed without strict
    state[f"{LAST}.absmax"] = state[f"{LAST}.absmax"][:-1]
    model = float_model()
    before = snapshot(model)
    with pytest.raises(QuantError, match="absmax"):
        load_quantized(model, state, strict=False)
    assert_unchanged(model, before)


def test_a_non_strict_load_accepts_missing_and_extra_keys():
    state = bnb_checkpoint("nf4", True)
    state = {k: v for k, v in state.items() if k != "3.bias"}
    state["4.weight"] = torch.zeros(3)
    model = float_model()
    result = load_quantized(model, state, strict=False)
    assert result.missing_keys == ["3.bias"] and result.unexpected_keys == ["4.weight"]
    assert isinstance(model[2], QuantLinear)


def test_errors_are_lorakit_errors():
    assert issubclass(QuantError, LorakitError)
