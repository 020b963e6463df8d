"""Hot swap: a loaded adapter takes another directory's weights in place, into the same Parameters.

After a swap the model computes what a fresh ``load_adapter`` of the new directory computes (other
values, a smaller rank, another alpha, rsLoRA, rank and alpha patterns, saved modules, fused
slices, convolutions); a compiled model follows without recompiling; every refusal leaves the
loaded adapter bit for bit as it was.
"""

import warnings

import pytest
import torch
from io_models import adapter_state, rewrite
from torch import nn

import lorakit
from lorakit import AdapterError, AdapterFileError, ConfigError, LoraConfig, MergeError
from tiny_models import conv_net, logits, randomise, tiny_gpt2, tiny_llama, tokens

QV = ["q_proj", "v_proj"]
CONV = ["conv1", "conv2", "head"]
SLICES = {"c_attn": (True, False, True)}


def llama_input():
    return tokens(128)


def gpt2_input():
    return tokens(128)


def conv_input():
    return torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(1))


# name: (base model, its input, the loaded adapter's config, the swapped-in adapter's config)
CASES = {
    "other values": (tiny_llama, llama_input, LoraConfig(r=4, alpha=8, target_modules=QV), None),
    "smaller rank, same scale": (
        tiny_llama,
        llama_input,
        LoraConfig(r=8, alpha=16, target_modules=QV),
        LoraConfig(r=4, alpha=8, target_modules=QV),
    ),
    "other alpha": (
        tiny_llama,
        llama_input,
        LoraConfig(r=4, alpha=8, target_modules=QV),
        LoraConfig(r=4, alpha=3, target_modules=QV),
    ),
    "rslora, smaller rank": (
        tiny_llama,
        llama_input,
        LoraConfig(r=8, alpha=16, use_rslora=True, target_modules=QV),
        LoraConfig(r=2, alpha=5, use_rslora=True, target_modules=QV),
    ),
    "plain into rslora": (
        tiny_llama,
        llama_input,
        LoraConfig(r=4, alpha=6, use_rslora=True, target_modules=QV),
        LoraConfig(r=4, alpha=8, target_modules=QV),
    ),
    "rank and alpha patterns": (
        tiny_llama,
        llama_input,
        LoraConfig(r=8, alpha=8),
        LoraConfig(r=4, alpha=6, rank_pattern={"mlp\\..*": 2}, alpha_pattern={"o_proj": 3.5}),
    ),
    "embedding and a saved head": (
        tiny_llama,
        llama_input,
        LoraConfig(r=4, target_modules=["embed_tokens", "k_proj"], modules_to_save=["lm_head"]),
        LoraConfig(
            r=2, alpha=5, target_modules=["embed_tokens", "k_proj"], modules_to_save=["lm_head"]
        ),
    ),
    "gpt2 fused q/v slices": (
        tiny_gpt2,
        gpt2_input,
        LoraConfig(r=4, alpha=8, target_modules=["c_attn"], fused_slices=SLICES),
        LoraConfig(r=2, alpha=3, target_modules=["c_attn"], fused_slices=SLICES),
    ),
    "convolutions": (
        conv_net,
        conv_input,
        LoraConfig(r=4, alpha=8, target_modules=CONV),
        LoraConfig(r=2, alpha=1, target_modules=CONV),
    ),
}


def write(root, name, factory, config, seed):
    """An adapter directory holding a random adapter (every tensor changes the output)."""
    model = randomise(lorakit.apply_lora(factory(), config), seed)
    return lorakit.save_adapter(model, root / name)


def loaded(root, factory=tiny_llama, config=None, seed=2):
    """A fresh base with a first adapter loaded as "default"."""
    config = config or LoraConfig(r=4, alpha=8, target_modules=QV)
    return lorakit.load_adapter(factory(), write(root, "first", factory, config, seed))


def ids(model, name="default"):
    return [id(p) for p in lorakit.adapter_parameters(model, name)]


def assert_unchanged(model, before):
    after = adapter_state(model)
    assert after.keys() == before.keys()
    for key, value in before.items():
        assert torch.equal(after[key], value), key


def scales(model, name="default"):
    return {p: m.record(name) for p, m in lorakit.lora_layers(model)}


