"""Every way an adapter file can be wrong, and every write that must not happen: each gives one
clear error, leaves the files on disk untouched and the model as it was."""

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from io_models import adapter_state, assert_refused, rewrite, snapshot
from safetensors.torch import load_file

import lorakit
from lorakit import AdapterError, AdapterFileError, ConfigError, LoraConfig
from lorakit.io import safety
from tiny_models import logits, randomise, tiny_gpt2, tiny_llama, tokens

CONFIG = LoraConfig(r=4, alpha=8, target_modules=["q_proj", "v_proj"])
Q0 = "base_model.model.model.layers.0.self_attn.q_proj"


@pytest.fixture
def saved(tmp_path):
    """An adapter directory saved from a tiny Llama, and the model that saved it."""
    model = randomise(lorakit.apply_lora(tiny_llama(), CONFIG))
    lorakit.save_adapter(model, tmp_path / "adapter")
    return tmp_path / "adapter", model


def edit_config(directory, **changes):
    path = directory / "adapter_config.json"
    config = json.loads(path.read_text())
    config.update(changes)
    path.write_text(json.dumps(config))


# -- damaged files ------------------------------------------------------------------------------
@pytest.mark.parametrize("keep", [0, 5, 200, -10])
def test_truncated_safetensors(saved, keep):
    directory, _ = saved
    path = directory / "adapter_model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[:keep] if keep >= 0 else data[:keep])
    assert_refused(directory, AdapterFileError, "not a valid safetensors file")


def test_config_with_a_wrong_type(saved):
    directory, _ = saved
    edit_config(directory, r="eight")
    message = assert_refused(directory, ConfigError, "r='eight': expected a positive integer")
    assert "adapter_config.json" in message


def test_config_with_an_unhashable_value(saved):
    directory, _ = saved
    edit_config(directory, init_lora_weights=["kaiming"])
    assert_refused(directory, AdapterFileError, "wrong type")


def test_config_that_is_not_json(saved):
    directory, _ = saved
    (directory / "adapter_config.json").write_text("{'r': 4,")
    assert_refused(directory, AdapterFileError, "not valid JSON")
    (directory / "adapter_config.json").write_text("[4]")
    assert_refused(directory, AdapterFileError, "must hold a JSON object")


def test_peft_feature_lorakit_lacks_is_an_error_and_unknown_keys_a_warning(saved):
    directory, model = saved
    edit_config(directory, use_qalora=True)
    assert_refused(directory, ConfigError, "QA-LoRA")
    edit_config(directory, use_qalora=False, a_key_from_the_future=1)
    with pytest.warns(UserWarning, match="a_key_from_the_future"):
        loaded = lorakit.load_adapter(tiny_llama(), directory)
    assert torch.equal(logits(loaded, tokens(128)), logits(model, tokens(128)))


def test_missing_directory_and_files(tmp_path, saved):
    directory, _ = saved
    with pytest.raises(AdapterFileError, match="does not exist"):
        lorakit.load_adapter(tiny_llama(), tmp_path / "nowhere")
    (directory / "adapter_config.json").unlink()
    assert_refused(directory, AdapterFileError, "no adapter_config.json")
    base = tmp_path / "base"
    base.mkdir()
    (base / "config.json").write_text("{}")
    with pytest.raises(AdapterFileError, match="looks like a base model"):
        lorakit.load_adapter(tiny_llama(), base)


# -- files that do not fit the model ------------------------------------------------------------
def test_adapter_for_another_base_names_both_fingerprints(saved):
    directory, model = saved
    message = assert_refused(
        directory, AdapterFileError, "saved for another base model", model=tiny_llama(seed=1)
    )
    assert "file: LlamaForCausalLM (llama, float32), 4 modules, weights" in message
    assert "here: LlamaForCausalLM (llama, float32), 4 modules, weights" in message
    assert "weights differ" in message and "allow_base_mismatch=True" in message

    with pytest.warns(UserWarning, match="saved for another base model"):
        other = lorakit.load_adapter(tiny_llama(seed=1), directory, allow_base_mismatch=True)
    for key, value in adapter_state(model).items():
        assert torch.equal(adapter_state(other)[key], value)


