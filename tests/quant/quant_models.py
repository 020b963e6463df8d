"""The tiny Llama the quantization tests share (built in code, random weights): the shared one
with an odd vocabulary, so embedding and head sizes are no multiple of a quantization block."""

from __future__ import annotations

import tiny_models

LLAMA = {**tiny_models.LLAMA, "vocab_size": 97, "max_position_embeddings": 64}


def tiny_llama(seed: int = 0, **overrides):
    return tiny_models.tiny_llama(
        seed, **{"vocab_size": 97, "max_position_embeddings": 64, **overrides}
    )
