"""Base models for ``export`` and ``inspect``: loaded with weights, or built on the meta device.

A base is named by a transformers model directory, a ``.gguf`` file, or ``None`` / ``"default"``
/ ``"HuggingFaceTB/SmolLM2-135M-Instruct"`` for the embedded model (see ``lorakit.models``). A
directory is loaded with the class its ``config.json`` names in ``architectures`` (a classifier
stays a classifier), and its tokenizer when it has tokenizer files. Nothing is downloaded.
:func:`adapter_base` finds the base an adapter directory records.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

from ..models import (
    DEFAULT_MODEL_ID,
    ModelLoadError,
    check_model_dir,
    embedded_model_path,
    is_embedded,
    load_errors,
    load_model,
    public_name,
    set_name,
)

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


def load_base(source: str | os.PathLike | None, dtype: Any = None) -> tuple[Any, Any]:
    """(model, tokenizer or None) for a base named as in the module docstring."""
    import torch

    if is_embedded(source) or str(source).endswith(".gguf"):
        return load_model(source, dtype=dtype)
    path = Path(source)
    if not path.exists():
        raise ModelLoadError(f"base model {str(path)!r} does not exist")
    check_model_dir(path)
    _offline()
    from transformers import AutoConfig, AutoTokenizer

    with load_errors(path):
        config = AutoConfig.from_pretrained(path, local_files_only=True)
        model = _model_class(config).from_pretrained(
            path, dtype=dtype or torch.float32, local_files_only=True
        )
        tokenizer = None
        if any((path / name).is_file() for name in _TOKENIZER_FILES):
            tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    set_name(model, str(source))
    return model.eval(), tokenizer


def meta_base(source: str | os.PathLike | None) -> Any:
    """The base model's modules on the meta device: shapes without weights, in about a second.

    A ``.gguf`` file's config is read from its converted copy when ``load_model`` has cached one,
    else from the file itself (several seconds for its metadata).
    """
    import torch

    _offline()
    from transformers import AutoConfig

    if is_embedded(source) or str(source).endswith(".gguf"):
        gguf = embedded_model_path() if is_embedded(source) else Path(source)
        if not gguf.is_file():
            raise ModelLoadError(f"base model {str(gguf)!r} does not exist")
        from ..models import _gguf_cache_path

        cached = _gguf_cache_path(gguf)
        with load_errors(gguf):
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
        with load_errors(path):
            config = AutoConfig.from_pretrained(check_model_dir(path), local_files_only=True)
    cls = _model_class(config)
    with torch.device("meta"):
        if hasattr(cls, "_from_config"):
            return cls._from_config(config)
        return cls.from_config(config)


def recorded_dtype(source: str | os.PathLike | None) -> str | None:
    """The dtype a model directory's config.json records (``dtype`` or ``torch_dtype``)."""
    if is_embedded(source) or str(source).endswith(".gguf"):
        return None
    try:
        config = json.loads((Path(source) / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    value = config.get("dtype") or config.get("torch_dtype") if isinstance(config, dict) else None
    return value if isinstance(value, str) else None


_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")


def adapter_base(adapter: str | os.PathLike, how_to_pass: str) -> str | None:
    """The base model the adapter directory ``adapter`` records, as a source for
    :func:`load_base` or ``load_model``: None for the embedded model (or when the adapter records
    no base, as an adapter of a model built in code does), a path that exists, or the snapshot
    directory of a hub id found in the local Hugging Face cache. Nothing is downloaded.

    A recorded path that does not exist, or a hub id not in the local cache, is a
    ``ModelLoadError`` that names the recorded base and says ``how_to_pass`` the base instead.
    """
    from .adapter import read_adapter

    recorded = read_adapter(adapter, tensors=False).config.get("base_model_name_or_path")
    if recorded is None or recorded == "":
        return None
    if not isinstance(recorded, str):
        raise ModelLoadError(
            f"{Path(adapter) / 'adapter_config.json'}: base_model_name_or_path must be a string, "
            f"not {recorded!r}; {how_to_pass}"
        )
    if Path(recorded).exists():
        return recorded
    if public_name(recorded) == DEFAULT_MODEL_ID:
        return None
    snapshot = _hub_snapshot(recorded) if _HUB_ID.fullmatch(recorded) else None
    if snapshot is not None:
        return snapshot
    what = (
        "neither a path that exists nor a hub model in the local Hugging Face cache (lorakit "
        "downloads nothing)"
        if _HUB_ID.fullmatch(recorded)
        else "a path that does not exist"
    )
    raise ModelLoadError(
        f"the adapter {adapter} records its base model as {recorded!r}, {what}; {how_to_pass}"
    )


def _hub_snapshot(repo_id: str) -> str | None:
    """The local snapshot directory of a hub model, if the Hugging Face cache holds one."""
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return None
    try:
        found = try_to_load_from_cache(repo_id, "config.json")
    except ValueError:  # not a valid repository id after all
        return None
    return str(Path(found).parent) if isinstance(found, str) else None
