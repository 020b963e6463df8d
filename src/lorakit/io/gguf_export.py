"""GGUF export for llama.cpp and ollama: a LoRA adapter file, or the merged model.

A GGUF LoRA adapter (``llama-cli --lora FILE``, ollama's ``ADAPTER FILE``) holds, per adapted base
tensor ``<name>`` (llama.cpp's name, see ``gguf_names``), ``<name>.lora_a`` = A (r, in) and
``<name>.lora_b`` = B (out, r) in PEFT's layout (an embedding's A transposed: (num, r)), and the
metadata ``general.type = "adapter"``, ``adapter.type = "lora"``, ``adapter.lora.alpha`` and the
base's ``general.architecture``. llama.cpp computes, for input x (in,) of a weight W (out, in)::

    y = W x + scale · (alpha / r) · B (A x)          r = lora_b's column count, per tensor

with one ``alpha`` for the whole file (``scale`` is the user's, 1 by default). A PEFT file's true
scale is per module: ``s = alpha_m / r_m`` (``alpha_m / √r_m`` with rsLoRA), ``r_m`` and
``alpha_m`` from ``rank_pattern`` / ``alpha_pattern`` — which is why llama.cpp's own converter,
reading only ``lora_alpha``, gets rsLoRA and pattern adapters (those ``lorakit.combine`` writes)
wrong. Here each module's exact scale is folded into B::

    B' = B · s · r / alpha_file      so that   (alpha_file / r) · B' A = s · B A

with ``alpha_file`` the most common rank: for a plain adapter ``B' = s · B`` and llama.cpp's
``alpha / r`` is 1. The fold is done in float64 and rounded once to the file's type.

Some adapters are not ``W + s B A``: DoRA rescales each output row, ``modules_to_save`` replaces
whole tensors, a trained bias adds one, and an unconverted PiSSA/OLoRA/LoftQ file is relative to
a rewritten base. Those are refused with the reason; the merged model (``merged=True``,
``gguf_model``) holds any of them exactly.
"""

from __future__ import annotations

import os
from collections import Counter
from pathlib import Path

import torch

from ..config import LoraConfig
from ..errors import AdapterFileError, ConfigError, gather
from .adapter import AdapterFile, read_adapter
from .gguf_base_check import check_base
from .gguf_names import GgufBase, gguf_base, gguf_name, heads_permuted, permute_rows
from .gguf_write import add_tensor, check_out, staged_file, write
from .merge_state import adapter_modules
from .peft_format import _lookup

MERGED_HINT = "merge it instead (lorakit export-gguf --merged [BASE] ADAPTER OUT.gguf)"


def export_gguf(
    adapter: str | os.PathLike,
    out: str | os.PathLike,
    *,
    base: str | os.PathLike | None = None,
    merged: bool = False,
    out_type: str | None = None,
    overwrite: bool = False,
    allow_base_mismatch: bool = False,
) -> Path:
    """Write the adapter directory ``adapter`` as a GGUF file ``out`` for llama.cpp and ollama.

    ``merged=False``: a GGUF LoRA adapter (module docstring), applied by llama.cpp to the base's
    own GGUF. ``merged=True``: the base with the adapter merged in, a whole GGUF model
    (``gguf_model.export_merged_gguf``). ``base``: a transformers directory, a ``.gguf`` file or
    None (the base the adapter records: a path, or the embedded model); for an adapter only its
    architecture, sizes and tensor names are read. ``out_type``: ``f32`` (an adapter's default),
    ``f16`` (a merged model's default), ``bf16`` or ``q8_0``. The base the adapter records
    (its fingerprint) must be ``base``, as for ``load_adapter`` (``gguf_base_check``), unless
    ``allow_base_mismatch``. Returns ``out``.
    """
    check_out_type(out_type)
    if merged:
        from .gguf_model import export_merged_gguf

        return export_merged_gguf(
            base,
            adapter,
            out,
            out_type or "f16",
            overwrite=overwrite,
            allow_base_mismatch=allow_base_mismatch,
        )
    target = check_out(out, overwrite)
    file = read_adapter(adapter)
    info = gguf_base(recorded_base(adapter) if base is None else base)
    pairs, alpha = gguf_lora_tensors(file, info)
    check_base(file, info, allow_base_mismatch)

    import gguf

    with staged_file(target) as staged:
        writer = gguf.GGUFWriter(staged, info.arch)
        writer.add_type(gguf.GGUFType.ADAPTER)
        writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
        writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, alpha)
        writer.add_name(Path(adapter).name)
        for name, (a, b) in pairs.items():
            add_tensor(writer, f"{name}.lora_a", a, out_type or "f32")
            add_tensor(writer, f"{name}.lora_b", b, out_type or "f32")
        write(writer)
    return target


def recorded_base(adapter: str | os.PathLike) -> str | None:
    """The base the adapter records, as :func:`gguf_base` reads it (None: the embedded model)."""
    from .base_models import adapter_base

    return adapter_base(adapter, "pass the base model (base=BASE): its directory or .gguf file")