@pytest.mark.parametrize("case", CASES)
def test_swap_equals_a_fresh_load(tmp_path, case):
    factory, make_input, kept, new = CASES[case]
    model = loaded(tmp_path, factory, kept)
    x = make_input()
    first = logits(model, x)
    before_ids, before_scales = ids(model), scales(model)
    grads = [p.requires_grad for p in lorakit.adapter_parameters(model)]
    directory = write(tmp_path, "second", factory, new or kept, seed=3)

    assert lorakit.hotswap_adapter(model, directory) is model
    expected = logits(lorakit.load_adapter(factory(), directory), x)
    swapped = logits(model, x)
    if new is None:  # the same scales: the very tensors a fresh load holds, bit for bit
        assert torch.equal(swapped, expected)
    torch.testing.assert_close(swapped, expected)
    assert not torch.allclose(swapped, first)
    # the same Parameters, shapes, flags and Python attributes: nothing for dynamo to re-guard
    assert ids(model) == before_ids
    assert scales(model) == before_scales
    assert [p.requires_grad for p in lorakit.adapter_parameters(model)] == grads
    # saved again, the swapped adapter (kept rank and alpha, the new scale folded into B) reads
    # back to the same outputs
    again = lorakit.save_adapter(model, tmp_path / "saved")
    torch.testing.assert_close(logits(lorakit.load_adapter(factory(), again), x), expected)


def test_smaller_rank_is_zero_padded(tmp_path):
    model = loaded(tmp_path, config=LoraConfig(r=8, alpha=16, target_modules=QV))
    new = write(tmp_path, "second", tiny_llama, LoraConfig(r=3, alpha=6, target_modules=QV), 3)
    lorakit.hotswap_adapter(model, new)
    fresh = lorakit.load_adapter(tiny_llama(), new)
    fresh_layers = dict(lorakit.lora_layers(fresh))
    for path, layer in lorakit.lora_layers(model):
        a, b = layer.lora_A["default"], layer.lora_B["default"]
        assert a.shape[0] == b.shape[1] == 8
        assert not a[3:].any() and not b[:, 3:].any()
        assert torch.equal(a[:3], fresh_layers[path].lora_A["default"])
        assert torch.equal(b[:, :3], fresh_layers[path].lora_B["default"])  # same scale: as is


def test_other_scale_is_folded_into_B(tmp_path):
    model = loaded(tmp_path, config=LoraConfig(r=4, alpha=8, target_modules=QV))  # scale 2
    new = write(tmp_path, "second", tiny_llama, LoraConfig(r=4, alpha=2, target_modules=QV), 3)
    lorakit.hotswap_adapter(model, new)
    fresh = dict(lorakit.lora_layers(lorakit.load_adapter(tiny_llama(), new)))  # scale 0.5
    for path, layer in lorakit.lora_layers(model):
        assert layer.record("default").scale == 2.0
        assert torch.equal(layer.lora_A["default"], fresh[path].lora_A["default"])
        torch.testing.assert_close(layer.lora_B["default"], fresh[path].lora_B["default"] / 4)


def test_swap_while_another_adapter_is_active(tmp_path):
    model = loaded(tmp_path)
    lorakit.load_adapter(model, write(tmp_path, "other", tiny_llama, LoraConfig(r=2), 4), "other")
    new = write(tmp_path, "second", tiny_llama, LoraConfig(r=2, alpha=7, target_modules=QV), 3)
    x = llama_input()
    other = logits(model, x)
    lorakit.hotswap_adapter(model, new)
    assert lorakit.active_adapter(model) == "other"
    assert torch.equal(logits(model, x), other)
    lorakit.set_adapter(model, "default")
    torch.testing.assert_close(logits(model, x), logits(lorakit.load_adapter(tiny_llama(), new), x))


