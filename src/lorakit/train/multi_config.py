"""The ``adapters:`` section of a training config: many adapters trained in one run.

```yaml
data:     {max_length: 128}            # defaults for every adapter's data (no train/eval here)
lora:     {r: 8, alpha: 16}            # defaults for every adapter's lora
evaluation: {max_new_tokens: 16}       # defaults for every adapter's evaluation
adapters:
  acme:                                # an adapter name: letters, digits, '_' or '-'
    data: {train: acme/train.jsonl, eval: acme/eval.jsonl}
    lora: {r: 4, target_modules: [q_proj, v_proj]}
  globex:
    data: {train: globex/train.jsonl}
    evaluation: {max_rows: 50}
```

Each adapter names its own ``data.train`` (required) and ``data.eval``; its ``data``, ``lora``
and ``evaluation`` keys override the top-level sections of the same name, which hold the
defaults of all the adapters. A top-level ``data.train`` or ``data.eval`` beside ``adapters:``
is an error: which adapter its rows would train would be a guess. ``model``, ``training`` and
``output`` are the run's and shared by every adapter. Problems are named
``adapters.NAME.section.key`` and gathered with the rest of the config's into one
:class:`~lorakit.ConfigError`.

What a many-adapter run cannot do (each an error here, before anything loads): train a bias
(``lora.bias`` other than ``none``: a bias is shared by every adapter and by the base), a full
fine-tune (``training.method: full``) or early stopping (``training.early_stopping``: stopping
one adapter while the others go on is not built).
"""

from __future__ import annotations

import dataclasses
from typing import Any

from ..config import LoraConfig
from ..errors import AdapterError, ConfigError
from .config import (
    DATA_PATHS,
    AdapterSection,
    DataSection,
    EvaluationSection,
    _check_files,
    _section,
)

ENTRY_KEYS = ("data", "lora", "evaluation")


def adapter_data(raw: dict[str, Any]) -> list[Any]:
    """The ``data`` mappings of the raw ``adapters:`` section (to resolve their paths)."""
    adapters = raw.get("adapters")
    if not isinstance(adapters, dict):
        return []
    return [entry.get("data") for entry in adapters.values() if isinstance(entry, dict)]


def repeated_adapters(text: str) -> list[str]:
    """Adapter names written twice under ``adapters:`` (YAML keeps the last one silently)."""
    import yaml

    try:
        root = yaml.compose(text)
    except yaml.YAMLError:
        return []
    if not isinstance(root, yaml.MappingNode):
        return []
    for key, value in root.value:
        if getattr(key, "value", None) == "adapters" and isinstance(value, yaml.MappingNode):
            names = [getattr(k, "value", None) for k, _ in value.value]
            return sorted({str(n) for n in names if names.count(n) > 1})
    return []


def build_adapters(
    raw: dict[str, Any], built: dict[str, Any], problems: list[str]
) -> tuple[AdapterSection, ...]:
    """Each adapter's sections: the top-level ones (``built``) with its overrides applied."""
    from ..model import check_adapter_name  # torch's import: only for configs with adapters

    adapters = raw["adapters"]
    if not isinstance(adapters, dict) or not adapters:
        problems.append(
            "adapters: expected a mapping of adapter names to {data, lora, evaluation}, got "
            f"{adapters!r}"
        )
        return ()
    out, folded = [], {}
    for name, entry in adapters.items():
        where = f"adapters.{name}"
        try:
            check_adapter_name(name)
        except AdapterError as e:
            problems.append(f"{where}: {e}")
            continue
        if name.lower() in folded:  # adapters/Acme and adapters/acme: one directory on macOS
            problems.append(
                f"{where}: differs from adapters.{folded[name.lower()]} only in case; their "
                "directories would be one on a case-insensitive file system"
            )
        folded[name.lower()] = name
        entry = {} if entry is None else entry
        if not isinstance(entry, dict):
            problems.append(f"{where}: expected a mapping of {', '.join(ENTRY_KEYS)}")
            continue
        for key in entry:
            if key not in ENTRY_KEYS:
                problems.append(f"unknown key {where}.{key}; valid keys: {', '.join(ENTRY_KEYS)}")
        own = {key: entry.get(key) or {} for key in ENTRY_KEYS}
        bad = [key for key, values in own.items() if not isinstance(values, dict)]
        for key in bad:
            problems.append(f"{where}.{key}: expected a mapping of keys")
        if bad:
            continue
        data = _override("data", DataSection, built, own["data"], problems, f"{where}.")
        evaluation = _override(
            "evaluation", EvaluationSection, built, own["evaluation"], problems, f"{where}."
        )
        lora = _lora(built.get("lora") or LoraConfig(), own["lora"], problems, where)
        if data is not None and evaluation is not None and lora is not None:
            out.append(AdapterSection(name, data, lora, evaluation))
    return tuple(out)


def _override(section, cls, built, own, problems, prefix):
    """The top-level section ``built[section]`` with the keys of ``own`` in its place."""
    before = len(problems)
    parsed = _section(section, cls, own, problems, prefix)
    if len(problems) > before:
        return None
    given = {f.name: getattr(parsed, f.name) for f in dataclasses.fields(cls) if f.name in own}
    top = built.get(section) or cls()
    if section == "data":  # an adapter's files are its own, never the top level's
        top = dataclasses.replace(top, **dict.fromkeys(DATA_PATHS))
    return dataclasses.replace(top, **given)


def _lora(top: LoraConfig, own: dict[str, Any], problems: list[str], where: str):
    valid = [f.name for f in dataclasses.fields(LoraConfig)]
    unknown = sorted(set(own) - set(valid))
    for key in unknown:
        problems.append(f"unknown key {where}.lora.{key}; valid keys: {', '.join(valid)}")
    if unknown:
        return None
    try:
        return dataclasses.replace(
            top, **{k: tuple(v) if isinstance(v, list) else v for k, v in own.items()}
        )
    except ConfigError as e:
        problems.append(f"{where}.lora: {e}")
        return None


def check_many(built: dict[str, Any], problems: list[str]) -> None:
    """The checks of a config with ``adapters:`` (the one-adapter ones are in ``config.py``)."""
    data, training = built["data"], built["training"]
    for key in DATA_PATHS:
        if getattr(data, key) is not None:
            problems.append(
                f"data.{key}: with adapters, each adapter names its own file "
                f"(adapters.NAME.data.{key}); the top-level data section holds only the "
                "defaults of the other data keys"
            )
    if training.method == "full":
        problems.append("training.method=full: many adapters in one run need lora or qlora")
    if training.early_stopping:
        problems.append(
            "training.early_stopping is not supported with adapters (stopping one adapter "
            "while the others train is not built)"
        )
    for a in built["adapters"]:
        where = f"adapters.{a.name}."
        if a.data.train is None:
            problems.append(f"{where}data.train: the adapter's training JSONL file is required")
        _check_files(a.data, problems, where)
        if a.evaluation.every and a.data.eval is None:
            problems.append(f"{where}evaluation.every is set but the adapter has no data.eval")
        if a.lora.bias != "none":
            problems.append(
                f"{where}lora.bias={a.lora.bias!r}: a bias is shared by every adapter and the "
                "base, so it cannot train with one adapter's rows alone; use none"
            )
