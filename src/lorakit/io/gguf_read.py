"""Reading a GGUF file's metadata and tensor table quickly, its tensor data mapped, not read.

The ``gguf`` package's ``GGUFReader`` builds numpy views for every item of every array, which
takes seconds per 10⁵ vocabulary entries (about 10 s for SmolLM2's 49,152 tokens and merges on
one slow core). This reader walks the same layout with ``struct`` (GGUF v2/v3, little-endian):

    "GGUF" | version u32 | n_tensors u64 | n_kv u64
    n_kv × (key: string, type u32, value)        string = length u64 + UTF-8 bytes
                                                 array  = item type u32, count u64, items
    n_tensors × (name: string, n_dims u32, ne u64 × n_dims, ggml type u32, offset u64)
    padding to ``general.alignment`` (32), then the tensor data at those offsets

``ne`` lists a tensor's sizes fastest-varying first: torch's shape reversed.
"""

from __future__ import annotations

import dataclasses
import struct
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import ConfigError

_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q"}
_SCALARS.update({11: "<q", 12: "<d"})
_STRING, _ARRAY = 8, 9


@dataclasses.dataclass
class GgufTensor:
    name: str
    shape: tuple[int, ...]  # torch's order: (out, in) for a weight
    tensor_type: Any  # gguf.GGMLQuantizationType
    data: np.ndarray  # uint8 (*shape[:-1], bytes per row), mapped from the file


@dataclasses.dataclass
class GgufFile:
    path: Path
    fields: dict[str, tuple[Any, int, int | None]]  # key -> (value, value type, item type)
    tensors: list[GgufTensor]

    def value(self, key: str, default: Any = None) -> Any:
        return self.fields[key][0] if key in self.fields else default


class _Cursor:
    def __init__(self, buffer: memoryview) -> None:
        self.buffer, self.pos = buffer, 0

    def take(self, fmt: str) -> Any:
        (value,) = struct.unpack_from(fmt, self.buffer, self.pos)
        self.pos += struct.calcsize(fmt)
        return value

    def string(self) -> str:
        n = self.take("<Q")
        self.pos += n
        return bytes(self.buffer[self.pos - n : self.pos]).decode("utf-8", errors="replace")

    def value(self, kind: int) -> Any:
        if kind == _STRING:
            return self.string()
        if kind == _ARRAY:
            item, n = self.take("<I"), self.take("<Q")
            if item in _SCALARS and item != 7:
                dtype = np.dtype(_SCALARS[item])
                values = np.frombuffer(self.buffer, dtype, n, self.pos)
                self.pos += n * dtype.itemsize
                return values.tolist()
            return [self.value(item) for _ in range(n)]
        if kind not in _SCALARS:
            raise ValueError(f"value type {kind}")
        return self.take(_SCALARS[kind])


def read_gguf(path: str | Path) -> GgufFile:
    """The metadata and tensor table of the GGUF file ``path`` (module docstring)."""
    import gguf

    path = Path(path)
    data = np.memmap(path, dtype=np.uint8, mode="r").view(np.ndarray)  # slices: plain views
    cursor = _Cursor(memoryview(data))
    try:
        if bytes(data[:4]) != b"GGUF":
            raise ValueError("no GGUF magic number")
        cursor.pos = 4
        version, n_tensors, n_kv = cursor.take("<I"), cursor.take("<Q"), cursor.take("<Q")
        if version not in (2, 3):
            raise ValueError(f"GGUF version {version}")
        fields = {}
        for _ in range(n_kv):
            key, kind = cursor.string(), cursor.take("<I")
            item = None
            if kind == _ARRAY:
                item = struct.unpack_from("<I", cursor.buffer, cursor.pos)[0]
            fields[key] = (cursor.value(kind), kind, item)
        table = []
        for _ in range(n_tensors):
            name, n_dims = cursor.string(), cursor.take("<I")
            ne = [cursor.take("<Q") for _ in range(n_dims)]
            kind = gguf.GGMLQuantizationType(cursor.take("<I"))
            table.append((name, ne, kind, cursor.take("<Q")))
        align = int(fields.get("general.alignment", (32,))[0])
        start = -(-cursor.pos // align) * align
        tensors = []
        for name, ne, kind, offset in table:
            block, size = gguf.GGML_QUANT_SIZES[kind]
            row = ne[0] // block * size
            rows = int(np.prod(ne[1:], dtype=np.int64)) if len(ne) > 1 else 1
            at = start + offset
            raw = data[at : at + rows * row].reshape(*reversed(ne[1:]), row)
            tensors.append(GgufTensor(name, tuple(int(n) for n in reversed(ne)), kind, raw))
    except (ValueError, struct.error, IndexError, KeyError, UnicodeError) as exc:
        raise ConfigError(f"{path}: not a GGUF file llama.cpp reads ({exc})") from None
    return GgufFile(path, fields, tensors)


def decode(t: GgufTensor):
    """A GGUF tensor's values as a float32 torch tensor of its shape."""
    import gguf
    import torch

    values = gguf.quants.dequantize(t.data, t.tensor_type)
    return torch.from_numpy(values.astype(np.float32, copy=True)).reshape(t.shape)
