"""The packages a training run needs, checked before any weight loads.

lorakit itself needs only torch, safetensors and numpy. A run needs more, as its config says:

* ``yaml`` (pyyaml): to read the config and to write the report (``pip install 'lorakit[train]'``);
* ``matplotlib``: for ``loss.png`` when ``output.plot`` is true (``lorakit[train]``);
* ``transformers``: to load the base model (``pip install 'lorakit[hf]'``);
* ``gguf`` and ``accelerate``: to convert a GGUF base (a ``.gguf`` ``model.source``, or the embedded
  default) the first time; a converted copy in the cache needs neither (``lorakit[hf]``).

``tqdm`` is optional: without it, the console prints plain lines instead of a progress bar. A
missing package is one :class:`MissingPackageError` that lists every one, what needs it, and the
``pip`` command that installs them, raised before a run has loaded or written anything.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import LorakitError

if TYPE_CHECKING:
    from .config import TrainConfig

# module -> (the distribution to install, the lorakit extra that installs it)
PACKAGES = {
    "yaml": ("pyyaml", "train"),
    "matplotlib": ("matplotlib", "train"),
    "transformers": ("transformers", "hf"),
    "gguf": ("gguf", "hf"),
    "accelerate": ("accelerate", "hf"),
    "fastapi": ("fastapi", "serve"),
    "uvicorn": ("uvicorn", "serve"),
    "pydantic": ("pydantic", "serve"),
}


class MissingPackageError(LorakitError, ImportError):
    """A package the run needs is not installed."""


def installed(module: str) -> bool:
    """Whether ``module`` can be imported (found without importing it)."""
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):  # a parent missing, or a module blocked in sys.modules
        return False


def require(needs: dict[str, str]) -> None:
    """Raise one :class:`MissingPackageError` for every module of ``needs`` (module -> what needs
    it) that is not installed, with the ``pip`` command that installs them."""
    missing = [m for m in needs if not installed(m)]
    if not missing:
        return
    listed = ", ".join(f"{PACKAGES.get(m, (m,))[0]} ({needs[m]})" for m in missing)
    extras = sorted({PACKAGES[m][1] for m in missing if m in PACKAGES})
    others = [m for m in missing if m not in PACKAGES]
    command = "pip install " + " ".join(
        ([f"'lorakit[{','.join(extras)}]'"] if extras else []) + others
    )
    raise MissingPackageError(
        f"this run needs package(s) that are not installed: {listed}; install them with: {command}"
    )


def needs(cfg: TrainConfig, load_model: bool = True) -> dict[str, str]:
    """The modules a run of ``cfg`` imports, each with the reason (module -> what needs it)."""
    found = {}
    if cfg.output.report:
        found["yaml"] = "output.report writes the config into report.md"
    if cfg.output.plot:
        found["matplotlib"] = "output.plot draws loss.png; or set output.plot=false"
    if load_model:
        found["transformers"] = "loading the base model"
        if _converts_gguf(cfg.model.source):
            where = cfg.model.source or "the embedded default model"
            found["gguf"] = found["accelerate"] = f"converting {where} from GGUF"
    return found


def check_requirements(cfg: TrainConfig, *, load_model: bool = True) -> None:
    """Raise :class:`MissingPackageError` unless every package a run of ``cfg`` needs is there."""
    require(needs(cfg, load_model))


def _converts_gguf(source: str | None) -> bool:
    """Whether loading ``source`` converts a GGUF file (not yet in the cache)."""
    from ..models import ModelLoadError, _gguf_cache_path, embedded_model_path

    try:
        path = embedded_model_path() if source is None else Path(source)
    except ModelLoadError:  # not installed: loading the model says so, with its own command
        return False
    return path.suffix == ".gguf" and not (_gguf_cache_path(path) / "config.json").is_file()
