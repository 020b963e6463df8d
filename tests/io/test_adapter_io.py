"""Saving and loading adapters: lorakit -> disk -> lorakit is bit-exact for every layer kind and
config, the files are PEFT's layout, and the base model's fingerprint travels with them."""

import copy
import json

import pytest
import torch
from io_models import adapter_state, snapshot
from safetensors import safe_open

import lorakit
from lorakit import LoraConfig
from lorakit.io import fingerprint as fp
from lorakit.io import read_adapter
from tiny_models import (
    ConvNet,
    conv_net,
    logits,
    randomise,
    tiny_bert,
    tiny_gpt2,
    tiny_llama,
    tokens,
)

CASES = {
    "llama q/v": (tiny_llama, LoraConfig(r=4, alpha=8, target_modules=["q_proj", "v_proj"])),
    "llama all-linear patterns rslora": (
        tiny_llama,
        LoraConfig(
            r=8,
            alpha=16,
            use_rslora=True,
            rank_pattern={"mlp\\..*": 2},
            alpha_pattern={"o_proj": 3.5},
        ),
    ),
    "llama embedding + saved head": (
        tiny_llama,
        LoraConfig(r=4, target_modules=["embed_tokens", "k_proj"], modules_to_save=["lm_head"]),
    ),
    "gpt2 conv1d": (tiny_gpt2, LoraConfig(r=4, target_modules=["c_attn", "c_fc"])),
    "gpt2 fused q/v slices": (
        tiny_gpt2,
        LoraConfig(
            r=4, alpha=8, target_modules=["c_attn"], fused_slices={"c_attn": (True, False, True)}
        ),
    ),
    "bert classifier, bias=all": (
        tiny_bert,
        LoraConfig(
            r=4, target_modules=["query", "value"], modules_to_save=["classifier"], bias="all"
        ),
    ),
    "bert lora_only bias": (
        tiny_bert,
        LoraConfig(r=2, target_modules=["query", "key"], bias="lora_only", layers=[1]),
    ),
    "convolutions": (conv_net, LoraConfig(r=3, alpha=6, target_modules=["conv1", "conv2", "head"])),
}


def _inputs(model):
    if isinstance(model, ConvNet):
        return torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    return tokens(model.config.vocab_size)


def _trained(build, config):
    model = lorakit.apply_lora(build(), config)
    randomise(model)
    if config.bias != "none":
        with torch.no_grad():
            for p in model.parameters():
                if p.requires_grad and p.dim() == 1:
                    p.add_(0.1)  # a trained bias
    return model


@pytest.mark.parametrize("case", list(CASES))
def test_round_trip_is_bit_exact(case, tmp_path):
    build, config = CASES[case]
    model = _trained(build, config)
    x = _inputs(model)
    expected = logits(model, x)
    lorakit.save_adapter(model, tmp_path / "adapter")

    loaded = lorakit.load_adapter(build(), tmp_path / "adapter")

    assert lorakit.adapter_configs(loaded)["default"] == config
    saved, back = adapter_state(model), adapter_state(loaded)
    assert saved.keys() == back.keys()
    for key in saved:
        assert torch.equal(saved[key], back[key]), key
    for (path, ours), (_, theirs) in zip(lorakit.lora_layers(model), lorakit.lora_layers(loaded)):
        assert ours.records == theirs.records, path
    if config.bias != "none":
        trained = {k: v for k, v in model.state_dict().items() if k.endswith("bias")}
        for key, value in trained.items():
            assert torch.equal(loaded.state_dict()[key], value), key
    assert torch.equal(logits(loaded, x), expected)


