"""Adapter directories travel between lorakit and the real PEFT, both ways, with equal outputs.

lorakit -> PEFT: lorakit saves, ``peft.PeftModel.from_pretrained(base, dir)`` loads.
PEFT -> lorakit: ``peft_model.save_pretrained(dir)`` writes, ``lorakit.load_adapter`` loads.
Outputs are compared at ``assert_close``'s default tolerances (the two libraries order the
float32 operations differently).
"""

import json
import warnings

import peft
import pytest
import torch
from safetensors import safe_open

import lorakit
from lorakit import LoraConfig
from tiny_models import conv_net, logits, randomise, tiny_bert, tiny_gpt2, tiny_llama, tokens

CASES = {
    "llama q/v": (tiny_llama, LoraConfig(r=4, alpha=8, target_modules=["q_proj", "v_proj"])),
    "llama all-linear, patterns, rslora": (
        tiny_llama,
        LoraConfig(
            r=8,
            alpha=16,
            target_modules="all-linear",
            use_rslora=True,
            rank_pattern={"mlp\\.up_proj": 2, "q_proj": 6},
            alpha_pattern={"v_proj": 3, "mlp\\..*": 5},
        ),
    ),
    "llama embedding + saved lm_head": (
        tiny_llama,
        LoraConfig(r=4, target_modules=["embed_tokens", "o_proj"], modules_to_save=["lm_head"]),
    ),
    "llama regex, layers": (
        tiny_llama,
        LoraConfig(r=2, target_modules=["gate_proj", "down_proj"], layers=[1]),
    ),
    "gpt2 conv1d + embedding": (
        tiny_gpt2,
        LoraConfig(r=4, alpha=4, target_modules=["c_attn", "c_proj", "wte"]),
    ),
    "bert classifier": (
        tiny_bert,
        LoraConfig(r=4, target_modules=["query", "value"], modules_to_save=["classifier"]),
    ),
    "bert bias=all": (
        tiny_bert,
        LoraConfig(r=2, target_modules=["key"], modules_to_save=["classifier"], bias="all"),
    ),
    "bert bias=lora_only": (
        tiny_bert,
        LoraConfig(r=2, target_modules=["query", "dense"], bias="lora_only"),
    ),
    "convolutions": (conv_net, LoraConfig(r=3, alpha=6, target_modules=["conv1", "conv2"])),
}


def _inputs(model):
    if not hasattr(model, "config"):
        return torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    return tokens(model.config.vocab_size)


def _peft_config(config: LoraConfig, build) -> peft.LoraConfig:
    data = {k: v for k, v in config.to_peft_dict().items() if k != "peft_type"}
    task = "SEQ_CLS" if build is tiny_bert else None
    return peft.LoraConfig(**data, task_type=task)


def _trained_biases(model):
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.requires_grad and name.endswith("bias") and "lora_" not in name:
                p.add_(0.1)


def _peft_out(model, x):
    model.eval()
    with torch.no_grad():
        out = model(x)
    return out if isinstance(out, torch.Tensor) else out.logits


@pytest.mark.parametrize("case", list(CASES))
def test_peft_loads_what_lorakit_saved(case, tmp_path):
    build, config = CASES[case]
    ours = randomise(lorakit.apply_lora(build(), config))
    _trained_biases(ours)
    x = _inputs(ours)
    lorakit.save_adapter(ours, tmp_path / "a")

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PEFT's own notes (no peft_version, ...) are not ours
        theirs = peft.PeftModel.from_pretrained(build(), tmp_path / "a")
    # two libraries' code paths: sums in other orders (1e-5 apart seen on AVX2 kernels)
    torch.testing.assert_close(_peft_out(theirs, x), logits(ours, x), rtol=1e-4, atol=5e-5)


@pytest.mark.parametrize("case", list(CASES))
def test_lorakit_loads_what_peft_saved(case, tmp_path):
    build, config = CASES[case]
    theirs = peft.get_peft_model(build(), _peft_config(config, build))
    with torch.no_grad():
        for name, p in theirs.named_parameters():
            if "lora_" in name or ".modules_to_save." in name:
                p.normal_(0.0, 0.2)
    _trained_biases(theirs)
    x = _inputs(build())
    expected = _peft_out(theirs, x)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "save_embedding_layers" notes
        theirs.save_pretrained(tmp_path / "p")

    ours = lorakit.load_adapter(build(), tmp_path / "p")
    torch.testing.assert_close(logits(ours, x), expected)
    layers = dict(lorakit.lora_layers(ours))
    for name, module in theirs.named_modules():
        if isinstance(module, peft.tuners.lora.LoraLayer):
            path = name.removeprefix("base_model.model.")
            assert layers[path].record("default").rank == module.r["default"], path
            assert layers[path].record("default").scale == module.scaling["default"], path


def test_fused_slices_load_in_peft_as_the_plain_lora_they_equal(tmp_path):
    config = LoraConfig(
        r=4, alpha=8, target_modules=["c_attn"], fused_slices={"c_attn": (True, False, True)}
    )
    ours = randomise(lorakit.apply_lora(tiny_gpt2(), config))
    lorakit.save_adapter(ours, tmp_path / "a")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.PeftModel.from_pretrained(tiny_gpt2(), tmp_path / "a")
    x = tokens(128)
    torch.testing.assert_close(_peft_out(theirs, x), logits(ours, x))
    # and lorakit reads the compact slice form back
    back = lorakit.load_adapter(tiny_gpt2(), tmp_path / "a")
    assert lorakit.adapter_configs(back)["default"] == config
    assert torch.equal(logits(back, x), logits(ours, x))