def test_a_directory_peft_wrote_swaps_in(tmp_path):
    """A PEFT file (no fingerprint; an embedding, a saved head, patterns) at another rank."""
    import peft

    targets = ["embed_tokens", "o_proj", "v_proj"]
    kept = LoraConfig(r=8, alpha=16, target_modules=targets, modules_to_save=["lm_head"])
    new = LoraConfig(
        r=4,
        alpha=5,
        use_rslora=True,
        target_modules=targets,
        modules_to_save=["lm_head"],
        rank_pattern={"v_proj": 2},
    )
    data = {k: v for k, v in new.to_peft_dict().items() if k != "peft_type"}
    theirs = peft.get_peft_model(tiny_llama(), peft.LoraConfig(**data))
    with torch.no_grad():
        for name, p in theirs.named_parameters():
            if "lora_" in name or ".modules_to_save." in name:
                p.normal_(0.0, 0.2)
    x = llama_input()
    with torch.no_grad():
        expected = theirs.eval()(x).logits
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PEFT's notes about saving embedding layers
        theirs.save_pretrained(tmp_path / "peft")

    model = loaded(tmp_path, config=kept)
    lorakit.hotswap_adapter(model, tmp_path / "peft")
    torch.testing.assert_close(logits(model, x), expected)


# -- torch.compile --------------------------------------------------------------------------------
HAS_DYNAMO = torch._dynamo.is_dynamo_supported()
needs_dynamo = pytest.mark.skipif(not HAS_DYNAMO, reason="TorchDynamo is not supported here")


@pytest.fixture
def compiles():
    """A ``torch.compile`` backend that runs graphs eagerly and counts the compilations."""
    torch._dynamo.reset()
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    yield backend, graphs
    torch._dynamo.reset()


@needs_dynamo
def test_compiled_model_follows_a_swap_without_recompiling(tmp_path, compiles):
    backend, graphs = compiles
    model = loaded(tmp_path, config=LoraConfig(r=8, alpha=16, target_modules=QV))
    compiled = torch.compile(model, backend=backend)
    x = llama_input()
    with torch.no_grad():
        torch.testing.assert_close(compiled(x).logits, logits(model, x))
    assert len(graphs) == 1
    # smaller rank and another alpha: padded, the scale ratio folded into B
    new = write(tmp_path, "second", tiny_llama, LoraConfig(r=4, alpha=3, target_modules=QV), 3)
    lorakit.hotswap_adapter(model, new)
    with torch.no_grad():
        out = compiled(x).logits
    torch.testing.assert_close(out, logits(lorakit.load_adapter(tiny_llama(), new), x))
    assert len(graphs) == 1, "the swap recompiled the model"


@needs_dynamo
def test_the_counter_sees_a_scale_change_recompile(tmp_path, compiles):
    """The control: changing the scale attribute itself recompiles (why a swap folds it into B)."""
    backend, graphs = compiles
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 8))
    model = randomise(lorakit.apply_lora(model, LoraConfig(r=4, alpha=8))).eval()
    compiled = torch.compile(model, backend=backend)
    x = torch.randn(4, 16)
    with torch.no_grad():
        compiled(x)
        assert len(graphs) == 1
        for _, layer in lorakit.lora_layers(model):
            layer.records["default"] = layer.records["default"].replace(scale=0.5)
        torch.testing.assert_close(compiled(x), model(x))
    assert len(graphs) == 2


@needs_dynamo
def test_padded_before_compiling_takes_a_larger_rank_without_recompiling(tmp_path, compiles):
    backend, graphs = compiles
    model = loaded(tmp_path, config=LoraConfig(r=2, alpha=4, target_modules=QV))
    lorakit.pad_adapter_rank(model, "default", 8)
    compiled = torch.compile(model, backend=backend)
    x = llama_input()
    with torch.no_grad():
        compiled(x)
    new = write(tmp_path, "second", tiny_llama, LoraConfig(r=8, alpha=5, target_modules=QV), 3)
    lorakit.hotswap_adapter(model, new)
    with torch.no_grad():
        out = compiled(x).logits
    torch.testing.assert_close(out, logits(lorakit.load_adapter(tiny_llama(), new), x))
    assert len(graphs) == 1