def gguf_lora_tensors(
    file: AdapterFile, base: GgufBase
) -> tuple[dict[str, tuple[torch.Tensor, torch.Tensor]], float]:
    """``({gguf name: (A, B')}, alpha_file)``: the adapter's factors under llama.cpp's names, B'
    with the row permutation and the exact scale folded in (module docstring), float32."""
    factors = lora_factors(file, base)
    ranks = Counter(b.shape[1] for _, b, _ in factors.values())
    alpha = float(max(ranks, key=lambda r: (ranks[r], r)))  # the most common rank
    pairs = {}
    for name, (a, b, scale) in factors.items():
        fold = scale * b.shape[1] / alpha  # = s where r equals alpha_file
        pairs[name] = (a.float(), (b.double() * fold).float())
    return pairs, alpha


def lora_factors(
    file: AdapterFile, base: GgufBase
) -> dict[str, tuple[torch.Tensor, torch.Tensor, float]]:
    """``{gguf name: (A, P B, s)}`` of a plain LoRA file: A in llama.cpp's layout, B with the
    base converter's row permutation ``P``, ``s`` the module's exact scale; every part of the
    adapter that ``W + s B A`` cannot carry is refused (module docstring), all reasons at once."""
    if file.tensors is None:
        raise AdapterFileError(f"{file.directory}: read with its tensors to export it")
    config = LoraConfig.from_peft_dict(file.config, source=str(file.directory))
    problems = _config_problems(file, config)
    modules = adapter_modules(file.tensors)
    whole = modules.pop("")
    if whole:
        problems.append(
            f"it holds whole tensors ({', '.join(sorted(whole)[:4])}"
            f"{', ...' if len(whole) > 4 else ''}): modules_to_save copies or trained biases, "
            "which a GGUF LoRA adapter cannot carry"
        )
    out: dict[str, tuple[torch.Tensor, torch.Tensor, float]] = {}
    for path, factors in modules.items():
        embedding = factors.pop("embedding", None) is not None
        if config.use_dora:
            factors.pop("M", None)  # refused once, above
        name = gguf_name(base, f"{path}.weight")
        if set(factors) != {"A", "B"}:
            problems.append(f"{path}: has {sorted(factors)}, expected the factors A and B")
        elif factors["A"].dim() != 2:
            problems.append(f"{path}: a convolution's adapter; llama.cpp's Llama has none")
        elif name is None:
            problems.append(f"{path}: no {base.arch} tensor of llama.cpp has this module's weight")
        elif (shape := base.shape(name)) is None:
            tied = " (the base ties its output to token_embd)" if name == "output.weight" else ""
            problems.append(f"{path}: the base's GGUF has no tensor {name}{tied}")
        else:
            a, b = factors["A"], factors["B"]
            if embedding:  # llama.cpp reads an embedding's A as (num, r), see llm_build_inp_embd
                a = a.t()
            want = (a.shape[0], b.shape[0]) if embedding else (b.shape[0], a.shape[1])
            if shape and tuple(shape) != want:
                problems.append(f"{path}: B A is {want}, the base's {name} {tuple(shape)}")
                continue
            if (heads := heads_permuted(base, name)) is not None:
                b = permute_rows(b, heads)
            r = _lookup(config.rank_pattern, path, config.r)
            alpha = _lookup(config.alpha_pattern, path, config.alpha)
            out[name] = (a.contiguous(), b.contiguous(), config.scaling(r, alpha))
    if not out and not problems:
        problems.append("it adapts no module")
    header = f"cannot export {file.directory} as a GGUF LoRA adapter of {base.source}"
    header += f"; {MERGED_HINT}"
    gather(problems, AdapterFileError, header)
    return out


def _config_problems(file: AdapterFile, config: LoraConfig) -> list[str]:
    problems = []
    if config.use_dora:
        problems.append(
            "a DoRA adapter (use_dora) rescales each output row to m / ||W + s B A||, which "
            "llama.cpp's W x + s B A x cannot express"
        )
    if config.changes_base:
        problems.append(
            f"init_lora_weights={file.config.get('init_lora_weights')!r}: the adapter belongs to "
            "a rewritten base (an unconverted PiSSA/OLoRA/LoftQ file), not to the base's own "
            "weights; save it converted (lorakit saves PiSSA and OLoRA converted)"
        )
    if file.config.get("fan_in_fan_out"):
        problems.append("fan_in_fan_out: a Conv1D (GPT-2) adapter; not a Llama-family model")
    return problems


def check_out_type(out_type: str | None) -> None:
    """A ``ConfigError`` for an out type that is not one of ``gguf_write.OUT_TYPES``."""
    from .gguf_write import OUT_TYPES

    if out_type is not None and out_type not in OUT_TYPES:
        raise ConfigError(f"out_type={out_type!r}: expected one of {', '.join(OUT_TYPES)}")
