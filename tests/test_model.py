"""The model-level API: several adapters, switching, deleting, unloading, per-row adapters in a
mixed batch, saved modules, parameter counts, errors, and what ``import lorakit`` loads.

References are built by hand: an adapter's output is compared with a plain copy of the base whose
weights have ``s · B A`` added in float64, never with another lorakit code path.
"""

from __future__ import annotations

import copy
import gc
import os
import subprocess
import sys
import weakref
from pathlib import Path

import pytest
import torch
from torch import nn

import lorakit
from lorakit import AdapterError, LoraConfig, MergeError
from lorakit.layers import LoraLayer
from tiny_models import LLAMA, each_row_alone, tiny_llama

VOCAB, DIM, CLASSES = 11, 8, 3
ROWS, TOKENS = 5, 4
SGD_LR = 0.1
ADAPTER_STD = 0.3
CONFIG_A = LoraConfig(r=2, alpha=4, target_modules=("q", "v"))
CONFIG_B = LoraConfig(r=4, alpha=2, target_modules=("emb", "v", "mlp"))
TARGETS = {"a": ("q", "v"), "b": ("emb", "v", "mlp")}
MIXED_NAMES = ["a", None, "b", "a", "b"]
BAD_NAMES = ["../x", "a.b", "", "a b", "-x", "x/y", 3, None]
# A 4096 x 4096 projection with r = 8: 2 · 8 · 4096 adapter parameters.
BIG, BIG_R = 4096, 8
BIG_LINE = "trainable 65,536 / 16,842,752 (0.39%)"
BIG_LINE_WITH_BIAS = "trainable 65,536 / 16,846,848 (0.39%)"
OPTIONAL_BACKENDS = ("transformers", "peft", "bitsandbytes", "triton")


class TinyNet(nn.Module):
    """An embedding, an attention-like product of two projections, an MLP and a classifier head."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(VOCAB, DIM)
        self.q = nn.Linear(DIM, DIM)
        self.v = nn.Linear(DIM, DIM)
        self.mlp = nn.Linear(DIM, DIM)
        self.head = nn.Linear(DIM, CLASSES)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.emb(ids)  # (batch, tokens, dim)
        h = h + torch.tanh(self.q(h)) * self.v(h)
        h = h + torch.relu(self.mlp(h))
        return self.head(h)  # (batch, tokens, classes)


def ids(rows: int = ROWS) -> torch.Tensor:
    return torch.randint(0, VOCAB, (rows, TOKENS))


def randomise(model: nn.Module) -> None:
    with torch.no_grad():
        for p in lorakit.adapter_parameters(model):
            p.copy_(torch.randn_like(p) * ADAPTER_STD)


def two_adapters(originals: dict | None = None) -> tuple[nn.Module, nn.Module]:
    """(an untouched copy of the base, the base with adapters "a" and "b", randomised).

    ``originals``, if given, receives the base's own child modules before they are wrapped.
    """
    base = TinyNet()
    reference = copy.deepcopy(base)
    if originals is not None:
        originals.update(base.named_children())
    model = lorakit.apply_lora(base, CONFIG_A, "a")
    lorakit.apply_lora(model, CONFIG_B, "b")
    randomise(model)
    return reference, model


def hand_merged(reference: nn.Module, model: nn.Module, name: str) -> nn.Module:
    """A plain copy of the base with adapter ``name``'s ``s · B A`` added to each weight."""
    plain = copy.deepcopy(reference).double()
    config = lorakit.adapter_configs(model)[name]
    for path in TARGETS[name]:
        layer = model.get_submodule(path)
        a = layer.lora_A[name].detach().double()
        b = layer.lora_B[name].detach().double()
        delta = config.alpha / config.r * (b @ a)  # (out, in); an embedding's (dim, V)
        module = plain.get_submodule(path)
        with torch.no_grad():
            module.weight += delta.t() if isinstance(module, nn.Embedding) else delta
    return plain


