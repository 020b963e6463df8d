"""Base models for ``export`` and ``inspect``: loaded with weights, or built on the meta device.

A base is named by a transformers model directory, a ``.gguf`` file, or ``None`` / ``"default"``
for the embedded SmolLM2-135M-Instruct (see ``lorakit.models``). A directory is loaded with the
class its ``config.json`` names in ``architectures`` (a classifier stays a classifier), and its
tokenizer when it has tokenizer files. Nothing is downloaded.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from ..models import ModelLoadError, embedded_model_path, load_model

DEFAULT_NAMES = (None, "default")
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


def _offline() -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def _model_class(config: Any):
    """The transformers class ``config.architectures`` names, else ``AutoModelForCausalLM``."""
    import transformers

    for name in getattr(config, "architectures", None) or ():
        cls = getattr(transformers, name, None)
        if cls is not None:
            return cls
    return transformers.AutoModelForCausalLM


def _checked_dir(path: Path) -> Path:
    if not (path / "config.json").is_file():
        raise ModelLoadError(f"{path} is not a transformers model directory (no config.json)")
    return path


def load_base(source: str | os.PathLike | None, dtype: Any = None) -> tuple[Any, Any]:
    """(model, tokenizer or None) for a base named as in the module docstring."""
    import torch

    if source in DEFAULT_NAMES or str(source).endswith(".gguf"):
        return load_model(None if source in DEFAULT_NAMES else source, dtype=dtype)
    path = Path(source)
    if not path.exists():
        raise ModelLoadError(f"base model {str(path)!r} does not exist")
    _checked_dir(path)
    _offline()
    from transformers import AutoConfig, AutoTokenizer

    config = AutoConfig.from_pretrained(path, local_files_only=True)
    model = _model_class(config).from_pretrained(
        path, dtype=dtype or torch.float32, local_files_only=True
    )
    tokenizer = None
    if any((path / name).is_file() for name in _TOKENIZER_FILES):
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    return model.eval(), tokenizer


def meta_base(source: str | os.PathLike | None) -> Any:
    """The base model's modules on the meta device: shapes without weights, in about a second.

    A ``.gguf`` file's config is read from its converted copy when ``load_model`` has cached one,
    else from the file itself (several seconds for its metadata).
    """
    import torch

    _offline()
    from transformers import AutoConfig

    if source in DEFAULT_NAMES or str(source).endswith(".gguf"):
        gguf = embedded_model_path() if source in DEFAULT_NAMES else Path(source)
        if not gguf.is_file():
            raise ModelLoadError(f"base model {str(gguf)!r} does not exist")
        from ..models import _gguf_cache_path

        cached = _gguf_cache_path(gguf)
        if (cached / "config.json").is_file():
            config = AutoConfig.from_pretrained(cached, local_files_only=True)
        else:
            config = AutoConfig.from_pretrained(
                gguf.parent, gguf_file=gguf.name, local_files_only=True
            )
    else:
        path = Path(source)
        if not path.exists():
            raise ModelLoadError(f"base model {str(path)!r} does not exist")
        config = AutoConfig.from_pretrained(_checked_dir(path), local_files_only=True)
    cls = _model_class(config)
    with torch.device("meta"):
        if hasattr(cls, "_from_config"):
            return cls._from_config(config)
        return cls.from_config(config)


def recorded_dtype(source: str | os.PathLike | None) -> str | None:
    """The dtype a model directory's config.json records (``dtype`` or ``torch_dtype``)."""
    if source in DEFAULT_NAMES or str(source).endswith(".gguf"):
        return None
    try:
        config = json.loads((Path(source) / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    value = config.get("dtype") or config.get("torch_dtype") if isinstance(config, dict) else None
    return value if isinstance(value, str) else None
