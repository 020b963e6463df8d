"""Helpers of the adapter-file tests: directories on disk, snapshots, tokenizers."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

import lorakit
from tiny_models import randomise, tiny_llama


def snapshot(root: Path) -> dict[str, str]:
    """{relative path: sha256} of every file under root: proof that nothing on disk changed."""
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def model_state(model: nn.Module):
    """Everything about a model that a failed load must leave alone."""
    return (
        sorted(model.state_dict()),
        [p.requires_grad for p in model.parameters()],
        [type(m).__name__ for m in model.modules()],
        lorakit.list_adapters(model),
        lorakit.active_adapter(model),
    )


def assert_refused(directory, error, match, model=None, **kwargs) -> str:
    """Loading fails with ``error`` matching ``match``; the disk and the model are unchanged.
    Returns the message."""
    model = tiny_llama() if model is None else model
    before_disk, before_model = snapshot(directory.parent), model_state(model)
    with pytest.raises(error, match=match) as info:
        lorakit.load_adapter(model, directory, **kwargs)
    assert snapshot(directory.parent) == before_disk
    assert model_state(model) == before_model
    return str(info.value)


def rewrite(directory: Path, change=None, metadata: dict[str, str] | None = None) -> None:
    """Apply ``change(tensors)`` to an adapter file's tensors and set the ``metadata`` entries
    given; the rest of the file is kept."""
    path = directory / "adapter_model.safetensors"
    with safe_open(path, framework="pt") as f:
        kept = dict(f.metadata() or {})
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    if change is not None:
        change(tensors)
    kept.update(metadata or {})
    save_file(tensors, path, kept)


def adapter_state(model: nn.Module, name: str = "default") -> dict[str, torch.Tensor]:
    """The adapter's tensors by lorakit's own state-dict keys."""
    ids = {id(p) for p in lorakit.adapter_parameters(model, name)}
    return {
        k: v.detach().clone() for k, v in model.state_dict(keep_vars=True).items() if id(v) in ids
    }


def word_tokenizer(vocab: int = 128):
    """A word-level tokenizer built in code ("w0 w1 ..."), so model directories are complete."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = {f"w{i}": i for i in range(vocab - 1)} | {"[UNK]": vocab - 1}
    tok = Tokenizer(models.WordLevel(words, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]")


def model_dir(root: Path, model: nn.Module, tokenizer=None) -> Path:
    """Save ``model`` (and a tokenizer) as a transformers directory under ``root``."""
    model.save_pretrained(root)
    if tokenizer is not None:
        tokenizer.save_pretrained(root)
    return root


def llama_files(root: Path, config) -> tuple[Path, Path, nn.Module]:
    """(base directory with a tokenizer, adapter directory, the adapted model) for a tiny Llama."""
    base = model_dir(root / "base", tiny_llama(), word_tokenizer())
    adapted = randomise(lorakit.apply_lora(tiny_llama(), config))
    lorakit.save_adapter(adapted, root / "adapter")
    return base, root / "adapter", adapted