def run_hand(plain: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The float64 hand-merged copy's output, as float32 for comparison."""
    return plain(x).float()


def lorakit_modules(model: nn.Module) -> list[str]:
    return [p for p, m in model.named_modules() if type(m).__module__.startswith("lorakit")]


# -- several adapters ------------------------------------------------------------------------------
def test_several_adapters_each_compute_their_own():
    reference, model = two_adapters()
    assert lorakit.list_adapters(model) == ["a", "b"]
    assert lorakit.adapter_configs(model) == {"a": CONFIG_A, "b": CONFIG_B}
    assert lorakit.active_adapter(model) == "b"  # the newest adapter is active
    assert model.q.adapter_names == ["a"] and model.v.adapter_names == ["a", "b"]
    assert model.mlp.adapter_names == ["b"] and model.emb.adapter_names == ["b"]
    x = ids()
    for name in ("a", "b", "a"):
        lorakit.set_adapter(model, name)
        assert lorakit.active_adapter(model) == name
        torch.testing.assert_close(model(x), run_hand(hand_merged(reference, model, name), x))
    lorakit.set_adapter(model, None)
    assert lorakit.active_adapter(model) is None
    assert torch.equal(model(x), reference(x))


def test_adapter_parameters_by_name():
    _, model = two_adapters()
    a = list(lorakit.adapter_parameters(model, "a"))
    b = list(lorakit.adapter_parameters(model, "b"))
    assert sum(p.numel() for p in a) == 2 * 2 * (DIM + DIM)
    assert sum(p.numel() for p in b) == 4 * (VOCAB + DIM) + 2 * 4 * (DIM + DIM)
    assert {id(p) for p in a}.isdisjoint(id(p) for p in b)
    assert len(list(lorakit.adapter_parameters(model))) == len(a) + len(b)


def test_delete_adapter_frees_it_and_unwraps_layers_left_without_adapters():
    originals = {}
    reference, model = two_adapters(originals)
    original_mlp, original_emb = originals["mlp"], originals["emb"]
    freed = weakref.ref(model.mlp.lora_A["b"])
    x = ids()
    lorakit.set_adapter(model, "a")
    with_a = model(x)
    lorakit.set_adapter(model, "b")

    assert lorakit.delete_adapter(model, "b") is model
    gc.collect()
    assert freed() is None
    assert lorakit.list_adapters(model) == ["a"]
    assert model.mlp is original_mlp and type(model.mlp) is nn.Linear
    assert model.emb is original_emb and type(model.emb) is nn.Embedding
    assert isinstance(model.v, LoraLayer) and model.v.adapter_names == ["a"]
    assert not [k for k in model.state_dict() if k.endswith(".b")]
    assert list(lorakit.adapter_parameters(model, "b")) == []
    assert lorakit.active_adapter(model) is None  # the deleted adapter was the active one
    assert torch.equal(model(x), reference(x))
    lorakit.set_adapter(model, "a")
    assert torch.equal(model(x), with_a)

    assert lorakit.delete_adapter(model, "a") is model
    assert lorakit_modules(model) == []
    assert lorakit.list_adapters(model) == []
    assert sorted(model.state_dict()) == sorted(reference.state_dict())
    assert torch.equal(model(x), reference(x))


def test_delete_a_merged_adapter_is_refused():
    _, model = two_adapters()
    lorakit.set_adapter(model, "a")
    lorakit.merge(model)
    with pytest.raises(MergeError, match="unmerge"):
        lorakit.delete_adapter(model, "a")
    assert lorakit.list_adapters(model) == ["a", "b"]
    assert model.q.adapter_names == ["a"]


def test_delete_adapter_on_a_bare_layer_gives_the_layer_back():
    base = nn.Linear(DIM, DIM)
    layer = lorakit.apply_lora(base, LoraConfig(r=2))
    assert lorakit.delete_adapter(layer, "default") is base
    assert lorakit_modules(base) == []


@pytest.mark.parametrize("merged", [False, True], ids=["unmerged", "merged"])
def test_remove_lora_gives_back_the_base(merged):
    originals = {}
    reference, model = two_adapters(originals)
    if merged:
        lorakit.merge(model)
    x = ids()
    plain = lorakit.remove_lora(model)
    assert plain is model
    assert lorakit_modules(plain) == []
    assert lorakit.list_adapters(plain) == []
    for name, module in originals.items():
        assert plain.get_submodule(name) is module
    assert sorted(plain.state_dict()) == sorted(reference.state_dict())
    if merged:  # unmerging subtracts in float32: equal up to rounding
        for key, value in reference.state_dict().items():
            torch.testing.assert_close(plain.state_dict()[key], value)
        torch.testing.assert_close(plain(x), reference(x))
    else:
        for key, value in reference.state_dict().items():
            assert torch.equal(plain.state_dict()[key], value)
        assert torch.equal(plain(x), reference(x))


# -- a mixed batch ---------------------------------------------------------------------------------
@pytest.fixture(params=["grouped", "stacked"])
def mixed_path(request, monkeypatch):
    """Run a mixed-batch test through both paths: rows grouped per adapter, and the padded stack."""
    if request.param == "stacked":
        monkeypatch.setattr(lorakit.layers.LoraLayer, "GROUPED_MAX_ADAPTERS", 0)
    return request.param


def test_adapter_per_row_matches_running_each_row_alone(mixed_path):
    reference, model = two_adapters()
    x = ids()
    with lorakit.adapter_per_row(model, MIXED_NAMES) as inside:
        assert inside is model
        mixed = model(x)
    for i, name in enumerate(MIXED_NAMES):
        lorakit.set_adapter(model, name)
        torch.testing.assert_close(mixed[i : i + 1], model(x[i : i + 1]))
        if name is None:  # a row alone is a smaller GEMM: another kernel may sum differently
            torch.testing.assert_close(mixed[i], reference(x[i : i + 1])[0])
    lorakit.set_adapter(model, "a")
    torch.testing.assert_close(model(x), run_hand(hand_merged(reference, model, "a"), x))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_half_precision_mixed_batch_matches_each_row_alone(mixed_path, dtype):
    """float32 adapters on a half-precision base: each row's sum is formed in float32 and rounded
    once into the base's dtype, as the one-adapter path does. The two differ only in float32
    summation order, which flips a half-precision rounding now and then; through the layers such
    a flip moves logits by a few units in the last place of their scale, the bound used here."""
    model = lorakit.apply_lora(tiny_llama().to(dtype), LoraConfig(r=4, target_modules="all-linear"))
    lorakit.apply_lora(model, LoraConfig(r=2, alpha=3, target_modules="all-linear"), "b")
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in lorakit.adapter_parameters(model):
            p.copy_(torch.randn(p.shape, generator=gen) * 0.05)
    x = torch.randint(0, LLAMA["vocab_size"], (3, 9), generator=gen)
    names = ["default", None, "b"]
    with torch.no_grad(), lorakit.adapter_per_row(model, names):
        mixed = model(x).logits
    assert mixed.dtype == dtype
    bound = 4 * torch.finfo(dtype).eps * mixed.abs().max().item()
    with torch.no_grad():
        alone = each_row_alone(model, names, lambda i: model(x[i : i + 1]).logits)
    for i, row in enumerate(alone):
        torch.testing.assert_close(mixed[i : i + 1], row, rtol=0, atol=bound)


def test_adapter_per_row_gradients_come_from_each_adapters_own_rows(mixed_path):
    _, model = two_adapters()
    for p in lorakit.adapter_parameters(model):
        p.requires_grad_(True)
    x = ids()
    with lorakit.adapter_per_row(model, MIXED_NAMES):
        model(x).square().sum().backward()
    mixed = {id(p): p.grad.clone() for p in lorakit.adapter_parameters(model)}
    for name in ("a", "b"):
        rows = [i for i, n in enumerate(MIXED_NAMES) if n == name]
        model.zero_grad()
        lorakit.set_adapter(model, name)
        model(x[rows]).square().sum().backward()
        for p in lorakit.adapter_parameters(model, name):
            torch.testing.assert_close(mixed[id(p)], p.grad)
    for p in model.parameters():
        if not any(p is q for q in lorakit.adapter_parameters(model)):
            assert not p.requires_grad and p.grad is None


def test_mixed_blocks_follow_changed_adapters_and_rows(mixed_path):
    """Inference caches (the stack kept between blocks, each row's pick in one) never go stale."""
    _, model = two_adapters()
    x = ids()

    def check(names):
        with torch.no_grad(), lorakit.adapter_per_row(model, names):
            # the first call gathers each row's pick, the second keeps it, the third reuses it
            mixed, again, third = model(x), model(x), model(x)
        assert torch.equal(mixed, again) and torch.equal(mixed, third)
        for i, name in enumerate(names):
            lorakit.set_adapter(model, name)
            with torch.no_grad():
                torch.testing.assert_close(mixed[i : i + 1], model(x[i : i + 1]))

    check(MIXED_NAMES)
    check(list(reversed(MIXED_NAMES)))  # other rows, same adapters
    with torch.no_grad():
        for _, layer in lorakit.lora_layers(model):
            if "a" in layer.lora_B:
                layer.lora_B["a"].add_(0.5)  # changed in place, as an optimizer step does
    check(MIXED_NAMES)
    lorakit.delete_adapter(model, "b")
    check([n if n != "b" else None for n in MIXED_NAMES])


def test_adapter_per_row_all_base_rows_equal_the_base():
    reference, model = two_adapters()
    x = ids()
    with lorakit.adapter_per_row(model, [None] * ROWS):
        assert torch.equal(model(x), reference(x))


def test_adapter_per_row_checks_the_number_of_rows():
    _, model = two_adapters()
    with pytest.raises(AdapterError, match="rows"), lorakit.adapter_per_row(model, ["a", "b"]):
        model(ids())


def test_adapter_per_row_checks_the_rows_of_a_two_dimensional_batch():
    """A layer may see rows flattened with their tokens (OPT's MLP), so a 2-D batch of 4 rows
    would pass a per-layer check with 2 names; the model's own input is checked first."""
    model = nn.Sequential(nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 4))
    for name in ("a", "b"):
        lorakit.apply_lora(model, LoraConfig(r=2, target_modules=["0", "2"]), name)
    with lorakit.adapter_per_row(model, ["a", "b"]):
        with pytest.raises(AdapterError, match=r"2 names but the batch has 4 rows \(input of sh"):
            model(torch.randn(4, 16))
        assert model(torch.randn(2, 16)).shape == (2, 4)
    model(torch.randn(4, 16))  # the check goes with the block


