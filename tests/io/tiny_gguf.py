"""A tiny Llama base as llama.cpp loads it, and llama.cpp's logits through its Python binding.

The base GGUF is written by lorakit's own converter (``write_model_gguf``, the writer of merged
models) from a tiny transformers ``LlamaForCausalLM`` with random float32 weights and a small
SentencePiece-style ("llama") vocabulary built here: llama.cpp needs a vocabulary to load a model,
but the tests feed it token ids, so the pieces' text does not matter. llama.cpp itself is
``llama-cpp-python`` (requirements/test.txt); tests skip, saying why, where it is not installed.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from lorakit.io.gguf_model import write_model_gguf

# Token ids fed to both lorakit and llama.cpp: no special tokens, every position compared.
PROMPT = [5, 17, 42, 9, 63, 28, 7, 90]


def add_tiny_vocab(writer, n_vocab: int) -> None:
    """An SPM vocabulary of ``n_vocab`` pieces: <unk>, <s>, </s>, the newline byte llama.cpp
    looks up on load, then plain pieces."""
    import gguf

    tokens = ["<unk>", "<s>", "</s>", "<0x0A>"] + [f"\u2581t{i}" for i in range(4, n_vocab)]
    types = [gguf.TokenType.UNKNOWN, gguf.TokenType.CONTROL, gguf.TokenType.CONTROL]
    types += [gguf.TokenType.BYTE] + [gguf.TokenType.NORMAL] * (n_vocab - 4)
    writer.add_tokenizer_model("llama")
    writer.add_token_list(tokens)
    writer.add_token_scores([-float(i) for i in range(n_vocab)])
    writer.add_token_types([int(t) for t in types])
    writer.add_unk_token_id(0)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_add_bos_token(False)


def write_base(model, directory: Path) -> tuple[Path, Path]:
    """``model`` saved as a transformers directory and as a float32 GGUF; both paths."""
    hf_dir = directory / "base"
    model.save_pretrained(hf_dir)
    config = json.loads((hf_dir / "config.json").read_text())
    vocab = config["vocab_size"]
    path = directory / "base.gguf"
    state = {k: v.detach() for k, v in model.state_dict().items()}
    write_model_gguf(path, config, state, lambda w: add_tiny_vocab(w, vocab))
    return hf_dir, path


def llama_cpp():
    """The ``llama_cpp`` module, or a skip naming why it cannot be used."""
    return pytest.importorskip(
        "llama_cpp", reason="llama-cpp-python (llama.cpp's binding) is not installed"
    )


def llama_logits(model_path: Path, tokens=PROMPT, lora: Path | None = None) -> torch.Tensor:
    """llama.cpp's logits (len(tokens), vocab) for ``tokens`` on ``model_path`` (+ ``lora``),
    one thread, float32 K/V cache (llama.cpp's default float16 cache would round K and V)."""
    lib = llama_cpp()
    llm = lib.Llama(
        model_path=str(model_path),
        lora_path=None if lora is None else str(lora),
        n_ctx=64,
        n_batch=64,
        n_threads=1,
        n_threads_batch=1,
        logits_all=True,
        type_k=lib.GGML_TYPE_F32,
        type_v=lib.GGML_TYPE_F32,
        verbose=False,
    )
    try:
        llm.eval(list(tokens))
        return torch.from_numpy(np.array(llm.scores[: len(tokens)], dtype=np.float32))
    finally:
        llm.close()
