"""merge_state_dict: an adapter merged into a base state dict with no model, shard by shard."""

import pytest
import torch

import lorakit
from lorakit import LoraConfig
from lorakit.errors import AdapterFileError
from lorakit.io import merge_state_dict, read_adapter
from tiny_models import conv_net, randomise, tiny_bert, tiny_gpt2, tiny_llama

CASES = {
    "llama-all-linear": (tiny_llama, LoraConfig(r=4, alpha=8, target_modules="all-linear")),
    "llama-patterns-rslora-embedding": (
        tiny_llama,
        LoraConfig(
            r=4,
            alpha=8,
            use_rslora=True,
            target_modules=["q_proj", "v_proj", "embed_tokens"],
            rank_pattern={"v_proj": 2},
            alpha_pattern={r"model\.layers\.0\.self_attn\.q_proj": 3.0},
        ),
    ),
    "gpt2-fused-slices": (
        tiny_gpt2,
        LoraConfig(
            r=4, target_modules=["c_attn", "c_fc"], fused_slices={"c_attn": (True, False, True)}
        ),
    ),
    "conv": (conv_net, LoraConfig(r=2, target_modules=["conv1", "conv2", "head"])),
    "bert-saved-head-bias": (
        tiny_bert,
        LoraConfig(
            r=4, target_modules=["query", "value"], modules_to_save=["classifier"], bias="all"
        ),
    ),
}


def adapted_and_file(name, tmp_path):
    build, config = CASES[name]
    model = randomise(lorakit.apply_lora(build(), config))
    if config.bias == "all":
        with torch.no_grad():
            for n, p in model.named_parameters():
                if n.endswith("bias") and p.requires_grad:
                    p.add_(0.5)  # a trained bias, which the merge must carry
    lorakit.save_adapter(model, tmp_path / "adapter")
    return build, model, read_adapter(tmp_path / "adapter")


@pytest.mark.parametrize("name", CASES)
def test_merge_state_dict_equals_the_merged_model(name, tmp_path):
    build, model, file = adapted_and_file(name, tmp_path)
    base = build().state_dict()
    before = {k: v.clone() for k, v in base.items()}

    merged = merge_state_dict(base, file)

    expected = lorakit.merged_state_dict(model)
    assert list(merged) == list(expected)
    changed = 0
    for key, value in expected.items():
        torch.testing.assert_close(merged[key], value, msg=key)
        changed += not torch.equal(merged[key], before[key])
    assert changed > 0
    for key, value in base.items():  # the input is left alone
        assert torch.equal(value, before[key]), key


def test_merge_state_dict_one_shard_at_a_time(tmp_path):
    build, model, file = adapted_and_file("llama-all-linear", tmp_path)
    base = build().state_dict()
    keys = list(base)
    shards = [
        dict((k, base[k]) for k in keys[: len(keys) // 2]),
        {k: base[k] for k in keys[len(keys) // 2 :]},
    ]
    config = file.lora_config()
    merged = {}
    for shard in shards:
        merged.update(merge_state_dict(shard, file.tensors, config, strict=False))
    expected = lorakit.merged_state_dict(model)
    for key, value in expected.items():
        torch.testing.assert_close(merged[key], value, msg=key)
    with pytest.raises(AdapterFileError, match="not in the base state dict"):
        merge_state_dict(shards[0], file.tensors, config)


def test_merge_state_dict_refuses_a_mismatched_base(tmp_path):
    _, _, file = adapted_and_file("llama-all-linear", tmp_path)
    other = tiny_llama(hidden_size=32, intermediate_size=64).state_dict()
    with pytest.raises(AdapterFileError, match="the base weight"):
        merge_state_dict(other, file)
