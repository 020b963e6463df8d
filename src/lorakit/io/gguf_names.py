"""What a GGUF export needs to know of the base: its architecture, tensor names and row order.

llama.cpp names a Llama's tensors ``blk.<i>.attn_q.weight``, ``token_embd.weight``, ... where
transformers says ``model.layers.<i>.self_attn.q_proj.weight``, ``model.embed_tokens.weight``. The
names are never written here by hand: :func:`gguf_name` asks the ``gguf`` package's own table
(``gguf.get_tensor_name_map``, the one llama.cpp's converter uses) for the base's architecture.

The base converter also reorders rows. transformers' Llama rotates the two *halves* of each head
(``rotate_half``); llama.cpp's ``llama`` architecture rotates *adjacent pairs*, so its converter
permutes the rows of ``q_proj`` and ``k_proj``: per head of ``d`` rows, row ``j·d/2 + i`` (half
``j`` of pair ``i``) moves to ``2i + j`` (:func:`permute_rows`). A weight ``W`` (out, in) becomes
``P W``; a LoRA delta ``B A`` must become ``P B A``, so only B's rows move: ``(P B) A``. Qwen2 keeps
the halves (llama.cpp runs it with NeoX rotation) and nothing moves.

:class:`GgufBase` is read from a transformers directory (``config.json``, no weights) or from a
GGUF file (its metadata and tensor names, no tensor data); the embedded model is its GGUF file.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
from pathlib import Path

import torch

from ..errors import ConfigError
from ..models import embedded_model_path, is_embedded

# transformers' class name -> llama.cpp's architecture, as llama.cpp's converter registers them.
ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "llama",
    "Qwen2ForCausalLM": "qwen2",
}
# llama.cpp architectures whose converter permutes the rows of q and k (module docstring).
PERMUTED = {"llama"}


@dataclasses.dataclass(frozen=True)
class GgufBase:
    """The base model as a GGUF export sees it."""

    source: str  # the base as messages name it
    path: str  # its directory or .gguf file
    arch: str  # llama.cpp's general.architecture
    n_layers: int
    n_head: int
    n_head_kv: int
    tied: bool  # the output layer shares token_embd (no output.weight)
    # a GGUF base's tensors, name -> torch's shape ((out, in) for a weight); None for a directory
    tensors: dict[str, tuple[int, ...]] | None = None

    def shape(self, name: str) -> tuple[int, ...] | None:
        """The shape of the base's tensor ``name`` (``()`` where only a GGUF file would know it),
        or None when the base's GGUF has (or will have) no such tensor."""
        if self.tensors is not None:
            return self.tensors.get(name)
        return None if self.tied and name == "output.weight" else ()


def gguf_base(base: str | os.PathLike | None) -> GgufBase:
    """The :class:`GgufBase` of a transformers directory, a ``.gguf`` file, or the embedded model
    (None, ``"default"`` or its hub id)."""
    if is_embedded(base):
        return dataclasses.replace(_from_gguf(embedded_model_path()), source="the embedded model")
    path = Path(base)
    if path.is_dir():
        return _from_config(path)
    if path.suffix == ".gguf" and path.is_file():
        return _from_gguf(path)
    raise ConfigError(
        f"base {str(base)!r}: expected a transformers model directory or a .gguf file "
        f"(it {'is neither' if path.exists() else 'does not exist'})"
    )