def test_adapter_for_another_architecture_size(saved):
    directory, _ = saved
    smaller = tiny_llama(hidden_size=32, intermediate_size=64)
    message = assert_refused(directory, AdapterFileError, "weight shape", model=smaller)
    assert "(64, 64) in the file, (32, 32) here" in message


def test_adapter_for_another_architecture(saved):
    directory, _ = saved
    message = assert_refused(directory, AdapterFileError, "another base", model=tiny_gpt2())
    assert "'LlamaForCausalLM' in the file, 'GPT2LMHeadModel' here" in message


def test_missing_tensor(saved):
    directory, _ = saved
    rewrite(directory, lambda t: t.pop(f"{Q0}.lora_B.weight"))
    message = assert_refused(directory, AdapterFileError, "missing from the file")
    assert f"{Q0}.lora_B.weight (expected (64, 4))" in message
    assert "likely cause: an incomplete file" in message


@pytest.mark.parametrize(
    "module, cause",
    [
        ("layers.0.mlp.up_proj", "the file adapts modules its adapter_config.json does not target"),
        ("layers.7.self_attn.q_proj", "do not exist in LlamaForCausalLM (e.g. model.layers.7"),
    ],
)
def test_extra_tensor(saved, module, cause):
    directory, _ = saved
    extra = f"base_model.model.model.{module}.lora_A.weight"
    rewrite(directory, lambda t: t.update({extra: torch.zeros(4, 64)}))
    message = assert_refused(directory, AdapterFileError, "unexpected in the file")
    assert f"{extra} (4, 64)" in message
    assert cause in message


def test_other_rank_in_config_than_in_tensors(saved):
    directory, _ = saved
    edit_config(directory, r=8)
    message = assert_refused(directory, AdapterFileError, "shape mismatch")
    assert f"{Q0}.lora_A.weight: expected (8, 64), found (4, 64)" in message
    assert "likely cause: another rank: the file has r=4 where the config gives r=8" in message


def test_integer_tensor_where_a_float_belongs(saved):
    directory, _ = saved
    key = f"{Q0}.lora_A.weight"
    rewrite(directory, lambda t: t.update({key: t[key].to(torch.int32)}))
    assert_refused(directory, AdapterFileError, f"dtype mismatch: {key}: torch.int32 in the file")


def test_errors_are_gathered_and_capped(saved):
    directory, _ = saved

    def damage(tensors):
        for key in list(tensors):
            tensors[key.replace("lora_", "lora_x")] = tensors.pop(key)

    rewrite(directory, damage)
    message = assert_refused(directory, AdapterFileError, r"\(16 problem\(s\)\)")
    assert "... and 4 more" in message


def test_loading_into_an_existing_adapter_of_another_rank(saved):
    directory, _ = saved
    model = lorakit.apply_lora(tiny_llama(), CONFIG.replace(r=2))
    before = adapter_state(model)
    assert_refused(directory, AdapterFileError, "does not match the existing adapter", model=model)
    after = adapter_state(model)
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_failed_load_leaves_other_adapters_and_flags_alone(saved):
    directory, _ = saved
    model = lorakit.apply_lora(tiny_llama(), LoraConfig(r=2, target_modules=["q_proj"]), "mine")
    model.lm_head.weight.requires_grad_(True)  # something the caller chose
    rewrite(directory, lambda t: t.pop(f"{Q0}.lora_A.weight"))
    assert_refused(directory, AdapterFileError, "missing", model=model)
    assert lorakit.active_adapter(model) == "mine"
    assert not hasattr(tiny_llama(), "lorakit_registry")

    plain = tiny_llama()
    plain.requires_grad_(True)
    assert_refused(directory, AdapterFileError, "missing", model=plain)
    assert all(p.requires_grad for p in plain.parameters())
    assert "lorakit_registry" not in vars(plain)


