"""Describe an adapter directory from its files alone: no base model is loaded.

``inspect_adapter`` reads ``adapter_config.json`` and the safetensors header (names, shapes and
metadata; no tensor data) and returns a JSON-ready dict: the config, one row per adapted module
(kind, rank, A and B shapes, parameters), the other tensors (``modules_to_save`` copies, biases,
base tensors PEFT may carry), the trainable parameter count, the file size and the base model
fingerprint.
``format_adapter`` renders that dict as the text ``lorakit inspect`` prints.
"""

from __future__ import annotations

import math
import os
from typing import Any

from ..targeting import suffix_match
from . import fingerprint as fp
from .adapter import VERSION_KEY, read_adapter
from .peft_format import PREFIX

_LORA = {
    ".lora_A.weight": "A",
    ".lora_B.weight": "B",
    ".lora_embedding_A": "A",
    ".lora_embedding_B": "B",
}


def inspect_adapter(directory: str | os.PathLike, *, allow_bin: bool = False) -> dict[str, Any]:
    """What the adapter directory holds, as a JSON-ready dict (see the module docstring)."""
    file = read_adapter(directory, allow_bin=allow_bin, tensors=False)
    config = file.lora_config()
    modules: dict[str, dict[str, Any]] = {}
    others = []
    for key, shape in file.shapes.items():
        name = key.removeprefix(PREFIX)
        suffix = next((s for s in _LORA if name.endswith(s)), None)
        if suffix is None:
            path = name.replace(".base_layer.", ".").rpartition(".")[0]
            saved = any(suffix_match(path, m) for m in config.modules_to_save or ())
            role = "saved" if saved else ("bias" if name.endswith("bias") else "base")
            others.append({"key": name, "role": role, "shape": list(shape)})
            continue
        path = name[: -len(suffix)]
        row = modules.setdefault(path, {"path": path, "kind": "linear"})
        row[_LORA[suffix]] = list(shape)
        if "embedding" in suffix:
            row["kind"] = "embedding"
        elif len(shape) > 2:
            row["kind"] = "conv"
    for row in modules.values():
        row["r"] = row["A"][0] if "A" in row else None
        row["params"] = sum(math.prod(row.get(x, [0])) for x in ("A", "B"))
    total = sum(math.prod(s) for s in file.shapes.values())
    carried = sum(math.prod(o["shape"]) for o in others if o["role"] == "base")
    return {
        "path": str(file.directory),
        "weights_file": file.weights.name,
        "file_bytes": file.weights.stat().st_size,
        "lorakit_version": file.metadata.get(VERSION_KEY),
        "peft_config": file.config,
        "config": config.to_dict(),
        "modules": list(modules.values()),
        "other_tensors": others,
        "params": total,
        "trainable_params": total - carried,
        "fingerprint": file.fingerprint,
    }


def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return ""  # pragma: no cover


def format_adapter(info: dict[str, Any]) -> str:
    """The text ``lorakit inspect`` prints for an adapter directory."""
    peft = info["peft_config"]
    writer = f"lorakit {info['lorakit_version']}" if info["lorakit_version"] else "not lorakit"
    cfg = info["config"]
    lines = [
        f"adapter    {info['path']}",
        f"file       {info['weights_file']}, {_size(info['file_bytes'])} ({writer})",
        f"config     r={cfg['r']} alpha={cfg['alpha']:g} dropout={cfg['dropout']:g} "
        f"rslora={cfg['use_rslora']} bias={cfg['bias']} task_type={peft.get('task_type')}",
        f"targets    {cfg['target_modules']}"
        + (f", exclude {cfg['exclude_modules']}" if cfg["exclude_modules"] else ""),
    ]
    if cfg["rank_pattern"] or cfg["alpha_pattern"]:
        lines.append(f"patterns   rank {cfg['rank_pattern']} alpha {cfg['alpha_pattern']}")
    if cfg["modules_to_save"]:
        lines.append(f"saved      {', '.join(cfg['modules_to_save'])} (trained in full)")
    if peft.get("base_model_name_or_path"):
        lines.append(f"base name  {peft['base_model_name_or_path']}")
    fingerprint = info["fingerprint"]
    lines.append(f"base       {fp.describe(fingerprint) if fingerprint else 'no fingerprint'}")
    head = ("module", "kind", "r", "A (or shape)", "B", "params")
    rows = [
        (
            m["path"],
            m["kind"],
            str(m["r"]),
            str(tuple(m.get("A", ()))),
            str(tuple(m.get("B", ()))),
            f"{m['params']:,}",
        )
        for m in info["modules"]
    ]
    rows += [
        (o["key"], o["role"], "", str(tuple(o["shape"])), "", "") for o in info["other_tensors"]
    ]
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]
    table = [
        "  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip()
        for r in [head, tuple("-" * w for w in widths), *rows]
    ]
    lines += ["", *table, ""]
    carried = info["params"] - info["trainable_params"]
    lines.append(
        f"{len(info['modules'])} adapted modules, {info['trainable_params']:,} trainable parameters"
        + (f" (and {carried:,} base parameters the file carries)" if carried else "")
    )
    return "\n".join(lines)