def test_files_use_peft_names_and_config_keys(tmp_path):
    model = _trained(*CASES["llama embedding + saved head"])
    lorakit.save_adapter(model, tmp_path / "a")
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == [
        "adapter_config.json",
        "adapter_model.safetensors",
    ]
    with safe_open(tmp_path / "a" / "adapter_model.safetensors", "pt") as f:
        keys = set(f.keys())
        metadata = f.metadata()
    assert "base_model.model.model.embed_tokens.lora_embedding_A" in keys
    assert "base_model.model.model.embed_tokens.lora_embedding_B" in keys
    assert "base_model.model.model.layers.1.self_attn.k_proj.lora_A.weight" in keys
    assert "base_model.model.model.layers.1.self_attn.k_proj.lora_B.weight" in keys
    assert "base_model.model.lm_head.weight" in keys  # the saved copy, no adapter name
    assert not any("default" in k or "modules_to_save" in k for k in keys)
    assert len(keys) == 2 + 2 * 2 + 1
    assert metadata["format"] == "pt"
    assert metadata["lorakit.version"] == lorakit.__version__
    config = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA"
    assert config["task_type"] == "CAUSAL_LM"
    assert config["inference_mode"] is True
    assert config["fan_in_fan_out"] is False
    assert config["target_modules"] == ["embed_tokens", "k_proj"]
    assert config["modules_to_save"] == ["lm_head"]
    assert (config["r"], config["lora_alpha"], config["use_rslora"]) == (4, 16, False)
    for key in ("lora_dropout", "bias", "rank_pattern", "alpha_pattern", "init_lora_weights"):
        assert key in config
    assert "base_model_name_or_path" in config


def test_config_records_task_type_fan_in_fan_out_and_base_name(tmp_path):
    gpt2 = lorakit.apply_lora(tiny_gpt2(), LoraConfig(r=2, target_modules=["c_attn"]))
    gpt2.name_or_path = "openai-community/gpt2"
    lorakit.save_adapter(gpt2, tmp_path / "g")
    config = json.loads((tmp_path / "g" / "adapter_config.json").read_text())
    assert config["fan_in_fan_out"] is True
    assert config["base_model_name_or_path"] == "openai-community/gpt2"
    # PEFT's SEQ_CLS wrapper insists on saving the classifier: named only when the adapter does
    for saved, task in ((["classifier"], "SEQ_CLS"), (None, None)):
        config = LoraConfig(r=2, target_modules=["query"], modules_to_save=saved)
        lorakit.save_adapter(lorakit.apply_lora(tiny_bert(), config), tmp_path / f"b{task}")
        written = json.loads((tmp_path / f"b{task}" / "adapter_config.json").read_text())
        assert written["task_type"] == task
    conv = lorakit.apply_lora(conv_net(), LoraConfig(r=2, target_modules=["conv1"]))
    lorakit.save_adapter(conv, tmp_path / "c")
    assert json.loads((tmp_path / "c" / "adapter_config.json").read_text())["task_type"] is None


def test_fused_slices_are_saved_as_the_equivalent_plain_lora(tmp_path):
    """PEFT cannot express fused slices: the file holds the plain rank-2r LoRA they equal."""
    model = _trained(*CASES["gpt2 fused q/v slices"])
    lorakit.save_adapter(model, tmp_path / "a")
    config = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    path = "transformer\\.h\\.0\\.attn\\.c_attn"
    assert config["rank_pattern"][path] == 8 and config["alpha_pattern"][path] == 16
    with safe_open(tmp_path / "a" / "adapter_model.safetensors", "pt") as f:
        b = f.get_tensor("base_model.model.transformer.h.0.attn.c_attn.lora_B.weight")
        assert b.shape == (192, 8)
        assert "lorakit.config" in f.metadata()
    assert torch.equal(b[64:128], torch.zeros(64, 8))  # the k slice is not adapted
    assert torch.equal(b[:64, 4:], torch.zeros(64, 4))  # block structure


