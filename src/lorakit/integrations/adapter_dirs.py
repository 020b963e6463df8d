"""A model's adapters as one ``save_pretrained`` directory, in PEFT's layout, and back.

``PeftModel.save_pretrained(dir)`` writes the adapter named ``default`` into ``dir`` itself and
every other adapter into ``dir/<name>/``; transformers' Trainer resumes PEFT runs from that
layout. lorakit writes the same, with one addition: a model with a single adapter, whatever its
name, writes it into ``dir`` itself, so the directory is what ``PeftModel.from_pretrained(base,
dir)``, ``model.load_adapter(dir)`` and ``lorakit.load_adapter(model, dir)`` read.

The directory may already exist and hold other files (the Trainer writes its optimizer state,
the tokenizer and ``training_args.bin`` beside the adapter; a final ``save_model`` goes into the
output directory that holds the ``checkpoint-*`` folders): each adapter file is written under a
temporary name and renamed over the old one, so a crash leaves the old file or the new one, and
nothing else in the directory is touched.
"""

from __future__ import annotations

import os
from pathlib import Path

from torch import nn

from ..errors import AdapterFileError
from ..io import safety
from ..io.adapter import CONFIG_FILE, WEIGHTS_FILE, adapter_contents
from ..io.adapter import load_adapter as _load_adapter
from ..model import adapter_configs, list_adapters

DEFAULT = "default"  # the adapter PEFT writes into the directory itself


def placement(names: list[str], directory: Path) -> dict[str, Path]:
    """Where each adapter goes: a single adapter, or ``default``, into ``directory``; any other
    into ``directory/<name>``."""
    single = len(names) == 1
    return {n: directory if single or n == DEFAULT else directory / n for n in names}


def write_adapters(model: nn.Module, directory: str | os.PathLike) -> dict[str, Path]:
    """Write every adapter of ``model`` under ``directory`` (see the module's docstring);
    returns where each went."""
    root = safety.check_path(directory, "save directory")
    places = placement(list_adapters(model), root)
    for name, target in places.items():
        contents = adapter_contents(model, name)
        with safety.os_errors(f"cannot save adapter {name!r} to {target}", "; it was not written"):
            target.mkdir(parents=True, exist_ok=True)
            _replace_file(
                target / WEIGHTS_FILE, safety.write_tensors, contents.tensors, contents.metadata
            )
            _replace_file(target / CONFIG_FILE, safety.write_file, contents.config_text.encode())
    return places


def _replace_file(path: Path, write, *args) -> None:
    """``write(temporary, *args)`` beside ``path``, then rename it to ``path`` (one atomic step
    on one file system); the file gets the modes the umask gives, as a plain ``open`` would."""
    temporary = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    temporary.unlink(missing_ok=True)  # left by a killed save of a process with the same id
    try:
        write(temporary, *args)
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)


def load_adapters(model: nn.Module, directory: str | os.PathLike) -> dict[str, Path]:
    """Load every adapter of ``model`` from a directory :func:`write_adapters` wrote, into the
    adapters' own tensors (in place: an optimizer holding them keeps them). Strict, as
    ``lorakit.load_adapter``, and all or nothing per adapter (every file is checked to be there
    before any is read); a missing adapter is an ``AdapterFileError`` naming where it was looked
    for. Returns where each came from."""
    root = safety.check_path(directory, "checkpoint directory")
    places = placement(list_adapters(model), root)
    converted = [
        f"{n!r} (init={c.init!r})" for n, c in adapter_configs(model).items() if c.changes_base
    ]
    if converted:
        raise AdapterFileError(
            f"cannot read {root} back into adapter(s) {', '.join(converted)}: an adapter whose "
            "init rewrote the base is saved converted to a plain LoRA of the original base, "
            "which cannot be loaded into it; resume such a run with lorakit train, or load the "
            "saved adapter into a fresh base with lorakit.load_adapter"
        )
    missing = [
        f"{n!r} ({p / CONFIG_FILE})" for n, p in places.items() if not (p / CONFIG_FILE).is_file()
    ]
    if missing:
        raise AdapterFileError(
            f"{root} does not hold the adapters of this model: missing {', '.join(missing)}. "
            "It was not written by save_pretrained of a model with these adapters"
        )
    for name, path in places.items():
        _load_adapter(model, path, name)
    return places
