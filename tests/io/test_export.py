"""Merged export: a plain transformers directory that loads without lorakit and computes what the
base with its adapter computes."""

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from io_models import llama_files, model_dir, snapshot, word_tokenizer

import lorakit
from lorakit import AdapterFileError, LoraConfig
from tiny_models import logits, randomise, tiny_bert, tiny_llama, tokens

CONFIG = LoraConfig(r=4, alpha=8, target_modules="all-linear")


@pytest.fixture
def llama(tmp_path):
    """(base directory, adapter directory, adapted model)."""
    return llama_files(tmp_path, CONFIG)


def load_without_lorakit(out, auto_class, x):
    """Logits from ``out`` loaded by transformers in a process where lorakit cannot be imported."""
    script = textwrap.dedent(
        f"""
        import sys
        sys.modules["lorakit"] = None  # any import of lorakit fails
        import torch, transformers
        model = transformers.{auto_class}.from_pretrained({str(out)!r}).eval()
        assert not any("lorakit" in type(m).__module__ for m in model.modules())
        with torch.no_grad():
            out = model(torch.tensor({x.tolist()})).logits
        torch.save(out, sys.argv[1])
        """
    )
    result_file = out.parent / "result.pt"
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    run = subprocess.run(
        [sys.executable, "-c", script, str(result_file)], capture_output=True, timeout=300, env=env
    )
    assert run.returncode == 0, run.stderr.decode()[-3000:]
    return torch.load(result_file)


def test_export_loads_without_lorakit_and_equals_base_plus_adapter(llama, tmp_path):
    base, adapter, adapted = llama
    out = lorakit.export_merged(base, adapter, tmp_path / "merged")
    names = sorted(p.name for p in out.iterdir())
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= set(names)
    assert "lorakit" not in (out / "config.json").read_text()
    assert not any(n.startswith("adapter") for n in names)

    x = tokens(128)
    merged = load_without_lorakit(out, "AutoModelForCausalLM", x)
    torch.testing.assert_close(merged, logits(adapted, x))
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "adapter",
        "base",
        "merged",
        "result.pt",
    ]  # no temporary directory left


def test_export_shards_and_dtype(llama, tmp_path):
    base, adapter, adapted = llama
    out = lorakit.export_merged(
        base, adapter, tmp_path / "merged", max_shard_size="100KB", dtype="bfloat16"
    )
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.model.layers[0].self_attn.q_proj.weight.dtype == torch.bfloat16
    expected = lorakit.merged_state_dict(adapted)["model.layers.0.self_attn.q_proj.weight"]
    assert torch.equal(model.model.layers[0].self_attn.q_proj.weight, expected.to(torch.bfloat16))


def test_export_a_classifier_with_its_saved_head(tmp_path):
    base = model_dir(tmp_path / "base", tiny_bert())
    config = LoraConfig(r=4, target_modules=["query", "value"], modules_to_save=["classifier"])
    adapted = randomise(lorakit.apply_lora(tiny_bert(), config))
    lorakit.save_adapter(adapted, tmp_path / "adapter")
    out = lorakit.export_merged(base, tmp_path / "adapter", tmp_path / "merged")
    from transformers import AutoModelForSequenceClassification

    merged = AutoModelForSequenceClassification.from_pretrained(out).eval()
    assert not (out / "tokenizer.json").exists()  # the base had no tokenizer
    torch.testing.assert_close(logits(merged, tokens(100)), logits(adapted, tokens(100)))


def test_export_from_a_model_object(llama, tmp_path):
    _, adapter, adapted = llama
    out = lorakit.export_merged(
        tiny_llama(), adapter, tmp_path / "merged", tokenizer=word_tokenizer()
    )
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(out).eval()
    assert AutoTokenizer.from_pretrained(out)("w1 w2")["input_ids"] == [1, 2]
    torch.testing.assert_close(logits(model, tokens(128)), logits(adapted, tokens(128)))