def test_combined_adapter_round_trips_with_per_module_ranks(tmp_path):
    model = lorakit.apply_lora(tiny_llama(), LoraConfig(r=4, target_modules=["q_proj"]), "a")
    lorakit.apply_lora(model, LoraConfig(r=2, alpha=5, target_modules=["q_proj", "v_proj"]), "b")
    randomise(model)
    lorakit.combine(model, {"a": 0.5, "b": 1.0}, method="cat", name="ab")
    lorakit.set_adapter(model, "ab")
    x = tokens(128)
    expected = logits(model, x)
    lorakit.save_adapter(model, tmp_path / "ab", "ab")
    loaded = lorakit.load_adapter(tiny_llama(), tmp_path / "ab")
    assert torch.equal(logits(loaded, x), expected)


def test_half_precision_base_keeps_float32_adapters(tmp_path):
    model = lorakit.apply_lora(
        tiny_llama().to(torch.bfloat16), LoraConfig(r=4, target_modules=["q_proj"])
    )
    randomise(model)
    lorakit.save_adapter(model, tmp_path / "a")
    info = read_adapter(tmp_path / "a", tensors=False)
    assert set(info.dtypes.values()) == {"F32"}
    loaded = lorakit.load_adapter(tiny_llama().to(torch.bfloat16), tmp_path / "a")
    for key, value in adapter_state(model).items():
        assert torch.equal(adapter_state(loaded)[key], value)


def test_load_into_existing_adapter_and_beside_others(tmp_path):
    config = LoraConfig(r=4, target_modules=["q_proj", "v_proj"])
    model = randomise(lorakit.apply_lora(tiny_llama(), config))
    lorakit.save_adapter(model, tmp_path / "a")

    target = lorakit.apply_lora(tiny_llama(), config)  # same config, fresh weights
    lorakit.load_adapter(target, tmp_path / "a")
    assert torch.equal(logits(target, tokens(128)), logits(model, tokens(128)))

    lorakit.load_adapter(target, tmp_path / "a", "second")
    assert lorakit.list_adapters(target) == ["default", "second"]
    assert lorakit.active_adapter(target) == "second"  # as apply_lora does
    for key, value in adapter_state(model).items():
        assert torch.equal(adapter_state(target, "second")[key.replace("default", "second")], value)


def test_loaded_adapter_trains_and_base_stays_frozen(tmp_path):
    model = randomise(lorakit.apply_lora(tiny_llama(), LoraConfig(r=4, target_modules=["q_proj"])))
    lorakit.save_adapter(model, tmp_path / "a")
    loaded = lorakit.load_adapter(tiny_llama(), tmp_path / "a")
    trainable = {id(p) for p in loaded.parameters() if p.requires_grad}
    assert trainable == {id(p) for p in lorakit.adapter_parameters(loaded)}


def test_overwrite_replaces_atomically(tmp_path):
    first = randomise(lorakit.apply_lora(tiny_llama(), LoraConfig(r=4, target_modules=["q_proj"])))
    second = randomise(
        lorakit.apply_lora(tiny_llama(), LoraConfig(r=2, target_modules=["v_proj"])), seed=5
    )
    lorakit.save_adapter(first, tmp_path / "a")
    lorakit.save_adapter(second, tmp_path / "a", overwrite=True)
    loaded = lorakit.load_adapter(tiny_llama(), tmp_path / "a")
    assert torch.equal(logits(loaded, tokens(128)), logits(second, tokens(128)))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a"]  # no temporary left behind


def test_empty_directory_is_used(tmp_path):
    (tmp_path / "a").mkdir()
    model = lorakit.apply_lora(tiny_llama(), LoraConfig(r=2, target_modules=["q_proj"]))
    lorakit.save_adapter(model, tmp_path / "a")
    assert (tmp_path / "a" / "adapter_model.safetensors").is_file()


def test_save_does_not_change_the_model(tmp_path):
    model = randomise(lorakit.apply_lora(tiny_llama(), LoraConfig(r=4, target_modules=["q_proj"])))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    lorakit.save_adapter(model, tmp_path / "a")
    after = model.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)