def test_adapter_per_row_ends_cleanly_after_an_error():
    _, model = two_adapters()
    x = ids()
    expected = model(x)
    with pytest.raises(KeyError), lorakit.adapter_per_row(model, MIXED_NAMES):
        raise KeyError("inside")
    assert torch.equal(model(x), expected)


# -- errors ----------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "call",
    [
        lambda m: lorakit.set_adapter(m, "nope"),
        lambda m: lorakit.delete_adapter(m, "nope"),
        lambda m: lorakit.merge(m, "nope"),
        lambda m: lorakit.merge_and_unload(m, "nope"),
        lambda m: lorakit.adapter_per_row(m, ["a", "nope"]).__enter__(),
    ],
    ids=["set_adapter", "delete_adapter", "merge", "merge_and_unload", "adapter_per_row"],
)
def test_unknown_adapter_names_are_errors(call):
    _, model = two_adapters()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(AdapterError, match="nope") as info:
        call(model)
    assert isinstance(info.value, ValueError)
    assert "adapters: a, b" in str(info.value)  # lists the adapters there are
    assert lorakit.active_adapter(model) == "b"
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key


@pytest.mark.parametrize("name", BAD_NAMES, ids=repr)
def test_invalid_adapter_names_are_refused_before_any_change(name):
    base = TinyNet()
    with pytest.raises(AdapterError, match="not allowed"):
        lorakit.apply_lora(base, CONFIG_A, name)
    assert lorakit_modules(base) == []


