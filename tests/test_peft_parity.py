"""Parity with PEFT: the same base, the same adapter weights, the same outputs.

PEFT is the independent reference. For each model and config the base is deep-copied, lorakit is
applied to one copy and ``peft.get_peft_model`` to the other, PEFT's adapter weights (randomised
first, so the update is not zero) are copied into lorakit's layers, and the outputs are compared
at ``assert_close``'s default tolerances, unmerged and after ``merge_and_unload``.
"""

import copy
import warnings

import peft
import pytest
import torch
from torch import nn

import lorakit
from lorakit import LoraConfig
from tiny_models import BATCH, SEQ, tiny_bert, tiny_gpt2, tiny_llama

PEFT_PREFIX = "base_model.model."


def peft_config(config: LoraConfig, **extra) -> peft.LoraConfig:
    data = {k: v for k, v in config.to_peft_dict().items() if k != "peft_type"}
    return peft.LoraConfig(**data, **extra)


def randomise_peft_adapters(model: nn.Module) -> None:
    """Random A and B (and saved copies) so the adapters change the output."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name or ".modules_to_save." in name:
                p.normal_(0.0, 0.2)


def copy_peft_into_lorakit(ours: nn.Module, theirs: nn.Module, adapter: str = "default") -> int:
    """Copy PEFT's adapter tensors into lorakit's; return how many tensors were copied."""
    theirs_state = theirs.state_dict()
    copied = 0
    with torch.no_grad():
        for path, layer in lorakit.lora_layers(ours):
            prefix = f"{PEFT_PREFIX}{path}."
            if layer.kind == "embedding":
                a = theirs_state[f"{prefix}lora_embedding_A.{adapter}"]
                b = theirs_state[f"{prefix}lora_embedding_B.{adapter}"]
            else:
                a = theirs_state[f"{prefix}lora_A.{adapter}.weight"]
                b = theirs_state[f"{prefix}lora_B.{adapter}.weight"]
            layer.lora_A[adapter].copy_(a)
            layer.lora_B[adapter].copy_(b)
            copied += 2
        for path, module in ours.named_modules():
            if isinstance(module, lorakit.layers.SavedModule):
                theirs_copy = theirs.get_submodule(f"{PEFT_PREFIX}{path}.modules_to_save.{adapter}")
                module.modules_to_save[adapter].load_state_dict(theirs_copy.state_dict())
                copied += len(theirs_copy.state_dict())
    return copied


def lora_tensor_count(theirs: nn.Module) -> int:
    return sum(1 for k in theirs.state_dict() if "lora_" in k or ".modules_to_save." in k)


def adapted_pair(make_base, config: LoraConfig, **peft_extra):
    """(lorakit model, PEFT model) on the same base weights and the same adapter weights."""
    base = make_base().eval()
    ours = lorakit.apply_lora(copy.deepcopy(base), config).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PEFT's notes on fan_in_fan_out and the like
        theirs = peft.get_peft_model(copy.deepcopy(base), peft_config(config, **peft_extra)).eval()
    randomise_peft_adapters(theirs)
    copied = copy_peft_into_lorakit(ours, theirs)
    assert copied == lora_tensor_count(theirs), "every PEFT adapter tensor has a lorakit twin"
    return base, ours, theirs


def logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits


def ids_for(vocab: int) -> torch.Tensor:
    return torch.randint(0, vocab, (BATCH, SEQ))


CASES = {
    "llama-qv": (tiny_llama, LoraConfig(r=4, alpha=8, target_modules=["q_proj", "v_proj"]), {}),
    "llama-all-linear": (tiny_llama, LoraConfig(r=4, alpha=16, target_modules="all-linear"), {}),
    "llama-patterns": (
        tiny_llama,
        LoraConfig(
            r=8,
            alpha=16,
            target_modules=["q_proj", "v_proj", "down_proj"],
            rank_pattern={"v_proj": 2, r"model\.layers\.1\.mlp\.down_proj": 4},
            alpha_pattern={"q_proj": 4, "down_proj": 32},
        ),
        {},
    ),
    "llama-rslora": (
        tiny_llama,
        LoraConfig(r=16, alpha=8, use_rslora=True, target_modules=["q_proj", "o_proj"]),
        {},
    ),
    "llama-embedding": (
        tiny_llama,
        LoraConfig(r=4, alpha=8, target_modules=["embed_tokens", "q_proj"]),
        {},
    ),
    "llama-regex": (tiny_llama, LoraConfig(r=4, target_modules=r".*\.1\..*\.(k|up)_proj"), {}),
    "llama-layers-exclude": (
        tiny_llama,
        LoraConfig(
            r=4,
            target_modules=["k_proj", "up_proj", "o_proj"],
            exclude_modules=["o_proj"],
            layers=[1],
        ),
        {},
    ),
    "gpt2-c_attn-c_proj": (
        tiny_gpt2,
        LoraConfig(r=4, alpha=8, target_modules=["c_attn", "c_proj"]),
        {"fan_in_fan_out": True},
    ),
    "bert-classifier": (
        tiny_bert,
        LoraConfig(r=4, alpha=8, target_modules=["query", "value"], modules_to_save=["classifier"]),
        {},
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_outputs_match_peft(case):
    make_base, config, extra = CASES[case]
    base, ours, theirs = adapted_pair(make_base, config, **extra)
    ids = ids_for(base.config.vocab_size)
    expected = logits(theirs, ids)
    torch.testing.assert_close(logits(ours, ids), expected)
    # and the adapters really do something
    assert not torch.allclose(expected, logits(base, ids))


@pytest.mark.parametrize("case", list(CASES))
def test_merged_outputs_match_peft_merge_and_unload(case):
    make_base, config, extra = CASES[case]
    base, ours, theirs = adapted_pair(make_base, config, **extra)
    ids = ids_for(base.config.vocab_size)
    ours_merged = lorakit.merge_and_unload(ours)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs_merged = theirs.merge_and_unload()
    torch.testing.assert_close(logits(ours_merged, ids), logits(theirs_merged, ids))
    # both give back plain modules under the base's own keys, with the same merged weights
    ours_state, theirs_state = ours_merged.state_dict(), theirs_merged.state_dict()
    assert ours_state.keys() == theirs_state.keys() == base.state_dict().keys()
    for key, value in theirs_state.items():
        torch.testing.assert_close(ours_state[key], value, msg=key)


def test_peft_and_lorakit_add_the_same_number_of_parameters():
    for make_base, config, extra in CASES.values():
        base = make_base()
        ours = lorakit.apply_lora(copy.deepcopy(base), config)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            theirs = peft.get_peft_model(copy.deepcopy(base), peft_config(config, **extra))
        ours_trainable, ours_total = lorakit.count_parameters(ours)
        theirs_trainable, theirs_total = theirs.get_nb_trainable_parameters()
        assert ours_trainable == theirs_trainable, config
        assert ours_total == theirs_total, config
        assert lorakit.plan(base, config).trainable == theirs_trainable


def test_disabled_adapters_match_peft_disabled():
    base, ours, theirs = adapted_pair(*CASES["bert-classifier"][:2])
    ids = ids_for(base.config.vocab_size)
    with lorakit.disable_adapters(ours), theirs.disable_adapter():
        torch.testing.assert_close(logits(ours, ids), logits(theirs, ids))
        torch.testing.assert_close(logits(ours, ids), logits(base, ids))


@pytest.mark.parametrize("case", ["llama-patterns", "llama-embedding", "gpt2-c_attn-c_proj"])
def test_adapter_gradients_match_peft(case):
    make_base, config, extra = CASES[case]
    base, ours, theirs = adapted_pair(make_base, config, **extra)
    ids = ids_for(base.config.vocab_size)
    ours(input_ids=ids, labels=ids).loss.backward()
    theirs(input_ids=ids, labels=ids).loss.backward()
    theirs_params = dict(theirs.named_parameters())
    for path, layer in lorakit.lora_layers(ours):
        prefix = f"{PEFT_PREFIX}{path}."
        if layer.kind == "embedding":
            a, b = f"{prefix}lora_embedding_A.default", f"{prefix}lora_embedding_B.default"
        else:
            a, b = f"{prefix}lora_A.default.weight", f"{prefix}lora_B.default.weight"
        torch.testing.assert_close(layer.lora_A["default"].grad, theirs_params[a].grad, msg=a)
        torch.testing.assert_close(layer.lora_B["default"].grad, theirs_params[b].grad, msg=b)
    # the frozen base got no gradient in either
    frozen = [p for p in ours.parameters() if not p.requires_grad]
    assert frozen and all(p.grad is None for p in frozen)
