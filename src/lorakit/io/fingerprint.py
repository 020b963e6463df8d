"""A fingerprint of the base model an adapter was trained on, stored in the adapter file.

An adapter only means something on its own base model: the same architecture, the same shapes and
the same weights. ``save_adapter`` records, as JSON in the safetensors metadata under
``lorakit.fingerprint``::

    {"architecture": "LlamaForCausalLM", "model_type": "llama", "dtype": "float32",
     "modules": {"model.layers.0.self_attn.q_proj": [576, 576], ...},
     "weights": "3f2a9c0d1e2b4a5c"}

``modules`` holds the shape of each targeted module's base weight. ``weights`` is a hash (sha256,
first 16 hex digits) over each targeted module's path, shape and a strided sample of at most
``SAMPLE`` of its weight values rounded to bfloat16. Its cost does not grow with the model (a few
milliseconds for SmolLM2-135M's 210 linear layers), any change to a sampled value changes it, and
the same weights held in float32 or bfloat16 hash alike (float16 copies may differ by rounding).
It is ``None`` when the weights cannot be read (meta device) or an adapter is merged into them.
A quantized base (``lorakit.quant``) is hashed by its packed codes and its ``dtype`` is the
quantization type (``"nf4"``); its weights are not compared with a float base's, so a QLoRA adapter
loads onto the full-precision model it was quantized from (to merge it there).

An init that rewrites the base (PiSSA, OLoRA: ``lorakit/layers/init.py``) keeps a sample of the
original weight taken before the rewrite, and the fingerprint uses it: the adapter is saved as a
plain LoRA of that original base, and its file names it. LoftQ's sample is of the 4-bit base it
made (its adapter is for that base).

PEFT writes no fingerprint; such files load without the check. A fingerprint that is present but
cannot be read (not JSON, nested too deep, a field of the wrong type such as a module's shape given
as a number) is not treated as absent: :func:`loads` raises an ``AdapterFileError`` naming the
metadata key, and ``load_adapter`` refuses the file unless ``allow_base_mismatch=True``, which
loads it without the check and says so in a warning. A damaged record must not turn the check off.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from typing import Any

import numpy as np
import torch
from torch import nn

from ..errors import AdapterFileError
from ..layers import LoraLayer
from ..layers import init as base_init
from . import safety

SAMPLE = base_init.SAMPLE  # weight values sampled per module
METADATA_KEY = "lorakit.fingerprint"


def fingerprint(model: nn.Module, paths: Iterable[str]) -> dict[str, Any]:
    """The fingerprint of ``model`` over the modules at ``paths`` (a missing module: shape None)."""
    config = getattr(model, "config", None)
    modules: dict[str, list[int] | None] = {}
    samples: list[torch.Tensor] = []
    readable = True
    dtype = None
    for path in sorted(paths):
        try:
            module = model.get_submodule(path) if path else model
        except AttributeError:
            module = None
        weight = getattr(module, "weight", None)
        values, kind = _weight_values(weight)
        if values is None:
            modules[path] = None
            readable = False
            continue
        modules[path] = list(weight.shape)
        change = base_init.base_change(module) if isinstance(module, LoraLayer) else None
        if change is not None:  # the base before its init rewrote it
            dtype = dtype or change.kind
            samples.append(change.sample)
            continue
        dtype = dtype or kind
        merged = isinstance(module, LoraLayer) and module.merged_adapters
        readable = readable and not merged and not values.is_meta
        if readable:
            samples.append(base_init.sample_of(values))
    weights = None
    if readable:
        digest = hashlib.sha256(json.dumps(modules, sort_keys=True).encode())
        digest.update(_as_bytes(samples))
        weights = digest.hexdigest()[:16]
    return {
        "architecture": type(model).__name__,
        "model_type": getattr(config, "model_type", None),
        "dtype": dtype,
        "modules": modules,
        "weights": weights,
    }


_weight_values = base_init.fingerprint_values  # (tensor to sample, dtype name)


def _quantized(fp: dict[str, Any]) -> bool:
    return fp.get("dtype") not in (None, "float32", "float16", "bfloat16", "float64")


def _as_bytes(samples: list[torch.Tensor]) -> bytes:
    """The sampled values rounded to bfloat16, in one buffer (raw bytes for non-float weights).

    The rounding (to nearest, ties to even, as ``.to(torch.bfloat16)``) is done on the float32
    bits with numpy: torch's conversion goes through its thread pool, which on a busy machine
    waits longer than the work takes.
    """
    if not all(s.dtype.is_floating_point for s in samples):
        return b"".join(s.contiguous().view(torch.uint8).numpy().tobytes() for s in samples)
    bits = torch.cat([s.float() for s in samples]).numpy().view(np.uint32)
    rounded = (bits + np.uint32(0x7FFF) + ((bits >> np.uint32(16)) & np.uint32(1))) >> np.uint32(16)
    return rounded.astype(np.uint16).tobytes()


def dumps(fp: dict[str, Any]) -> str:
    return json.dumps(fp, sort_keys=True, separators=(",", ":"))


def loads(text: str | None, source: str = f"metadata {METADATA_KEY!r}") -> dict[str, Any] | None:
    """The fingerprint from the metadata text; None when absent (``text`` is None). Text that is
    not a fingerprint of the form :func:`fingerprint` writes raises ``AdapterFileError`` naming
    ``source`` and what is wrong."""
    if text is None:
        return None
    problems = [] if text.strip() else ["it is empty"]
    data = safety.read_json(text, source) if not problems else None
    if not problems and not isinstance(data, dict):
        problems.append(f"a JSON object is expected, not {type(data).__name__}")
    elif not problems:
        problems = _problems(data)
    if problems:
        raise AdapterFileError(
            f"{source} is not a base model fingerprint lorakit can read: "
            + "; ".join(problems[:3])
            + (f" (and {len(problems) - 3} more)" if len(problems) > 3 else "")
        )
    return data


def _problems(data: dict[str, Any]) -> list[str]:
    """What is wrong with the fields of a decoded fingerprint."""
    problems = [
        f"{field!r} is {safety.shown(data[field], 60)}; expected a string or null"
        for field in ("architecture", "model_type", "dtype", "weights")
        if data.get(field) is not None and not isinstance(data[field], str)
    ]
    modules = data.get("modules")
    if not isinstance(modules, dict):
        return [*problems, f"'modules' is {safety.shown(modules, 60)}; expected an object"]
    for path, shape in modules.items():
        sizes = shape if isinstance(shape, list) else [None]
        if shape is not None and not all(
            isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in sizes
        ):
            problems.append(
                f"modules[{safety.shown(path, 60)}] is {safety.shown(shape, 60)}; expected a list "
                "of sizes or null"
            )
    return problems


def describe(fp: dict[str, Any]) -> str:
    """One line: ``LlamaForCausalLM (llama, float32), 210 modules, weights 3f2a9c0d1e2b4a5c``."""
    kind = ", ".join(str(x) for x in (fp.get("model_type"), fp.get("dtype")) if x)
    weights = fp.get("weights") or "not hashed"
    return (
        f"{fp.get('architecture')}{f' ({kind})' if kind else ''}, "
        f"{len(fp.get('modules', {}))} modules, weights {weights}"
    )


def differences(saved: dict[str, Any], actual: dict[str, Any]) -> list[str]:
    """What differs between the fingerprint in a file and the model's, as readable lines."""
    out = []
    for field in ("architecture", "model_type"):
        if saved.get(field) != actual.get(field):
            out.append(f"{field}: {saved.get(field)!r} in the file, {actual.get(field)!r} here")
    here = actual["modules"]
    missing = [p for p, shape in here.items() if shape is None]
    if missing:
        out.append(f"{len(missing)} module(s) of the file are missing here, e.g. {missing[0]}")
    shapes = [
        f"{p} {tuple(s)} in the file, {tuple(here[p])} here"
        for p, s in saved["modules"].items()
        if here.get(p) is not None and s is not None and list(s) != list(here[p])
    ]
    if shapes:
        more = f" (and {len(shapes) - 3} more)" if len(shapes) > 3 else ""
        out.append(f"{len(shapes)} weight shape(s) differ: {'; '.join(shapes[:3])}{more}")
    # A quantized base and its float original share no weight bytes; an adapter trained on one
    # (QLoRA) is meant for the other too (merging), so their weights are not compared.
    comparable = _quantized(saved) == _quantized(actual)
    if not out and comparable and saved.get("weights") and actual.get("weights"):
        if saved["weights"] != actual["weights"]:
            line = f"weights differ: hash {saved['weights']} in the file, {actual['weights']} here"
            if saved.get("dtype") != actual.get("dtype"):
                line += (
                    f" (saved on {saved.get('dtype')}, here {actual.get('dtype')}; a float16 "
                    "copy of the same weights can differ by rounding)"
                )
            out.append(line)
    return out