# -- pad_adapter_rank ------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "factory, make_input, config",
    [
        (tiny_llama, llama_input, LoraConfig(r=2, alpha=4, rank_pattern={"v_proj": 4})),
        (tiny_llama, llama_input, LoraConfig(r=2, alpha=3, use_rslora=True, target_modules=QV)),
        (tiny_gpt2, gpt2_input, LoraConfig(r=2, target_modules=["c_attn"], fused_slices=SLICES)),
        (conv_net, conv_input, LoraConfig(r=2, target_modules=CONV)),
    ],
    ids=["patterns", "rslora", "fused slices", "convolutions"],
)
def test_pad_adapter_rank_is_exact(tmp_path, factory, make_input, config):
    model = randomise(lorakit.apply_lora(factory(), config))
    x = make_input()
    before = logits(model, x)
    old = {p: (m.lora_A["default"].clone(), m.lora_B["default"].clone(), m.record("default").scale)
           for p, m in lorakit.lora_layers(model)}  # fmt: skip
    assert sorted(lorakit.pad_adapter_rank(model, "default", 6)) == sorted(old)
    torch.testing.assert_close(logits(model, x), before)
    for path, layer in lorakit.lora_layers(model):
        a_old, b_old, s = old[path]
        a, b = layer.lora_A["default"], layer.lora_B["default"]
        r = b_old.shape[1]
        blocks = a_old.shape[0] // r  # fused slices: each slice's rows padded on their own
        a_blocks = a.reshape(blocks, 6, *a.shape[1:])
        assert torch.equal(a_blocks[:, :r], a_old.reshape(blocks, r, *a_old.shape[1:]))
        assert not a_blocks[:, r:].any()
        assert torch.equal(b[:, :r], b_old) and not b[:, r:].any()
        assert (layer.record("default").rank, layer.record("default").scale) == (6, s)
        assert a.requires_grad and b.requires_grad
    # the padded adapter saves and reads back with its scale
    directory = lorakit.save_adapter(model, tmp_path / "padded")
    torch.testing.assert_close(logits(lorakit.load_adapter(factory(), directory), x), before)


def test_pad_adapter_rank_refusals(tmp_path):
    model = randomise(lorakit.apply_lora(tiny_llama(), LoraConfig(r=2, rank_pattern={"q_proj": 8})))
    before = adapter_state(model)
    with pytest.raises(AdapterError, match=r"(?s)nothing was padded.*q_proj: r=8 is above 4"):
        lorakit.pad_adapter_rank(model, "default", 4)
    with pytest.raises(ConfigError, match="positive integer"):
        lorakit.pad_adapter_rank(model, "default", 0)
    with pytest.raises(AdapterError, match="no adapter named 'other'"):
        lorakit.pad_adapter_rank(model, "other", 8)
    assert_unchanged(model, before)
    assert lorakit.pad_adapter_rank(model, "default", 8) != []
    assert lorakit.pad_adapter_rank(model, "default", 8) == []  # already there


# -- refusals: each leaves the loaded adapter bit for bit as it was -----------------------------
def test_another_target_set_is_refused(tmp_path):
    model = loaded(tmp_path)
    before, x = adapter_state(model), llama_input()
    out = logits(model, x)
    other = write(
        tmp_path, "qk", tiny_llama, LoraConfig(r=4, target_modules=["q_proj", "k_proj"]), 3
    )
    with pytest.raises(AdapterFileError) as info:
        lorakit.hotswap_adapter(model, other)
    message = str(info.value)
    assert "model.layers.0.self_attn.k_proj: targeted by the file, not by adapter" in message
    assert "model.layers.1.self_attn.v_proj: in adapter 'default', not targeted by" in message
    assert "q_proj" not in message
    assert_unchanged(model, before)
    assert torch.equal(logits(model, x), out)


def test_another_saved_module_set_is_refused(tmp_path):
    model = loaded(tmp_path)
    before = adapter_state(model)
    config = LoraConfig(r=4, target_modules=QV, modules_to_save=["lm_head"])
    with pytest.raises(AdapterFileError, match="lm_head: a saved module of the file only"):
        lorakit.hotswap_adapter(model, write(tmp_path, "head", tiny_llama, config, 3))
    assert_unchanged(model, before)


