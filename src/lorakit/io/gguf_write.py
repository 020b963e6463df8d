"""Writing GGUF files: tensor encodings and the crash-safe write.

Tensor data types follow llama.cpp's converter: 1-D tensors (norms, biases) stay float32; 2-D
weights take the requested type, ``f32``, ``f16``, ``bf16`` or ``q8_0`` (blocks of 32 values, one
float16 scale each: ``x ≈ d · q``, ``q`` int8). A weight whose rows do not split into whole
blocks of its type (a LoRA B of rank 8 in ``q8_0``) is written float16, as the converter does.

The file is written beside its target under a temporary name, flushed to disk, and renamed into
place, so a crash or an error leaves the old file or the new one, never half of one.
"""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import torch

from ..errors import ConfigError
from . import safety

OUT_TYPES = ("f32", "f16", "bf16", "q8_0")


def qtype(out_type: str):
    """The ``gguf.GGMLQuantizationType`` of an out type, or a ``ConfigError`` listing them."""
    import gguf

    types = {
        "f32": gguf.GGMLQuantizationType.F32,
        "f16": gguf.GGMLQuantizationType.F16,
        "bf16": gguf.GGMLQuantizationType.BF16,
        "q8_0": gguf.GGMLQuantizationType.Q8_0,
    }
    if out_type not in types:
        raise ConfigError(f"out_type={out_type!r}: expected one of {', '.join(OUT_TYPES)}")
    return types[out_type]


def file_type(out_type: str) -> int:
    """``general.file_type`` (llama.cpp's ``LlamaFileType``) of a file written in ``out_type``."""
    import gguf

    return {
        "f32": gguf.LlamaFileType.ALL_F32,
        "f16": gguf.LlamaFileType.MOSTLY_F16,
        "bf16": gguf.LlamaFileType.MOSTLY_BF16,
        "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
    }[out_type]


def kind_for(shape: tuple[int, ...], out_type: str):
    """The ``GGMLQuantizationType`` a tensor of ``shape`` is written in (module docstring)."""
    import gguf

    kind = qtype(out_type) if len(shape) >= 2 else gguf.GGMLQuantizationType.F32
    if shape[-1] % gguf.GGML_QUANT_SIZES[kind][0]:  # rows that are not whole blocks
        return gguf.GGMLQuantizationType.F16
    return kind


def nbytes(shape: tuple[int, ...], kind) -> int:
    """The bytes a tensor of ``shape`` takes in type ``kind``."""
    import gguf

    block, size = gguf.GGML_QUANT_SIZES[kind]
    return math.prod(shape[:-1]) * (shape[-1] // block) * size


def encode(tensor: torch.Tensor, kind) -> np.ndarray:
    """``tensor`` (torch's shape) as the data of a GGUF tensor of type ``kind``."""
    import gguf

    data = tensor.detach().to(torch.float32).contiguous().numpy()
    return gguf.quants.quantize(data, kind)


def add_tensor(writer, name: str, tensor: torch.Tensor, out_type: str) -> None:
    """Add ``tensor`` (torch's shape: (out, in) for a weight) to ``writer`` in ``out_type``."""
    kind = kind_for(tuple(tensor.shape), out_type)
    writer.add_tensor(name, encode(tensor, kind), raw_dtype=kind)


def write_streamed(writer, tensors: list[tuple[str, tuple[int, ...], Callable]], out_type: str):
    """Write a ``gguf.GGUFWriter`` whose metadata is added, then ``tensors`` (name, shape, a
    function giving the tensor) one at a time: only one tensor is in memory at once."""
    kinds = []
    for name, shape, _ in tensors:
        kinds.append(kind_for(shape, out_type))
        writer.add_tensor_info(name, shape, np.float32, nbytes(shape, kinds[-1]), kinds[-1])
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    for (name, shape, produce), kind in zip(tensors, kinds):
        tensor = produce()
        if tuple(tensor.shape) != shape:
            raise ConfigError(f"{name}: shape {tuple(tensor.shape)}, announced {shape}")
        writer.write_tensor_data(encode(tensor, kind))
    writer.close()


def check_out(out: str | os.PathLike, overwrite: bool) -> Path:
    """``out`` as a path to a new ``.gguf`` file (or one to replace with ``overwrite``)."""
    target = safety.check_path(out, "GGUF file")
    if target.suffix != ".gguf":
        raise ConfigError(f"{target}: the output file name must end in .gguf")
    if target.is_dir():
        raise ConfigError(f"{target} is a directory; expected the path of a .gguf file")
    if target.exists() and not overwrite:
        raise ConfigError(f"{target} exists; pass overwrite=True to replace it")
    if not target.parent.is_dir():
        raise ConfigError(f"{target.parent} does not exist (the directory of {target.name})")
    return target


@contextlib.contextmanager
def staged_file(target: Path) -> Iterator[Path]:
    """A temporary path beside ``target``; renamed to ``target`` (after an ``fsync``) when the
    block ends without an error, removed when it raises."""
    staged = target.with_name(f".{target.name}.{os.getpid()}.partial")
    try:
        yield staged
        with open(staged, "rb+") as handle:
            os.fsync(handle.fileno())
        os.replace(staged, target)
    finally:
        with contextlib.suppress(FileNotFoundError):
            staged.unlink()


def write(writer) -> None:
    """Write a filled ``gguf.GGUFWriter`` (opened on a path) and close it."""
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