def test_rslora_fused_slices_keep_their_scale_in_peft(tmp_path):
    config = LoraConfig(
        r=4,
        alpha=8,
        use_rslora=True,
        target_modules=["c_attn"],
        fused_slices={"c_attn": (True, True, True)},
    )
    ours = randomise(lorakit.apply_lora(tiny_gpt2(), config))
    lorakit.save_adapter(ours, tmp_path / "a")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.PeftModel.from_pretrained(tiny_gpt2(), tmp_path / "a")
    torch.testing.assert_close(_peft_out(theirs, tokens(128)), logits(ours, tokens(128)))


def test_peft_files_have_no_fingerprint_and_load_on_any_matching_base(tmp_path):
    theirs = peft.get_peft_model(tiny_llama(), peft.LoraConfig(r=2, target_modules=["q_proj"]))
    theirs.save_pretrained(tmp_path / "p")
    with safe_open(tmp_path / "p" / "adapter_model.safetensors", "pt") as f:
        assert "lorakit.fingerprint" not in (f.metadata() or {})
    lorakit.load_adapter(tiny_llama(seed=7), tmp_path / "p")  # no fingerprint: no base check


def test_peft_embedding_base_weights_are_loaded_like_peft_does(tmp_path):
    """PEFT writes the embedding's base weight beside an embedding adapter (for resized
    vocabularies) and loads it into the model; lorakit does the same, and says so when the
    weight differs from the model's."""
    config = peft.LoraConfig(r=2, target_modules=["embed_tokens"])
    theirs = peft.get_peft_model(tiny_llama(), config)
    with torch.no_grad():
        theirs.base_model.model.model.embed_tokens.base_layer.weight.add_(1.0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs.save_pretrained(tmp_path / "p")
    with pytest.warns(UserWarning, match="carries its own copy of 1 base tensor"):
        ours = lorakit.load_adapter(tiny_llama(), tmp_path / "p")
    info = lorakit.inspect_adapter(tmp_path / "p")
    assert info["params"] - info["trainable_params"] == 128 * 64  # the embedding's base weight
    x = tokens(128)
    torch.testing.assert_close(logits(ours, x), _peft_out(theirs, x))


def test_peft_task_type_modules_the_model_lacks_are_skipped(tmp_path):
    """PEFT adds 'classifier' and 'score' to modules_to_save for SEQ_CLS; a model with only one
    of them loads (PEFT skips the other too)."""
    theirs = peft.get_peft_model(
        tiny_bert(), peft.LoraConfig(r=2, target_modules=["query"], task_type="SEQ_CLS")
    )
    theirs.save_pretrained(tmp_path / "p")
    saved = json.loads((tmp_path / "p" / "adapter_config.json").read_text())["modules_to_save"]
    assert sorted(saved) == ["classifier", "score"]
    ours = lorakit.load_adapter(tiny_bert(), tmp_path / "p")
    assert lorakit.adapter_configs(ours)["default"].modules_to_save == ("classifier",)
    torch.testing.assert_close(logits(ours, tokens(100)), _peft_out(theirs, tokens(100)))


def test_peft_adapter_with_another_name_and_a_second_adapter(tmp_path):
    """PEFT strips adapter names from keys; a non-default adapter is saved in a subfolder."""
    theirs = peft.get_peft_model(tiny_llama(), peft.LoraConfig(r=2, target_modules=["q_proj"]))
    theirs.add_adapter("second", peft.LoraConfig(r=4, target_modules=["v_proj"]))
    with torch.no_grad():
        for name, p in theirs.named_parameters():
            if "lora_" in name:
                p.normal_(0.0, 0.2)
    theirs.save_pretrained(tmp_path / "p")
    theirs.set_adapter("second")
    expected = _peft_out(theirs, tokens(128))
    ours = lorakit.load_adapter(tiny_llama(), tmp_path / "p", "first")
    ours = lorakit.load_adapter(ours, tmp_path / "p", "second", subfolder="second")
    assert lorakit.list_adapters(ours) == ["first", "second"]
    torch.testing.assert_close(logits(ours, tokens(128)), expected)


def test_peft_classifier_adapter_loads_into_an_existing_lorakit_adapter(tmp_path):
    theirs = peft.get_peft_model(
        tiny_bert(), peft.LoraConfig(r=2, target_modules=["query"], task_type="SEQ_CLS")
    )
    with torch.no_grad():
        for name, p in theirs.named_parameters():
            if "lora_" in name or ".modules_to_save." in name:
                p.normal_(0.0, 0.2)
    theirs.save_pretrained(tmp_path / "p")
    config = LoraConfig(r=2, alpha=8, target_modules=["query"], modules_to_save=["classifier"])
    ours = lorakit.load_adapter(lorakit.apply_lora(tiny_bert(), config), tmp_path / "p")
    torch.testing.assert_close(logits(ours, tokens(100)), _peft_out(theirs, tokens(100)))