def test_a_duplicate_adapter_name_is_refused_before_any_change():
    _, model = two_adapters()
    keys = sorted(model.state_dict())
    with pytest.raises(AdapterError, match="'a'"):
        lorakit.apply_lora(model, CONFIG_B, "a")
    assert sorted(model.state_dict()) == keys
    assert model.mlp.adapter_names == ["b"]


def test_disable_adapters_while_merged_is_refused():
    _, model = two_adapters()
    lorakit.merge(model)
    with pytest.raises(MergeError, match="unmerge"), lorakit.disable_adapters(model):
        pass  # pragma: no cover - never entered
    lorakit.unmerge(model)
    with lorakit.disable_adapters(model):
        pass


def test_switching_adapters_while_merged_is_refused_and_changes_nothing():
    _, model = two_adapters()
    lorakit.set_adapter(model, "a")
    lorakit.merge(model)
    x = ids()
    merged_out = model(x)
    with pytest.raises(MergeError, match="unmerge"):
        lorakit.set_adapter(model, "b")
    assert lorakit.active_adapter(model) == "a"
    for _, module in lorakit.lora_layers(model):  # no layer switched before the refusal
        assert module.active_adapter == ("a" if "a" in module.adapter_names else None)
    assert torch.equal(model(x), merged_out)
    with pytest.raises(MergeError):
        lorakit.adapter_per_row(model, MIXED_NAMES).__enter__()
    lorakit.unmerge(model)
    lorakit.set_adapter(model, "b")
    assert lorakit.active_adapter(model) == "b"


