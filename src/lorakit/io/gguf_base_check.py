"""The base check of a GGUF export: the adapter's recorded base against the base given.

``load_adapter`` compares the fingerprint an adapter records (``fingerprint``) with the model's;
a GGUF export loads no model, so the same fingerprint is computed from the base's files: the
shapes of the adapted weights and the hash of a strided sample of their values, in transformers'
layout (a GGUF base's q and k rows put back in transformers' order, see ``gguf_names``).

A GGUF base whose weights are quantized (Q4_1, Q8_0, ...) is compared by architecture and shapes
only, as a 4-bit base is against its float original (``fingerprint.differences``): an adapter
trained on the float weights is meant for their quantized copy. llama.cpp groups Llama and
Mistral under ``llama``, so a GGUF base names its architecture only up to that.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable

import torch

from ..layers.init import sample_of
from . import fingerprint as fp
from .adapter import AdapterFile, check_recorded_base
from .gguf_names import ARCHITECTURES, GgufBase, gguf_name, to_hf

_FLOATS = {"F32": "float32", "F16": "float16", "BF16": "bfloat16"}


def check_base(file: AdapterFile, base: GgufBase, allow: bool = False) -> None:
    """Raise ``AdapterFileError`` (a warning with ``allow``) when the adapter ``file`` records a
    base other than ``base`` (its ``.gguf`` file or directory is read for the weights)."""

    def actual_of(saved: dict) -> dict:
        if base.tensors is not None:
            return _from_gguf(saved, base, base.path)
        return _from_dir(saved, base.path)

    check_recorded_base(
        file,
        actual_of,
        allow,
        verb="export",
        gerund="exporting",
        unchecked="exporting without checking the base model",
        than=f" than {base.source}",
    )


def _from_gguf(saved: dict, base: GgufBase, path) -> dict:
    from .gguf_read import decode, read_gguf

    tensors = {t.name: t for t in read_gguf(path).tensors}
    names = {p: gguf_name(base, f"{p}.weight") for p in saved["modules"]}
    kinds = sorted({tensors[n].tensor_type.name for n in names.values() if n in tensors})
    quantized = [k for k in kinds if k not in _FLOATS]
    # float weights are compared by value; quantized ones (named by their type) are not
    dtype = quantized[0].lower() if quantized else _FLOATS[kinds[0]] if kinds else None

    def weight(path: str) -> torch.Tensor | None:
        name = names[path]
        if name not in tensors:
            return None
        return to_hf(base, name, decode(tensors[name])) if dtype in _FLOATS.values() else None

    same = ARCHITECTURES.get(saved.get("architecture")) == base.arch
    return _fingerprint(
        saved,
        saved.get("architecture") if same else f"a GGUF {base.arch} model",
        saved.get("model_type") if same else base.arch,
        dtype,
        {p: tensors[n].shape if n in tensors else None for p, n in names.items()},
        weight,
    )


def _from_dir(saved: dict, directory) -> dict:
    from pathlib import Path

    from safetensors import safe_open

    root = Path(directory)
    config = json.loads((root / "config.json").read_text(encoding="utf-8"))
    where = {}
    for f in sorted(root.glob("*.safetensors")):
        with safe_open(f, "pt") as handle:
            where.update({key: f for key in handle.keys()})

    def load(path: str) -> torch.Tensor | None:
        key = f"{path}.weight"
        if key not in where:
            return None
        with safe_open(where[key], "pt") as handle:
            return handle.get_tensor(key)

    weights = {p: load(p) for p in saved["modules"]}
    present = [w for w in weights.values() if w is not None]
    return _fingerprint(
        saved,
        (config.get("architectures") or [None])[0],
        config.get("model_type"),
        str(present[0].dtype).removeprefix("torch.") if present else None,
        {p: None if w is None else tuple(w.shape) for p, w in weights.items()},
        weights.get,
    )


def _fingerprint(saved, architecture, model_type, dtype, shapes, weight: Callable) -> dict:
    """``fingerprint.fingerprint``'s record from shapes and a function giving each weight (None:
    not hashed)."""
    modules = {p: None if s is None else list(s) for p, s in sorted(shapes.items())}
    samples = []
    for path in modules:
        values = weight(path) if modules[path] is not None else None
        if values is None:
            samples = None
            break
        samples.append(sample_of(values))
    weights = None
    if samples is not None and all(s is not None for s in modules.values()):
        digest = hashlib.sha256(json.dumps(modules, sort_keys=True).encode())
        digest.update(fp._as_bytes(samples))
        weights = digest.hexdigest()[:16]
    return {
        "architecture": architecture,
        "model_type": model_type,
        "dtype": dtype,
        "modules": modules,
        "weights": weights,
    }