def test_a_larger_rank_is_refused_with_the_padding_hint(tmp_path):
    model = loaded(tmp_path, config=LoraConfig(r=2, target_modules=QV))
    before = adapter_state(model)
    larger = write(tmp_path, "r4", tiny_llama, LoraConfig(r=4, target_modules=QV), 3)
    with pytest.raises(AdapterFileError) as info:
        lorakit.hotswap_adapter(model, larger)
    message = str(info.value)
    assert "r=4 in the file, r=2 in adapter 'default': the loaded adapter's rank is too small" in (
        message
    )
    assert "lorakit.pad_adapter_rank(model, 'default', 4)" in message
    assert_unchanged(model, before)
    lorakit.pad_adapter_rank(model, "default", 4)  # as the message says: then the swap fits
    lorakit.hotswap_adapter(model, larger)
    x = llama_input()
    torch.testing.assert_close(
        logits(model, x), logits(lorakit.load_adapter(tiny_llama(), larger), x)
    )


def test_an_unknown_adapter_name_is_refused(tmp_path):
    model = loaded(tmp_path)
    before = adapter_state(model)
    new = write(tmp_path, "second", tiny_llama, LoraConfig(r=4, target_modules=QV), 3)
    with pytest.raises(AdapterError, match="no adapter named 'other' to hot-swap.*default"):
        lorakit.hotswap_adapter(model, new, "other")
    with pytest.raises(AdapterError, match="no adapter named 'default'"):
        lorakit.hotswap_adapter(tiny_llama(), new)
    assert_unchanged(model, before)


def test_a_file_for_another_base_is_refused(tmp_path):
    model = loaded(tmp_path)
    before, x = adapter_state(model), llama_input()
    config = LoraConfig(r=4, alpha=3, target_modules=QV)
    foreign = write(tmp_path, "foreign", lambda: tiny_llama(seed=7), config, 3)
    with pytest.raises(AdapterFileError, match="(?s)saved for another base model.*weights differ"):
        lorakit.hotswap_adapter(model, foreign)
    assert_unchanged(model, before)
    with pytest.warns(UserWarning, match="allow_base_mismatch=True"):
        lorakit.hotswap_adapter(model, foreign, allow_base_mismatch=True)
    with pytest.warns(UserWarning, match="allow_base_mismatch=True"):
        fresh = lorakit.load_adapter(tiny_llama(), foreign, allow_base_mismatch=True)
    torch.testing.assert_close(logits(model, x), logits(fresh, x))


def test_a_merged_adapter_is_refused(tmp_path):
    model = loaded(tmp_path)
    lorakit.merge(model)
    before = adapter_state(model)
    new = write(tmp_path, "second", tiny_llama, LoraConfig(r=4, target_modules=QV), 3)
    with pytest.raises(MergeError, match="unmerge before hot-swapping"):
        lorakit.hotswap_adapter(model, new)
    assert_unchanged(model, before)


def test_a_broken_file_is_refused_whole(tmp_path):
    """Problems found tensor by tensor are all listed, after nothing was written."""
    model = loaded(tmp_path)
    before = adapter_state(model)
    new = write(tmp_path, "second", tiny_llama, LoraConfig(r=4, target_modules=QV), 3)
    a = "base_model.model.model.layers.1.self_attn.v_proj.lora_A.weight"
    b = "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"
    norm = "base_model.model.model.norm.weight"

    def change(tensors):
        del tensors[a]
        tensors[b] = tensors[b][:, :3].contiguous()
        tensors[norm] = torch.full((64,), 2.0)  # a base tensor the model holds otherwise
        tensors["base_model.model.nowhere.lora_A.weight"] = torch.zeros(4, 64)

    rewrite(new, change)
    with pytest.raises(AdapterFileError) as info:
        lorakit.hotswap_adapter(model, new)
    message = str(info.value)
    assert "(4 problem(s))" in message
    assert f"missing from the file: {a}" in message
    assert f"shape mismatch: {b}: expected (64, 4), found (64, 3)" in message
    assert "model.norm.weight: the file carries its own copy of this base tensor" in message
    assert "unexpected in the file: base_model.model.nowhere.lora_A.weight" in message
    assert_unchanged(model, before)


def test_a_file_repeating_the_model_s_base_tensor_is_fine(tmp_path):
    model = loaded(tmp_path)
    new = write(tmp_path, "second", tiny_llama, LoraConfig(r=4, target_modules=QV), 3)
    norm = model.model.norm.weight.detach().clone()
    rewrite(new, lambda tensors: tensors.update({"base_model.model.model.norm.weight": norm}))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        lorakit.hotswap_adapter(model, new)