# -- fingerprint --------------------------------------------------------------------------------
def test_fingerprint_records_architecture_shapes_and_weights(tmp_path):
    model = lorakit.apply_lora(tiny_llama(), LoraConfig(r=4, target_modules=["q_proj"]))
    lorakit.save_adapter(model, tmp_path / "a")
    saved = read_adapter(tmp_path / "a", tensors=False).fingerprint
    assert saved["architecture"] == "LlamaForCausalLM"
    assert saved["model_type"] == "llama"
    assert saved["dtype"] == "float32"
    assert saved["modules"] == {f"model.layers.{i}.self_attn.q_proj": [64, 64] for i in range(2)}
    assert len(saved["weights"]) == 16
    assert fp.differences(saved, fp.fingerprint(tiny_llama(), saved["modules"])) == []


def test_fingerprint_ignores_float32_vs_bfloat16_but_not_other_weights():
    paths = ["model.layers.0.self_attn.q_proj", "model.layers.1.mlp.up_proj"]
    base = fp.fingerprint(tiny_llama(), paths)
    assert fp.fingerprint(tiny_llama().to(torch.bfloat16), paths)["weights"] == base["weights"]
    assert fp.fingerprint(tiny_llama(seed=1), paths)["weights"] != base["weights"]
    changed = tiny_llama()
    with torch.no_grad():
        changed.model.layers[1].mlp.up_proj.weight[0, 0] += 1.0  # the first sampled value
    assert fp.fingerprint(changed, paths)["weights"] != base["weights"]
    with torch.device("meta"):
        meta = tiny_llama()
    assert fp.fingerprint(meta, paths)["weights"] is None


def test_merged_adapter_saves_without_a_weight_hash(tmp_path):
    model = randomise(lorakit.apply_lora(tiny_llama(), LoraConfig(r=4, target_modules=["q_proj"])))
    lorakit.merge(model)
    lorakit.save_adapter(model, tmp_path / "a")
    assert read_adapter(tmp_path / "a", tensors=False).fingerprint["weights"] is None
    loaded = lorakit.load_adapter(tiny_llama(), tmp_path / "a")  # shapes still checked, loads
    lorakit.unmerge(model)  # W + ΔW - ΔW: equal up to rounding
    torch.testing.assert_close(logits(loaded, tokens(128)), logits(model, tokens(128)))


def test_directory_listing_is_untouched_by_load(tmp_path):
    model = randomise(lorakit.apply_lora(tiny_llama(), LoraConfig(r=4, target_modules=["q_proj"])))
    lorakit.save_adapter(model, tmp_path / "a")
    before = snapshot(tmp_path)
    lorakit.load_adapter(copy.deepcopy(tiny_llama()), tmp_path / "a")
    assert snapshot(tmp_path) == before


def test_qlora_adapter_loads_on_its_quantized_base_and_on_the_float_original(tmp_path):
    config = LoraConfig(r=4, target_modules=["q_proj", "v_proj"])
    model = randomise(lorakit.apply_lora(lorakit.quantize(tiny_llama(), "nf4"), config))
    lorakit.save_adapter(model, tmp_path / "a")
    saved = read_adapter(tmp_path / "a", tensors=False).fingerprint
    assert saved["dtype"] == "nf4" and saved["modules"]["model.layers.0.self_attn.q_proj"] == [
        64,
        64,
    ]

    same = lorakit.load_adapter(lorakit.quantize(tiny_llama(), "nf4"), tmp_path / "a")
    assert torch.equal(logits(same, tokens(128)), logits(model, tokens(128)))
    lorakit.load_adapter(tiny_llama(), tmp_path / "a")  # the float original, e.g. to merge there
    with pytest.raises(lorakit.AdapterFileError, match="weights differ"):
        lorakit.load_adapter(lorakit.quantize(tiny_llama(seed=1), "nf4"), tmp_path / "a")
