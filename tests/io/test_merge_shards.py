"""merge_shards / ``lorakit merge`` on a directory: an adapter merged into a sharded safetensors
base from the files, against merge_state_dict on the whole state dict and export_merged."""

import json
import os

import pytest
import torch
from io_models import rewrite
from safetensors.torch import load_file

import lorakit
from lorakit import LoraConfig
from lorakit.cli.main import main
from lorakit.errors import AdapterFileError, MergeError
from lorakit.io import export_merged, merge_state_dict, read_adapter
from lorakit.io import fingerprint as fp
from lorakit.io.shard_merge import INDEX, fingerprint_from_files, merge_shards, read_checkpoint
from lorakit.models import ModelLoadError
from tiny_models import logits, randomise, tiny_gpt2, tiny_llama, tokens

SHARD = "40KB"  # the tiny Llama's float32 weights in 8 or more shards


def llama_with_bias(seed=0):
    return tiny_llama(seed, attention_bias=True)


CASES = {
    "all-linear": (tiny_llama, LoraConfig(r=4, alpha=8, target_modules="all-linear")),
    "rslora-patterns-embedding": (
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
    "dora": (
        tiny_llama,
        LoraConfig(r=4, alpha=8, target_modules=["q_proj", "o_proj", "down_proj"], use_dora=True),
    ),
    "saved-head-bias": (
        llama_with_bias,
        LoraConfig(
            r=4, target_modules=["q_proj", "v_proj"], modules_to_save=["lm_head"], bias="all"
        ),
    ),
    # GPT-2: Conv1D weights stored (in, out) (fan_in_fan_out) and a head tied to the embedding
    "gpt2-conv1d-tied": (tiny_gpt2, LoraConfig(r=4, target_modules=["c_attn", "c_fc"])),
}


def make(tmp_path, name, dtype=torch.float32):
    """(base directory saved in shards, adapter directory, the adapted float32 model)."""
    build, config = CASES[name]
    build().to(dtype).save_pretrained(tmp_path / "base", max_shard_size=SHARD)
    model = randomise(lorakit.apply_lora(build(), config))
    if config.bias == "all":
        with torch.no_grad():
            for n, p in model.named_parameters():
                if n.endswith("bias") and p.requires_grad:
                    p.add_(0.5)  # a trained bias, which the merge must carry
    lorakit.save_adapter(model, tmp_path / "adapter")
    return tmp_path / "base", tmp_path / "adapter", model


def state(directory):
    out = {}
    for path in sorted(directory.glob("*.safetensors")):
        out.update(load_file(path))
    return out


def listing(root):
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


@pytest.mark.parametrize("name", CASES)
def test_merged_shards_equal_merge_state_dict_and_export(name, tmp_path):
    base, adapter, model = make(tmp_path, name)
    assert len(list(base.glob("*.safetensors"))) > 3
    merge_shards(base, adapter, tmp_path / "out")

    written = state(tmp_path / "out")
    expected = merge_state_dict(state(base), read_adapter(adapter))  # the same op, same shapes
    assert sorted(written) == sorted(expected)
    for key, value in expected.items():
        assert value.dtype == written[key].dtype and torch.equal(written[key], value), key
    assert any(not torch.equal(written[k], v) for k, v in state(base).items())

    export_merged(str(base), adapter, tmp_path / "exported")
    exported = state(tmp_path / "exported")
    assert sorted(exported) == sorted(written)
    for key, value in exported.items():  # a loaded model merges with its own op order
        torch.testing.assert_close(written[key], value, msg=key)
    files = {p.name for p in (tmp_path / "out").iterdir()}
    assert {"config.json", "generation_config.json", INDEX} <= files
    index = json.loads((tmp_path / "out" / INDEX).read_text())
    assert set(index["weight_map"]) == set(written)
    assert all((tmp_path / "out" / shard).is_file() for shard in index["weight_map"].values())

    from transformers import AutoModelForCausalLM

    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    x = tokens(128)
    torch.testing.assert_close(logits(merged, x), logits(model, x))


def test_a_bfloat16_base_stays_bfloat16(tmp_path):
    base, adapter, _ = make(tmp_path, "all-linear", torch.bfloat16)
    merge_shards(base, adapter, tmp_path / "out")
    written = state(tmp_path / "out")
    assert {t.dtype for t in written.values()} == {torch.bfloat16}
    expected = merge_state_dict(state(base), read_adapter(adapter))
    for key, value in expected.items():  # float32 delta, cast once to bfloat16, as there
        assert torch.equal(written[key], value), key
    export_merged(str(base), adapter, tmp_path / "exported")  # loads in float32, casts once
    for key, value in state(tmp_path / "exported").items():
        torch.testing.assert_close(written[key], value, msg=key)


def test_one_file_base_and_the_command(tmp_path, capsys):
    build, config = CASES["all-linear"]
    build().save_pretrained(tmp_path / "base")  # one model.safetensors
    lorakit.save_adapter(randomise(lorakit.apply_lora(build(), config)), tmp_path / "adapter")
    base, adapter, out = (str(tmp_path / n) for n in ("base", "adapter", "out"))
    assert main(["merge", base, adapter, out]) == 0
    assert "shard by shard" in capsys.readouterr().out
    assert [p.name for p in (tmp_path / "out").glob("*.safetensors")] == ["model.safetensors"]
    assert main(["merge", base, adapter, out]) == 2
    assert "pass --overwrite to replace it" in capsys.readouterr().err
    assert main(["merge", base, adapter, out, "--overwrite", "--dtype", "float16"]) == 0
    written = state(tmp_path / "out")
    assert {t.dtype for t in written.values()} == {torch.float16}
    assert json.loads((tmp_path / "out" / "config.json").read_text())["dtype"] == "float16"
    assert (
        main(["merge", base, adapter, str(tmp_path / "mem"), "--in-memory", "--dtype", "float16"])
        == 0
    )
    assert "in memory" in capsys.readouterr().out
    for key, value in state(tmp_path / "mem").items():  # both cast the float32 sum once
        assert value.dtype == torch.float16
        torch.testing.assert_close(written[key], value, msg=key)  # other code, other op order


def test_the_fingerprint_from_the_files_is_the_loaded_models(tmp_path):
    base, adapter, _ = make(tmp_path, "all-linear")
    saved = read_adapter(adapter, tensors=False).fingerprint
    config, shards = read_checkpoint(base)
    owner = {name: shard for shard in shards for name in shard.entries}
    from_files = fingerprint_from_files("LlamaForCausalLM", config, owner, saved["modules"])
    assert from_files == fp.fingerprint(tiny_llama(), saved["modules"]) == saved


def test_another_base_is_refused_or_warned(tmp_path):
    _, adapter, _ = make(tmp_path, "all-linear")
    tiny_llama(seed=1).save_pretrained(tmp_path / "other", max_shard_size=SHARD)
    before = listing(tmp_path)
    with pytest.raises(AdapterFileError, match="saved for another base model"):
        merge_shards(tmp_path / "other", adapter, tmp_path / "out")
    assert listing(tmp_path) == before
    with pytest.warns(UserWarning, match="weights differ"):
        merge_shards(tmp_path / "other", adapter, tmp_path / "out", allow_base_mismatch=True)
    assert (tmp_path / "out" / INDEX).is_file()


def test_a_tied_weight_is_refused_as_merge_refuses_it(tmp_path):
    build = lambda: tiny_llama(tie_word_embeddings=True)  # noqa: E731
    build().save_pretrained(tmp_path / "base", max_shard_size=SHARD)
    config = LoraConfig(r=4, target_modules=["embed_tokens", "q_proj"])
    lorakit.save_adapter(randomise(lorakit.apply_lora(build(), config)), tmp_path / "adapter")
    before = listing(tmp_path)
    with pytest.raises(AdapterFileError, match=r"model\.embed_tokens\.weight: its weight is tied"):
        merge_shards(tmp_path / "base", tmp_path / "adapter", tmp_path / "out")
    with pytest.raises(MergeError, match="tied"):  # the loaded path refuses it too
        export_merged(str(tmp_path / "base"), tmp_path / "adapter", tmp_path / "out")
    head = tmp_path / "head-adapter"  # the output head: stored once, as the input embedding
    config = LoraConfig(r=4, target_modules=["lm_head"])
    lorakit.save_adapter(randomise(lorakit.apply_lora(build(), config)), head)
    before = listing(tmp_path)
    with pytest.raises(AdapterFileError, match=r"lm_head\.weight: tied to model\.embed_tokens"):
        merge_shards(tmp_path / "base", head, tmp_path / "out")
    assert listing(tmp_path) == before


def damage_missing_shard(base):
    os.remove(sorted(base.glob("model-*.safetensors"))[1])


def damage_index_not_json(base):
    (base / INDEX).write_text("{not json")


def damage_index_without_map(base):
    (base / INDEX).write_text(json.dumps({"metadata": {}}))


def damage_index_mismatch(base):
    index = json.loads((base / INDEX).read_text())
    key = next(iter(index["weight_map"]))
    shards = sorted(set(index["weight_map"].values()))
    index["weight_map"][key] = next(s for s in shards if s != index["weight_map"][key])
    (base / INDEX).write_text(json.dumps(index))


def damage_truncated_shard(base):
    path = sorted(base.glob("model-*.safetensors"))[2]
    path.write_bytes(path.read_bytes()[:-100])


DAMAGE = {
    damage_missing_shard: "lists the shard model-00002-of-.*which is missing",
    damage_index_not_json: "model.safetensors.index.json is not valid JSON",
    damage_index_without_map: "is not a valid shard index",
    damage_index_mismatch: "does not match model-0000",
    damage_truncated_shard: "model-00003-of-.* is not a valid safetensors file",
}


@pytest.mark.parametrize("damage", DAMAGE, ids=lambda f: f.__name__.removeprefix("damage_"))
def test_a_damaged_base_is_a_clear_error_and_nothing_is_written(damage, tmp_path):
    base, adapter, _ = make(tmp_path, "all-linear")
    damage(base)
    before = listing(tmp_path)
    with pytest.raises((ModelLoadError, AdapterFileError), match=DAMAGE[damage]):
        merge_shards(base, adapter, tmp_path / "out")
    assert listing(tmp_path) == before


@pytest.mark.parametrize(
    "other, match",
    [
        (
            dict(num_hidden_layers=3),
            r"model\.layers\.2\.mlp\.up_proj\.weight: targeted by the adapter, in no shard",
        ),
        (dict(intermediate_size=96), r"model\.layers\.0\.mlp\.up_proj: B A has shape \(96, 64\)"),
    ],
    ids=["module-not-in-base", "shape-mismatch"],
)
def test_an_adapter_for_another_shape_is_refused_before_writing(other, match, tmp_path):
    base, _, _ = make(tmp_path, "all-linear")
    config = CASES["all-linear"][1]
    adapter = tmp_path / "other-adapter"
    lorakit.save_adapter(randomise(lorakit.apply_lora(tiny_llama(**other), config)), adapter)
    before = listing(tmp_path)
    with pytest.raises(AdapterFileError, match=match) as info:
        merge_shards(base, adapter, tmp_path / "out")
    assert "nothing was written" in str(info.value)
    assert listing(tmp_path) == before


def test_a_non_finite_merge_is_refused_and_nothing_is_written(tmp_path):
    base, adapter, _ = make(tmp_path, "all-linear")

    def huge(tensors):  # finite factors whose product is not: 4 · 1e20 · 1e20 > float32's max
        key = next(k for k in tensors if k.endswith("layers.1.mlp.down_proj.lora_A.weight"))
        tensors[key].fill_(1e20)
        tensors[key.replace("lora_A", "lora_B")].fill_(1e20)

    rewrite(adapter, huge)
    before = listing(tmp_path)
    with pytest.raises(MergeError, match=r"model\.layers\.1\.mlp\.down_proj\.weight would hold"):
        merge_shards(base, adapter, tmp_path / "out")
    assert listing(tmp_path) == before


def test_a_peft_adapter_merges_as_peft_merges_it(tmp_path):
    """PEFT as the reference: its merge_and_unload of the same files (no fingerprint in them)."""
    import peft

    tiny_llama().save_pretrained(tmp_path / "base", max_shard_size=SHARD)
    config = peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj", "down_proj"], use_rslora=True, use_dora=True
    )
    model = peft.get_peft_model(tiny_llama(), config)
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.2)
    model.save_pretrained(tmp_path / "adapter")
    merge_shards(tmp_path / "base", tmp_path / "adapter", tmp_path / "out")
    written = state(tmp_path / "out")
    expected = model.merge_and_unload().state_dict()
    assert sorted(written) == sorted(expected)
    for key, value in expected.items():  # PEFT forms DoRA's norm with its own op order
        torch.testing.assert_close(written[key], value, msg=key)


def test_without_copy_file_range_the_copy_goes_through_a_buffer(tmp_path, monkeypatch):
    """A file system without ``copy_file_range`` (EXDEV, EOPNOTSUPP) gets the same bytes."""
    import errno

    base, adapter, _ = make(tmp_path, "all-linear")
    merge_shards(base, adapter, tmp_path / "kernel-copy")

    def unsupported(*args, **kwargs):
        raise OSError(errno.EOPNOTSUPP, "operation not supported")

    monkeypatch.setattr(os, "copy_file_range", unsupported)
    monkeypatch.setattr("lorakit.io.shard_merge._CHUNK", 1000)  # several steps per tensor
    merge_shards(base, adapter, tmp_path / "buffered")
    for path in sorted((tmp_path / "kernel-copy").iterdir()):
        assert path.read_bytes() == (tmp_path / "buffered" / path.name).read_bytes(), path.name