def test_fused_block_form_with_dense_entries(tmp_path):
    config = LoraConfig(
        r=2, target_modules=["c_attn"], fused_slices={"c_attn": (True, False, True)}
    )
    model = randomise(lorakit.apply_lora(tiny_gpt2(), config))
    lorakit.save_adapter(model, tmp_path / "a")
    key = "base_model.model.transformer.h.0.attn.c_attn.lora_B.weight"
    rewrite(tmp_path / "a", lambda t: t[key].__setitem__((70, 0), 1.0))  # inside the k slice
    assert_refused(tmp_path / "a", AdapterFileError, "outside the blocks", model=tiny_gpt2())


# -- legacy pickles -----------------------------------------------------------------------------
def test_legacy_bin_is_refused_unless_asked(saved):
    directory, model = saved
    tensors = load_file(directory / "adapter_model.safetensors")
    (directory / "adapter_model.safetensors").unlink()
    torch.save(tensors, directory / "adapter_model.bin")
    assert_refused(directory, AdapterFileError, "allow_bin=True")
    loaded = lorakit.load_adapter(tiny_llama(), directory, allow_bin=True)
    assert torch.equal(logits(loaded, tokens(128)), logits(model, tokens(128)))


class _Payload:
    """An object whose unpickling would run code (create a file)."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_legacy_bin_never_runs_code(saved, tmp_path):
    directory, _ = saved
    marker = tmp_path / "pwned"
    (directory / "adapter_model.safetensors").unlink()
    torch.save({"x": _Payload(str(marker))}, directory / "adapter_model.bin")
    assert_refused(directory, AdapterFileError, "refused by torch.load", allow_bin=True)
    assert not marker.exists()


# -- paths and names ----------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["../x", "a/b", "/etc", "", ".hidden", "a b", "x" * 101])
def test_adapter_names_cannot_be_paths(saved, name, tmp_path):
    directory, model = saved
    with pytest.raises(AdapterError, match="not allowed"):
        lorakit.load_adapter(tiny_llama(), directory, name)
    with pytest.raises(AdapterError):
        lorakit.save_adapter(model, tmp_path / "b", name)
    assert not (tmp_path / "b").exists()


@pytest.mark.parametrize("sub", ["../adapter", "/abs", "a/../../adapter", "..", "a\\..\\b", "C:x"])
def test_subfolder_cannot_escape(saved, sub):
    directory, _ = saved
    with pytest.raises(AdapterFileError, match="not allowed"):
        lorakit.load_adapter(tiny_llama(), directory.parent, subfolder=sub)


def test_subfolder_through_a_symlink_cannot_escape(saved, tmp_path):
    directory, model = saved
    root = tmp_path / "root"
    root.mkdir()
    (root / "link").symlink_to(directory)
    with pytest.raises(AdapterFileError, match="symbolic link"):
        lorakit.load_adapter(tiny_llama(), root, subfolder="link")
    (root / "inside").mkdir()
    lorakit.save_adapter(model, root / "inside" / "a")
    lorakit.load_adapter(tiny_llama(), root, subfolder="inside/a")


# -- writes that must not happen ----------------------------------------------------------------
def test_existing_adapter_is_not_overwritten(saved):
    directory, model = saved
    before = snapshot(directory.parent)
    other = lorakit.apply_lora(tiny_llama(), LoraConfig(r=2, target_modules=["q_proj"]))
    with pytest.raises(AdapterFileError, match="overwrite=True"):
        lorakit.save_adapter(other, directory)
    assert snapshot(directory.parent) == before


def test_directories_that_are_not_adapters_are_never_replaced(saved, tmp_path):
    _, model = saved
    work = tmp_path / "work"
    work.mkdir()
    (work / "notes.txt").write_text("mine")
    (tmp_path / "file").write_text("a file")
    (tmp_path / "link").symlink_to(work)
    for target, match in [(work, "not an adapter directory"), (tmp_path / "file", "not a dir")]:
        before = snapshot(tmp_path)
        with pytest.raises(AdapterFileError, match=match):
            lorakit.save_adapter(model, target, overwrite=True)
        assert snapshot(tmp_path) == before
    with pytest.raises(AdapterFileError, match="symbolic link"):
        lorakit.save_adapter(model, tmp_path / "link", overwrite=True)
    peft_multi = tmp_path / "multi"
    lorakit.save_adapter(model, peft_multi)
    lorakit.save_adapter(model, peft_multi / "other")  # PEFT's layout for a second adapter
    with pytest.raises(AdapterFileError, match="not an adapter directory"):
        lorakit.save_adapter(model, peft_multi, overwrite=True)


def test_save_refusals_write_nothing(tmp_path):
    model = lorakit.apply_lora(tiny_llama(), CONFIG)
    with pytest.raises(AdapterError, match="no adapter named 'other'"):
        lorakit.save_adapter(model, tmp_path / "a", "other")
    regex = lorakit.apply_lora(
        tiny_llama(), LoraConfig(r=2, target_modules=r".*q_proj", layers=[0])
    )
    with pytest.raises(ConfigError, match="layers_to_transform"):
        lorakit.save_adapter(regex, tmp_path / "b")
    assert list(tmp_path.iterdir()) == []


# -- interrupted saves --------------------------------------------------------------------------
def fail(error):
    def raise_(*args):
        raise error

    return raise_


@pytest.mark.parametrize("where", ["between the file writes", "renaming the new directory in"])
def test_interrupted_save_keeps_the_old_adapter(saved, monkeypatch, where):
    directory, model = saved
    before = snapshot(directory.parent)
    if where == "between the file writes":  # the tensors are written, then the config fails
        monkeypatch.setattr(safety, "write_file", fail(OSError(28, "No space left on device")))
    else:  # without the atomic exchange: old renamed away, new renamed in (fails), old put back
        monkeypatch.setattr(safety, "_exchange", lambda a, b: False)
        real, calls = os.replace, []

        def replace(src, dst):  # the first call moves the old directory away; the second fails
            calls.append(dst)
            if len(calls) == 2:
                raise OSError(5, "Input/output error")
            real(src, dst)

        monkeypatch.setattr(safety.os, "replace", replace)
    new = randomise(lorakit.apply_lora(tiny_llama(), CONFIG), seed=9)
    with pytest.raises(AdapterFileError, match="no space left on device|input/output error"):
        lorakit.save_adapter(new, directory, overwrite=True)
    monkeypatch.undo()
    assert snapshot(directory.parent) == before  # old files intact, no temporary left
    loaded = lorakit.load_adapter(tiny_llama(), directory)
    assert torch.equal(logits(loaded, tokens(128)), logits(model, tokens(128)))


def test_fallback_replace_succeeds(saved, monkeypatch):
    directory, _ = saved
    monkeypatch.setattr(safety, "_exchange", lambda a, b: False)
    new = randomise(lorakit.apply_lora(tiny_llama(), CONFIG), seed=9)
    lorakit.save_adapter(new, directory, overwrite=True)
    loaded = lorakit.load_adapter(tiny_llama(), directory)
    assert torch.equal(logits(loaded, tokens(128)), logits(new, tokens(128)))
    assert sorted(p.name for p in directory.parent.iterdir()) == ["adapter"]


def test_crash_between_renames_leaves_the_old_adapter_findable(saved):
    """A process killed after renaming the old directory away: the load error says where it is."""
    directory, model = saved
    script = textwrap.dedent(
        f"""
        import os, sys
        sys.path.insert(0, {os.path.dirname(os.path.dirname(__file__))!r})
        import lorakit
        from lorakit.io import safety
        from tiny_models import tiny_llama
        safety._exchange = lambda a, b: False
        real, calls = os.replace, []
        def crash(src, dst):
            calls.append(dst)
            if len(calls) == 2:
                os._exit(3)  # killed: no handler runs
            real(src, dst)
        safety.os.replace = crash
        model = lorakit.apply_lora(tiny_llama(), lorakit.LoraConfig(r=2, target_modules=["q_proj"]))
        lorakit.save_adapter(model, {str(directory)!r}, overwrite=True)
        """
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, timeout=300)
    assert result.returncode == 3, result.stderr.decode()[-2000:]
    with pytest.raises(AdapterFileError, match="interrupted save left the previous adapter") as e:
        lorakit.load_adapter(tiny_llama(), directory)
    old = str(e.value).split("adapter at ")[-1].split(":")[0]
    loaded = lorakit.load_adapter(tiny_llama(), old)
    assert torch.equal(logits(loaded, tokens(128)), logits(model, tokens(128)))