def _from_config(path: Path) -> GgufBase:
    config_file = path / "config.json"
    try:
        config = json.loads(config_file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{config_file}: cannot read the base's config: {exc}") from None
    return base_from_config({**config, **config.get("text_config", {})}, str(path))


def base_from_config(config: dict, source: str) -> GgufBase:
    """The :class:`GgufBase` a transformers ``config.json`` (as a dict) describes."""
    arch = check_architecture((config.get("architectures") or ["(none)"])[0], source)
    n_head = int(config["num_attention_heads"])
    return GgufBase(
        source=source,
        path=source,
        arch=arch,
        n_layers=int(config["num_hidden_layers"]),
        n_head=n_head,
        n_head_kv=int(config.get("num_key_value_heads") or n_head),
        tied=bool(config.get("tie_word_embeddings", False)),
    )


def check_architecture(hf_class: str, source: str) -> str:
    """llama.cpp's architecture for a transformers class, or a ``ConfigError`` naming it."""
    if hf_class not in ARCHITECTURES:
        raise ConfigError(
            f"{source}: architecture {hf_class!r} is not supported for GGUF export; "
            f"supported: {', '.join(sorted(ARCHITECTURES))}"
        )
    return ARCHITECTURES[hf_class]


def _from_gguf(path: Path) -> GgufBase:
    import gguf

    from .gguf_read import read_gguf

    file = read_gguf(path)
    arch = _field(file, gguf.Keys.General.ARCHITECTURE)
    if arch not in set(ARCHITECTURES.values()):
        raise ConfigError(
            f"{path}: GGUF architecture {arch!r} is not supported for GGUF export; supported: "
            f"{', '.join(sorted(set(ARCHITECTURES.values())))}"
        )
    n_head = int(_field(file, gguf.Keys.Attention.HEAD_COUNT.format(arch=arch)))
    shapes = {t.name: t.shape for t in file.tensors}
    return GgufBase(
        source=str(path),
        path=str(path),
        arch=arch,
        n_layers=int(_field(file, gguf.Keys.LLM.BLOCK_COUNT.format(arch=arch))),
        n_head=n_head,
        n_head_kv=int(file.value(gguf.Keys.Attention.HEAD_COUNT_KV.format(arch=arch), n_head)),
        tied="output.weight" not in shapes,
        tensors=shapes,
    )


def _field(file, key: str):
    if key not in file.fields:
        raise ConfigError(f"{file.path}: the GGUF file has no {key!r}: not a model llama.cpp loads")
    return file.value(key)


def gguf_name(base: GgufBase, hf_key: str) -> str | None:
    """llama.cpp's name for the transformers tensor ``hf_key`` (``...q_proj.weight`` ->
    ``blk.0.attn_q.weight``), from the ``gguf`` package's table; None if it has none."""
    return _table(base.arch, base.n_layers).get_name(hf_key, try_suffixes=(".weight", ".bias"))


@functools.lru_cache(maxsize=8)
def _table(arch_name: str, n_layers: int):
    import gguf

    arch = next(k for k, v in gguf.MODEL_ARCH_NAMES.items() if v == arch_name)
    return gguf.get_tensor_name_map(arch, n_layers)


def heads_permuted(base: GgufBase, name: str) -> int | None:
    """The head count whose row permutation the converter applies to GGUF tensor ``name``:
    ``n_head`` for ``attn_q``, ``n_head_kv`` for ``attn_k``; None when rows stay in place."""
    if base.arch not in PERMUTED:
        return None
    kind = name.split(".")[2] if name.startswith("blk.") else ""
    return {"attn_q": base.n_head, "attn_k": base.n_head_kv}.get(kind)


def permute_rows(rows: torch.Tensor, n_head: int) -> torch.Tensor:
    """``rows`` (out, ...) reordered per head from halves to adjacent pairs (module docstring):
    viewed as (heads, 2, d/2, ...) with the two middle axes swapped."""
    out = rows.shape[0]
    if out % (2 * n_head):
        raise ConfigError(f"{out} rows do not split into {n_head} heads of an even size")
    grouped = rows.reshape(n_head, 2, out // n_head // 2, *rows.shape[1:])
    return grouped.transpose(1, 2).reshape(rows.shape)


def unpermute_rows(rows: torch.Tensor, n_head: int) -> torch.Tensor:
    """The inverse of :func:`permute_rows`: a GGUF file's q or k rows in transformers' order."""
    out = rows.shape[0]
    grouped = rows.reshape(n_head, out // n_head // 2, 2, *rows.shape[1:])
    return grouped.transpose(1, 2).reshape(rows.shape)


def to_hf(base: GgufBase, name: str, weight: torch.Tensor) -> torch.Tensor:
    """GGUF tensor ``name`` of ``base`` in transformers' row order."""
    heads = heads_permuted(base, name)
    return weight if heads is None else unpermute_rows(weight, heads)


def to_gguf(base: GgufBase, name: str, weight: torch.Tensor) -> torch.Tensor:
    """A transformers tensor in the row order of GGUF tensor ``name`` of ``base``."""
    heads = heads_permuted(base, name)
    return weight if heads is None else permute_rows(weight, heads)