def test_merge_named_adapter_and_unload():
    reference, model = two_adapters()
    x = ids()
    expected = run_hand(hand_merged(reference, model, "a"), x)
    plain = lorakit.merge_and_unload(model, "a")
    assert lorakit_modules(plain) == []
    torch.testing.assert_close(plain(x), expected)


# -- modules_to_save -------------------------------------------------------------------------------
SAVED = LoraConfig(r=2, target_modules=("q",), modules_to_save=("head",))


def test_saved_module_trains_beside_the_adapter_and_the_original_stays():
    base = TinyNet()
    reference, reference_head_object = copy.deepcopy(base), base.head
    model = lorakit.apply_lora(base, SAVED)
    original = model.head.original_module
    copy_ = model.head.modules_to_save["default"]
    assert original is reference_head_object and copy_ is not original
    assert all(not p.requires_grad for p in original.parameters())
    assert all(p.requires_grad for p in copy_.parameters())
    keys = set(model.state_dict())
    assert {"head.original_module.weight", "head.modules_to_save.default.weight"} <= keys

    x = ids()
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=SGD_LR)
    for _ in range(2):
        opt.zero_grad()
        model(x).square().mean().backward()
        opt.step()
    assert not torch.equal(copy_.weight, reference.head.weight)
    assert torch.equal(original.weight, reference.head.weight)
    assert torch.equal(original.bias, reference.head.bias)
    for name in ("emb", "q", "v", "mlp"):
        assert torch.equal(
            model.get_submodule(name).weight, reference.get_submodule(name).weight
        ), name

    adapted = model(x)
    with lorakit.disable_adapters(model):
        assert torch.equal(model(x), reference(x))
    assert torch.equal(model(x), adapted)

    fresh = TinyNet()
    fresh.load_state_dict(lorakit.merged_state_dict(model))
    torch.testing.assert_close(fresh(x), adapted)
    plain = lorakit.merge_and_unload(model)
    assert plain.head is copy_ and lorakit_modules(plain) == []
    torch.testing.assert_close(plain(x), adapted)


