"""The base an adapter records, and the dtype a base directory records.

:func:`adapter_base` finds the base an adapter directory records (``base_model_name_or_path``) as
a source for ``lorakit.models.load_model``: the embedded model, a path that exists, or a hub id in
the local Hugging Face cache. Nothing is downloaded. Loading itself lives in ``lorakit.models``.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

from ..models import DEFAULT_MODEL_ID, ModelLoadError, is_embedded, public_name


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
    :func:`~lorakit.models.load_model`: None for the embedded model (or when the adapter records
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