def test_export_refuses_to_replace_and_writes_nothing_on_error(llama, tmp_path):
    base, adapter, _ = llama
    out = lorakit.export_merged(base, adapter, tmp_path / "merged")
    before = snapshot(tmp_path)
    with pytest.raises(AdapterFileError, match="overwrite=True"):
        lorakit.export_merged(base, adapter, out)
    other = model_dir(tmp_path / "other", tiny_llama(seed=3))
    with pytest.raises(AdapterFileError, match="another base model"):
        lorakit.export_merged(other, adapter, tmp_path / "never")
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "a.txt").write_text("mine")
    with pytest.raises(AdapterFileError, match="not a model directory"):
        lorakit.export_merged(base, adapter, tmp_path / "notes", overwrite=True)
    after = snapshot(tmp_path)
    assert {k: v for k, v in after.items() if not k.startswith(("other", "notes"))} == before
    assert not (tmp_path / "never").exists()
    lorakit.export_merged(base, adapter, out, overwrite=True)


@pytest.mark.slow
def test_export_the_embedded_gguf_model(tmp_path, monkeypatch):
    """The embedded SmolLM2 GGUF base: dequantized float weights, exported as a plain model."""
    monkeypatch.setenv("LORAKIT_CACHE", str(tmp_path / "cache"))
    from lorakit.models import load_model

    model, tokenizer = load_model(use_cache=False)
    config = LoraConfig(r=2, target_modules=["q_proj"], layers=[0])
    lorakit.save_adapter(randomise(lorakit.apply_lora(model, config)), tmp_path / "adapter")
    del model
    # the adapter names its base by the public id, which resolves to the embedded model
    text = (tmp_path / "adapter" / "adapter_config.json").read_text()
    assert json.loads(text)["base_model_name_or_path"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert ".cache" not in text and "site-packages" not in text
    from lorakit.io.base_models import adapter_base

    assert adapter_base(tmp_path / "adapter", "pass BASE") is None
    # the first load of the GGUF file: a model transformers would refuse to save as it is
    out = lorakit.export_merged("default", tmp_path / "adapter", tmp_path / "merged")
    assert "quantization_config" not in json.loads((out / "config.json").read_text())

    from transformers import AutoModelForCausalLM

    merged = AutoModelForCausalLM.from_pretrained(out).eval()
    # the reference from the converted copy, as the export was loaded: a model built from the
    # GGUF file itself computes logits that differ by about 6e-5 with the same weights
    reference, _ = load_model()
    reference = lorakit.load_adapter(reference, tmp_path / "adapter")
    x = tokenizer("Hello", return_tensors="pt")["input_ids"]
    unmerged = logits(reference, x)
    torch.testing.assert_close(logits(merged, x), logits(lorakit.merge_and_unload(reference), x))
    # W x + s·B A x and (W + s·B A) x round differently: the logits move by about 1e-4
    torch.testing.assert_close(logits(merged, x), unmerged, atol=1e-3, rtol=1e-3)


def test_overwrite_keeps_a_directory_holding_the_users_own_files(llama, tmp_path, capsys):
    """A merged model with the user's notes beside it: replaced neither by the library nor by
    ``lorakit merge --overwrite``; the error names the directory and the foreign files."""
    base, adapter, _ = llama
    out = lorakit.export_merged(base, adapter, tmp_path / "merged")
    (out / "notes.txt").write_text("mine")
    (out / "eval").mkdir()
    before = snapshot(tmp_path)
    with pytest.raises(AdapterFileError) as err:
        lorakit.export_merged(base, adapter, out, overwrite=True)
    assert str(out) in str(err.value) and "did not write (eval, notes.txt)" in str(err.value)
    from lorakit.cli.main import main

    assert main(["merge", str(base), str(adapter), str(out), "--overwrite"]) == 2
    assert "notes.txt" in capsys.readouterr().err
    assert snapshot(tmp_path) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter", "base", "merged"]
    (out / "notes.txt").unlink()
    (out / "eval").rmdir()
    lorakit.export_merged(base, adapter, out, overwrite=True, max_shard_size="100KB")
    # a sharded export replaces a single-file one and back: every file is lorakit's
    lorakit.export_merged(base, adapter, out, overwrite=True)


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_the_merged_directory_and_its_files_get_the_umasks_modes(llama, tmp_path, umask):
    """0755/0644 under umask 022, as transformers' own directories: not mkdtemp's or mkstemp's
    0700/0600, which other users, servers and containers cannot read."""
    base, adapter, _ = llama
    old = os.umask(umask)
    try:
        out = lorakit.export_merged(base, adapter, tmp_path / "merged", max_shard_size="100KB")
    finally:
        os.umask(old)
    assert out.stat().st_mode & 0o777 == 0o777 & ~umask
    assert {p.stat().st_mode & 0o777 for p in out.iterdir()} == {0o666 & ~umask}
