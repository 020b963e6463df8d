"""Adapter arithmetic against float64 references computed from the adapters' own factors."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import lorakit
from lorakit.combine import combine

WEIGHTS = {"a": 0.7, "b": -0.3}


def two_adapter_model() -> nn.Module:
    net = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 8), nn.Embedding(10, 16))
    net = lorakit.apply_lora(net, lorakit.LoraConfig(r=4, target_modules=["0", "2", "3"]), "a")
    net = lorakit.apply_lora(net, lorakit.LoraConfig(r=2, alpha=5, target_modules=["0", "3"]), "b")
    for _, layer in lorakit.lora_layers(net):
        for n in layer.adapter_names:
            nn.init.normal_(layer.lora_A[n])
            nn.init.normal_(layer.lora_B[n])
    return net


def reference(layer, weights) -> torch.Tensor:
    """Σ w_i s_i B_i A_i in float64, from the factors (not from delta_weight)."""
    total = 0
    for n, w in weights.items():
        if n in layer.lora_A:
            a = layer.lora_A[n].detach().double().flatten(1)
            b = layer.lora_B[n].detach().double().flatten(1)
            delta = w * layer.record(n).scale * (b @ a)
            total = total + (delta.t() if layer.kind == "embedding" else delta)
    return total


def test_cat_is_exact_and_sums_ranks():
    net = two_adapter_model()
    combine(net, WEIGHTS, "cat", "ab")
    for path, layer in lorakit.lora_layers(net):
        ref = reference(layer, WEIGHTS).to(torch.float32)
        torch.testing.assert_close(layer.delta_weight("ab"), ref)
        expected_rank = 6 if path in ("0", "3") else 4
        assert layer.record("ab").rank == expected_rank
        assert layer.record("ab").scale == 1.0


def test_cat_output_equals_weighted_sum_of_adapted_outputs():
    net = two_adapter_model()
    combine(net, {"a": 1.0, "b": 1.0}, "cat", "ab")
    x = torch.randn(3, 16)

    def run(name):
        lorakit.set_adapter(net, name)
        return net[2](torch.relu(net[0](x)))

    lorakit.set_adapter(net, None)
    base_hidden = net[0](x)
    # first layer: the update is additive, so the combined output is base + both updates
    lorakit.set_adapter(net, "a")
    ha = net[0](x)
    lorakit.set_adapter(net, "b")
    hb = net[0](x)
    lorakit.set_adapter(net, "ab")
    torch.testing.assert_close(net[0](x), ha + hb - base_hidden)
    assert run("ab").shape == (3, 8)


def test_svd_matches_float64_truncation():
    net = two_adapter_model()
    combine(net, WEIGHTS, "svd", "s", rank=2)
    for _, layer in lorakit.lora_layers(net):
        ref = reference(layer, WEIGHTS)
        if layer.kind == "embedding":
            ref = ref.t()  # factorised in (out, in) = (dim, V) space
        u, s, vh = torch.linalg.svd(ref, full_matrices=False)
        best = (u[:, :2] * s[:2]) @ vh[:2]
        got = layer.delta_weight("s").double()
        got = got.t() if layer.kind == "embedding" else got
        # float32 SVD of a float32 sum against float64: agreement to float32 precision
        torch.testing.assert_close(got, best, rtol=1e-4, atol=1e-4)
        assert layer.record("s").rank == 2


def test_linear_of_one_adapter_is_exact_and_needs_one_rank():
    net = two_adapter_model()
    combine(net, {"a": 0.5}, "linear", "halved")
    for _, layer in lorakit.lora_layers(net):
        torch.testing.assert_close(
            layer.delta_weight("halved"), reference(layer, {"a": 0.5}).to(torch.float32)
        )
    with pytest.raises(lorakit.ConfigError, match="one rank"):
        combine(net, {"a": 0.5, "b": 0.5}, "linear", "mix")
    with pytest.raises(lorakit.ConfigError, match="non-negative"):
        combine(net, {"a": -1.0}, "linear", "neg")


def test_ties_and_dare_at_full_density_reduce_to_svd():
    net = two_adapter_model()
    same = {"a": 0.7, "b": 0.4}
    combine(net, same, "svd", "s", rank=3)
    combine(net, same, "dare_linear", "d", rank=3, density=1.0)
    for _, layer in lorakit.lora_layers(net):
        torch.testing.assert_close(layer.delta_weight("d"), layer.delta_weight("s"))


def test_ties_keeps_agreeing_entries_only():
    net = nn.Sequential(nn.Linear(2, 2, bias=False))
    net = lorakit.apply_lora(net, lorakit.LoraConfig(r=2, alpha=2, target_modules=["0"]), "a")
    net = lorakit.apply_lora(net, lorakit.LoraConfig(r=2, alpha=2, target_modules=["0"]), "b")
    layer = net[0]
    with torch.no_grad():  # ΔW = B A with A = identity, scale 1: ΔW = B
        for n, b in (("a", [[1.0, -2.0], [3.0, 0.0]]), ("b", [[1.0, 4.0], [-1.0, 0.0]])):
            layer.lora_A[n].copy_(torch.eye(2))
            layer.lora_B[n].copy_(torch.tensor(b))
    combine(net, {"a": 1.0, "b": 1.0}, "ties", "t", density=1.0, rank=2)
    # signs: sum = [[2, 2], [2, 0]] -> mean of agreeing entries
    expected = torch.tensor([[1.0, 4.0], [3.0, 0.0]])
    torch.testing.assert_close(layer.delta_weight("t"), expected, rtol=1e-5, atol=1e-5)


def test_dare_is_seeded():
    net = two_adapter_model()
    combine(net, WEIGHTS, "dare_ties", "x", density=0.5, seed=3)
    combine(net, WEIGHTS, "dare_ties", "y", density=0.5, seed=3)
    combine(net, WEIGHTS, "dare_ties", "z", density=0.5, seed=4)
    layer = net[0]
    torch.testing.assert_close(layer.delta_weight("x"), layer.delta_weight("y"))
    assert not torch.allclose(layer.delta_weight("x"), layer.delta_weight("z"))


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(weights={"nope": 1.0}), "unknown adapter"),
        (dict(weights={"a": 1.0}, method="avg"), "method='avg'"),
        (dict(weights={"a": 1.0}, name="a"), "already exists"),
        (dict(weights={"a": 1.0}, method="ties", density=0.0), "density"),
        (dict(weights={"a": float("nan")}), "finite"),
    ],
)
def test_bad_requests_name_the_problem(kwargs, message):
    net = two_adapter_model()
    kwargs.setdefault("name", "new")
    with pytest.raises(lorakit.LorakitError, match=message):
        combine(net, **kwargs)
    assert lorakit.list_adapters(net) == ["a", "b"]


def test_combined_adapter_is_listed_with_a_config():
    net = two_adapter_model()
    combine(net, WEIGHTS, "cat", "ab")
    config = lorakit.adapter_configs(net)["ab"]
    assert set(config.target_modules) == {"0", "2", "3"}
    plan = lorakit.plan(
        nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 8), nn.Embedding(10, 16)), config
    )
    assert {row.path: row.r for row in plan.rows} == {"0": 6, "2": 4, "3": 6}


def model_state(net: nn.Module):
    return (
        lorakit.list_adapters(net),
        [(p, type(m)) for p, m in net.named_modules()],
        {k: v.clone() for k, v in net.state_dict().items()},
    )


def assert_same_state(net: nn.Module, before) -> None:
    adapters, types, state = model_state(net)
    assert adapters == before[0] and types == before[1] and list(state) == list(before[2])
    assert all(torch.equal(v, before[2][k]) for k, v in state.items())


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(weights=["a", "b"]), r"weights=\['a', 'b'\]: expected a mapping .* got a list"),
        (dict(weights=[("a", 0.5)]), r"expected a mapping \{adapter name: weight\}"),
        (dict(weights="a"), "expected a mapping .* got a str"),
        (dict(weights=None), "expected a mapping .* got a NoneType"),
        (dict(weights={"a": "0.5"}), r"weight of 'a'='0\.5': expected a finite number"),
        (dict(weights={"a": 1.0}, method=["cat"]), r"method=\['cat'\]"),
        (dict(weights={"a": 1.0}, method="ties", density="half"), "density='half'"),
        (dict(weights={"a": 1.0}, method="ties", density=None), "density=None"),
        (dict(weights={"a": 1.0}, method="svd", rank="4"), "rank='4'"),
        (dict(weights={"a": 1.0}, method="svd", rank=True), "rank=True"),
        (dict(weights={"a": 1.0}, method="dare_ties", density=0.5, seed="x"), "seed='x'"),
        (dict(weights={"a": 1.0}, method="dare_ties", density=0.5, seed=2**64), "seed=1844"),
        (dict(weights={"a": 1.0}, seed=1.5), "seed=1.5"),
    ],
)
def test_wrong_argument_types_are_config_errors_and_change_nothing(kwargs, message):
    net = two_adapter_model()
    before = model_state(net)
    with pytest.raises(lorakit.ConfigError, match=message):
        combine(net, name="new", **kwargs)
    assert_same_state(net, before)


def test_a_model_that_is_not_a_module_is_named():
    with pytest.raises(lorakit.ConfigError, match="model: expected a torch.nn.Module.*dict"):
        combine({"a": 1}, {"a": 1.0})


def test_a_layer_that_cannot_take_the_adapter_leaves_none_with_it(monkeypatch):
    """The combined adapter goes into every layer or none (here the second layer's allocation
    fails, as it would on a full device)."""
    net = two_adapter_model()
    before = model_state(net)

    def out_of_memory(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(net[2], "add_adapter", out_of_memory)
    with pytest.raises(torch.OutOfMemoryError):
        combine(net, WEIGHTS, "cat", "ab")
    assert_same_state(net, before)
    assert all("ab" not in layer.lora_A for _, layer in lorakit.lora_layers(net))
