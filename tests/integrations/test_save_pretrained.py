"""``model.save_pretrained`` on a lorakit-adapted transformers model writes its adapters in the
layout of ``PeftModel.save_pretrained`` (``default`` or a single adapter in the directory, others
in subfolders), which PEFT and ``lorakit.integrations.load_adapters`` read back; other files in
the directory are left alone. Outputs against PEFT at ``assert_close``'s default tolerances (PEFT
orders the float32 operations differently)."""

import os
import subprocess
import sys
from pathlib import Path

import peft
import pytest
import torch

import lorakit
from lorakit import AdapterFileError, LoraConfig
from lorakit.integrations import load_adapters
from tiny_models import LLAMA, logits, randomise, tiny_llama, tokens

FIRST = LoraConfig(r=4, target_modules=["q_proj", "v_proj"])
SECOND = LoraConfig(r=2, alpha=4, target_modules=["o_proj"])


def _model(names, seed=2):
    model = tiny_llama()
    for name, config in zip(names, (FIRST, SECOND), strict=False):
        lorakit.apply_lora(model, config, name)
    return randomise(model, seed)


def _adapters(model):
    return {k: v for k, v in model.state_dict().items() if ".lora_" in k}


def test_default_in_the_directory_others_in_subfolders_as_peft_writes(tmp_path):
    ours = _model(["default", "b"])
    ours.save_pretrained(tmp_path)
    assert {"adapter_config.json", "adapter_model.safetensors", "b"} <= set(os.listdir(tmp_path))
    x = tokens(LLAMA["vocab_size"])
    theirs = peft.PeftModel.from_pretrained(tiny_llama(), str(tmp_path))
    theirs.load_adapter(str(tmp_path / "b"), "b")
    for name in ("default", "b"):
        lorakit.set_adapter(ours, name)
        theirs.set_adapter(name)
        torch.testing.assert_close(logits(theirs.eval(), x), logits(ours, x))

    again = _model(["default", "b"], seed=7)  # other values, to be replaced by the files'
    assert load_adapters(again, tmp_path) == {"default": tmp_path, "b": tmp_path / "b"}
    mine, saved = _adapters(again), _adapters(ours)
    assert mine.keys() == saved.keys() and all(torch.equal(mine[k], saved[k]) for k in mine)


def test_a_single_adapter_goes_in_the_directory_whatever_its_name(tmp_path):
    model = _model(["sql"])
    model.save_pretrained(tmp_path)
    assert sorted(os.listdir(tmp_path)) == ["adapter_config.json", "adapter_model.safetensors"]
    back = lorakit.load_adapter(tiny_llama(), tmp_path, "sql")
    x = tokens(LLAMA["vocab_size"])
    torch.testing.assert_close(logits(back, x), logits(model, x), rtol=0, atol=0)


def test_saving_again_replaces_the_adapter_files_and_nothing_else(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    model = _model(["x", "y"])
    model.save_pretrained(tmp_path)
    assert sorted(os.listdir(tmp_path)) == ["notes.txt", "x", "y"]  # no default: both in folders
    randomise(model, seed=9)
    model.save_pretrained(tmp_path)
    assert sorted(os.listdir(tmp_path)) == ["notes.txt", "x", "y"]  # no temporary files left
    assert sorted(os.listdir(tmp_path / "x")) == [
        "adapter_config.json",
        "adapter_model.safetensors",
    ]
    fresh = _model(["x", "y"], seed=3)
    load_adapters(fresh, tmp_path)
    assert all(torch.equal(v, _adapters(model)[k]) for k, v in _adapters(fresh).items())
    assert (tmp_path / "notes.txt").read_text() == "mine"


def test_only_the_main_process_writes_and_nothing_goes_to_a_hub(tmp_path):
    model = _model(["default"])
    model.save_pretrained(tmp_path / "rank1", is_main_process=False)
    assert not (tmp_path / "rank1").exists()
    with pytest.raises(AdapterFileError, match="push_to_hub=True.*locally"):
        model.save_pretrained(tmp_path / "hub", push_to_hub=True)


def test_loading_a_directory_without_the_models_adapters_names_what_is_missing(tmp_path):
    _model(["default"]).save_pretrained(tmp_path)
    with pytest.raises(AdapterFileError, match=r"missing 'b' \(.*b/adapter_config.json\)"):
        load_adapters(_model(["default", "b"]), tmp_path)


def test_an_adapter_whose_init_rewrote_the_base_is_not_read_back(tmp_path):
    """Its files hold the plain LoRA of the original base (rank doubled), not its own tensors."""
    config = LoraConfig(r=2, init="pissa", target_modules=["q_proj"])
    lorakit.apply_lora(tiny_llama(), config).save_pretrained(tmp_path)
    with pytest.raises(AdapterFileError, match="'default' \\(init='pissa'\\).*lorakit train"):
        load_adapters(lorakit.apply_lora(tiny_llama(), config), tmp_path)


def test_importing_the_integrations_imports_no_optional_library():
    code = (
        "import sys, torch, lorakit, lorakit.integrations\n"
        "lorakit.apply_lora(torch.nn.Sequential(torch.nn.Linear(4, 4)), lorakit.LoraConfig(r=2))\n"
        "print(sorted(m for m in ('transformers', 'peft', 'trl', 'datasets') if m in sys.modules))"
    )
    src = str(Path(lorakit.__file__).resolve().parents[1])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([src, os.environ.get("PYTHONPATH", "")])}
    result = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
    )
    assert result.stdout.strip() == "[]"
