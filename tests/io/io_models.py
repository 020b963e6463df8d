"""Helpers of the adapter-file tests: directories on disk, snapshots, tokenizers."""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch
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
