"""A new layer kind is one registered LoraLayer subclass: planning, applying, merging, saving and
loading take it with no change anywhere else."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lorakit
from lorakit import LoraConfig
from lorakit.layers import KINDS, LoraLayer, register
from lorakit.layers.linear import _add_low_rank


class Affine(nn.Module):
    """A base layer lorakit does not know: ``x Wᵀ + b``, written out by hand."""

    def __init__(self, n_in: int, n_out: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(n_out, n_in) * 0.3)
        self.bias = nn.Parameter(torch.randn(n_out) * 0.1)

    def forward(self, x):
        return x @ self.weight.t() + self.bias


class LoraAffine(LoraLayer):
    kind = "affine-test"
    describes = "Affine (test)"

    @classmethod
    def accepts(cls, module):
        return isinstance(module, Affine)

    def __init__(self, base: Affine) -> None:
        super().__init__(base)
        self.n_in, self.n_out = self.weight.shape[1], self.weight.shape[0]

    def base_forward(self, x):
        return F.linear(x, self.weight, self.bias)

    lora_forward = staticmethod(_add_low_rank)

    def adapter_shapes(self, r):
        return (r, self.n_in), (self.n_out, r)

    def delta_weight(self, name):
        return (self._B[name].float() @ self._A[name].float()) * self.records[name].scale


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.affine = Affine(6, 5)
        self.head = nn.Linear(5, 3)

    def forward(self, x):
        return self.head(torch.relu(self.affine(x)))


@pytest.fixture
def affine_kind():
    register(LoraAffine)
    yield LoraAffine
    del KINDS[LoraAffine.kind]


def build():
    torch.manual_seed(0)
    return Net().eval()


def test_a_registered_kind_plans_applies_merges_saves_and_loads(affine_kind, tmp_path):
    config = LoraConfig(r=2, alpha=4, target_modules=["affine"])
    the_plan = lorakit.plan(build(), config)
    assert [(row.path, row.kind, row.params) for row in the_plan.rows] == [
        ("affine", "affine-test", 2 * (6 + 5))
    ]
    model = lorakit.apply_lora(build(), config)
    assert isinstance(model.affine, LoraAffine)
    with torch.no_grad():
        model.affine.lora_B["default"].normal_()
    x = torch.randn(4, 6)
    a, b = model.affine.lora_A["default"].double(), model.affine.lora_B["default"].double()
    w, bias = model.affine.weight.double(), model.affine.bias.double()
    expected_hidden = x.double() @ (w + 2.0 * b @ a).t() + bias  # s = alpha / r = 2
    with torch.no_grad():
        torch.testing.assert_close(model.affine(x), expected_hidden.float())
        out = model(x)

    lorakit.save_adapter(model, tmp_path / "adapter")
    loaded = lorakit.load_adapter(build(), tmp_path / "adapter")
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), out)
        merged = lorakit.merge_and_unload(loaded)
        assert type(merged.affine) is Affine
        torch.testing.assert_close(merged(x), out)


def test_an_unregistered_module_names_the_kinds_that_exist():
    with pytest.raises(lorakit.TargetError, match=r"Affine is not a layer kind .*nn\.Linear"):
        lorakit.plan(build(), LoraConfig(target_modules=["affine"]))
