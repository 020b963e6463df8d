"""Reading bitsandbytes' 4-bit serialization, every entry checked before anything is built.

A quantized weight ``x.weight`` is stored as these entries (bitsandbytes' ``QuantState.as_dict(
packed=True)``; n = elements of the weight, B = its block size, bits = 4 for NF4/FP4, 8 for int8):

    x.weight                         ceil(n·bits/8) bytes of codes (uint8, or another storage dtype)
    x.weight.absmax                  n/B float32 block scales; n/B uint8 codes when double-quantized
    x.weight.quant_map               2**bits float codebook values
    x.weight.nested_absmax           n/B/256 float scales of the absmax codes (double quantization)
    x.weight.nested_quant_map        256 float values of the 8-bit dynamic map (double quantization)
    x.weight.quant_state.bitsandbytes__<type>
                                     uint8 bytes of a JSON object: quant_type, blocksize, dtype (the
                                     weight's float dtype), shape, and when double-quantized
                                     nested_blocksize (256), nested_dtype, nested_offset

A checkpoint is data from elsewhere: a value of another kind, size or dtype, or a scale that is
not finite (which would make every output NaN), is a :class:`QuantError` naming the entry and
what was expected, never a silently wrong weight.
"""

from __future__ import annotations

import json
import math

import torch

from ..errors import QuantError, gather
from . import blockwise as bw
from .codebooks import QUANT_TYPES, bits_of

QUANT_STATE = "quant_state."
NESTED_KEYS = ("nested_absmax", "nested_quant_map")


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def read_fields(key: str, raw) -> dict:
    """The JSON fields of the quant state entry ``key`` (``…quant_state.<owner>__<type>``),
    checked: a known quant_type matching the key's, a supported blocksize, a floating dtype, a
    shape of positive sizes, and for double quantization nested block 256 with a finite offset.

    Returns the fields with ``dtype`` as a ``torch.dtype`` and ``shape`` as a tuple.
    """
    if not isinstance(raw, torch.Tensor) or raw.dtype != torch.uint8 or raw.dim() != 1:
        got = f"a {type(raw).__name__}" if not isinstance(raw, torch.Tensor) else raw.dtype
        raise QuantError(f"{key} should be the bytes of a JSON object (1-D uint8), got {got}")
    try:
        fields = json.loads(bytes(raw.cpu().tolist()).decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise QuantError(f"{key} is not UTF-8 JSON: {exc}") from None
    if not isinstance(fields, dict):
        raise QuantError(f"{key} should hold a JSON object, got {type(fields).__name__}")
    problems = []
    quant_type = fields.get("quant_type")
    keyed = key.rpartition("__")[2] if "__" in key.rpartition(".")[2] else None
    if quant_type not in QUANT_TYPES:
        problems.append(f"quant_type {quant_type!r} should be one of {', '.join(QUANT_TYPES)}")
    elif keyed != quant_type:
        problems.append(f"quant_type {quant_type!r} differs from the key's {keyed!r}")
    blocksize = fields.get("blocksize")
    if not _is_int(blocksize) or blocksize not in bw.BLOCKSIZES:
        problems.append(
            f"blocksize {blocksize!r} should be one of {', '.join(map(str, bw.BLOCKSIZES))}"
        )
    name = fields.get("dtype")
    dtype = getattr(torch, name, None) if isinstance(name, str) else None
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        problems.append(f"dtype {name!r} should name a floating-point dtype (float16, ...)")
    shape = fields.get("shape")
    if not isinstance(shape, list) or not shape or not all(_is_int(s) and s > 0 for s in shape):
        problems.append(f"shape {shape!r} should be a list of positive sizes")
    if "nested_offset" in fields:
        offset = fields["nested_offset"]
        if (
            not isinstance(offset, (int, float))
            or isinstance(offset, bool)
            or not math.isfinite(offset)
        ):
            problems.append(f"nested_offset {offset!r} should be a finite number")
        if fields.get("nested_blocksize") != bw.NESTED_BLOCKSIZE:
            problems.append(
                f"nested_blocksize {fields.get('nested_blocksize')!r} should be "
                f"{bw.NESTED_BLOCKSIZE} (the only nested block size bitsandbytes writes)"
            )
    gather(problems, QuantError, f"{key} is not a valid quant state")
    return {**fields, "dtype": dtype, "shape": tuple(shape)}


def check_entries(key: str, entries: dict, fields: dict) -> None:
    """Check each tensor entry against what the fields say it holds (keys by suffix, "" the
    packed codes): present, a tensor, its size and dtype, and finite where it is a float."""
    n = math.prod(fields["shape"])
    bits = bits_of(fields["quant_type"])
    blocks = -(-n // fields["blocksize"])
    double = "nested_offset" in fields
    float_kind = "a floating-point dtype"
    want = {  # suffix -> (elements, dtype or None for any float dtype, described)
        "": (-(-n * bits // 8), torch.uint8, "uint8"),
        "absmax": (blocks, *((torch.uint8, "uint8") if double else (torch.float32, "float32"))),
        "quant_map": (2**bits, None, float_kind),
    }
    if double:
        want["nested_absmax"] = (-(-blocks // bw.NESTED_BLOCKSIZE), None, float_kind)
        want["nested_quant_map"] = (256, None, float_kind)
    problems = []
    for suffix, (numel, dtype, described) in want.items():
        name = f"{key}.{suffix}" if suffix else key
        value = entries.get(suffix)
        if value is None:
            problems.append(f"{name} is missing")
            continue
        if not isinstance(value, torch.Tensor):
            problems.append(f"{name} should be a tensor, got a {type(value).__name__}")
            continue
        if suffix == "" and value.dtype != torch.uint8 and value.dim() > 0:
            value = value.contiguous().view(torch.uint8)  # another quant_storage: same bytes
        dtype_ok = value.is_floating_point() if dtype is None else value.dtype == dtype
        if value.numel() != numel or not dtype_ok:
            problems.append(
                f"{name} should hold {numel} values of {described}, "
                f"got {value.numel()} of {str(value.dtype).removeprefix('torch.')}"
            )
        elif value.is_floating_point() and value.device.type != "meta":
            if not bool(torch.isfinite(value).all()):
                problems.append(f"{name} holds NaN or infinite values; they must be finite")
    shape = "x".join(map(str, fields["shape"]))
    header = f"{key} is not a valid {fields['quant_type']} weight of shape {shape}"
    gather(problems, QuantError, f"{header} (block {fields['blocksize']})")