def test_each_adapter_has_its_own_saved_copy():
    base = TinyNet()
    reference = copy.deepcopy(base)
    model = lorakit.apply_lora(base, SAVED, "a")
    lorakit.apply_lora(model, SAVED, "b")
    with torch.no_grad():
        model.head.modules_to_save["a"].weight.add_(1.0)
        model.head.modules_to_save["b"].weight.sub_(1.0)
    x = ids()
    outs = {}
    for name in ("a", "b"):
        lorakit.set_adapter(model, name)
        outs[name] = model(x)
    assert not torch.equal(outs["a"], outs["b"])
    with lorakit.adapter_per_row(model, MIXED_NAMES):
        mixed = model(x)
    for i, name in enumerate(MIXED_NAMES):
        expected = reference(x)[i] if name is None else outs[name][i]
        torch.testing.assert_close(mixed[i], expected)
    lorakit.delete_adapter(model, "a")
    lorakit.delete_adapter(model, "b")
    assert type(model.head) is nn.Linear and lorakit_modules(model) == []
    assert torch.equal(model(x), reference(x))


# -- parameter counts ------------------------------------------------------------------------------
@pytest.mark.parametrize(("bias", "line"), [(False, BIG_LINE), (True, BIG_LINE_WITH_BIAS)])
def test_print_trainable_parameters(capsys, bias, line):
    base = nn.Linear(BIG, BIG, bias=bias)
    layer = lorakit.apply_lora(base, LoraConfig(r=BIG_R, target_modules="all-linear"))
    assert isinstance(layer, LoraLayer) and layer is not base
    trainable, total = lorakit.count_parameters(layer)
    assert trainable == 2 * BIG_R * BIG
    assert total == BIG * BIG + 2 * BIG_R * BIG + (BIG if bias else 0)
    assert lorakit.print_trainable_parameters(layer) == line
    assert capsys.readouterr().out == line + "\n"


def test_count_parameters_counts_shared_tensors_once():
    model = TinyNet()
    model.head = nn.Linear(DIM, DIM)
    model.head.weight = model.mlp.weight  # tied, as input and output embeddings often are
    lorakit.apply_lora(model, CONFIG_A)
    params = {id(p): p for p in model.parameters()}
    trainable, total = lorakit.count_parameters(model)
    assert total == sum(p.numel() for p in params.values())
    assert trainable == sum(p.numel() for p in lorakit.adapter_parameters(model))


# -- import cost -----------------------------------------------------------------------------------
def test_import_loads_no_optional_backend():
    src = str(Path(lorakit.__file__).resolve().parents[1])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([src, os.environ.get("PYTHONPATH", "")])}
    code = (
        f"import sys, lorakit; print(sorted(m for m in {OPTIONAL_BACKENDS!r} if m in sys.modules))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
    )
    assert result.stdout.strip() == "[]"


def test_bias_all_leaves_the_saved_original_frozen():
    base = TinyNet()
    config = SAVED.replace(bias="all")
    the_plan = lorakit.plan(base, config)
    model = lorakit.apply_lora(base, config)
    head = model.head
    assert not any(p.requires_grad for p in head.original_module.parameters())
    assert all(p.requires_grad for p in head.modules_to_save["default"].parameters())
    for name in ("emb", "q", "v", "mlp"):
        module = model.get_submodule(name)
        assert getattr(module, "bias", None) is None or module.bias.requires_grad, name
    assert lorakit.count_parameters(model) == (the_plan.trainable, the_plan.total)


def test_merge_computes_each_merged_weight_once(monkeypatch):
    """The all-or-nothing check is a cheap bound; the merged weight itself is formed once."""
    _, model = two_adapters()
    lorakit.set_adapter(model, "a")
    calls = []

    def counting(original):
        def counted(self, name):
            calls.append(self._where())
            return original(self, name)

        return counted

    for cls in {type(m) for _, m in lorakit.lora_layers(model)}:
        monkeypatch.setattr(cls, "delta_weight", counting(cls.delta_weight))
    changed = lorakit.merge(model)
    assert changed and sorted(calls) == sorted(changed)
