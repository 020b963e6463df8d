"""Merging an adapter into a base too large to load: shard by shard, from the safetensors files.

``merge_shards(base_dir, adapter_dir, out)`` writes what ``export_merged`` writes (safetensors
shards, their index, ``config.json``, the generation config and the tokenizer files) without
building the model: each tensor of each shard is copied or merged on its own, so the memory held
is one adapted weight with its float32 merge (about ten times its bfloat16 bytes: the float32
copy, ``B A``, the scaled delta, the sum) plus the adapter, whatever the size of the base.

For a weight ``W`` (out, in) of the base that the adapter targets, with ``A`` (r, in) and
``B`` (out, r) from the adapter file, the written tensor is ``merge_state_dict``'s::

    W' = cast(float32(W) + s · B A)          s = alpha / r, or alpha / √r (rsLoRA), per module
                                              (rank_pattern / alpha_pattern)

with DoRA's rescaling of each output row, ``fan_in_fan_out`` (GPT-2's ``Conv1D``, stored
(in, out)), embeddings and convolutions laid out as there; a ``modules_to_save`` copy and a trained
bias replace the base's tensors. ``cast`` goes back to the dtype the shard stores (bfloat16 stays
bfloat16), or to ``dtype`` when one is given (then once, from the float32 sum, as
``export_merged`` does). Every other tensor is copied byte for byte.

How the memory stays small. A shard's header (a JSON table of names, dtypes, shapes and byte
ranges) is read first; the output shard's header is known before any tensor is read, since a
merge changes no shape (and a dtype only as asked). Unchanged tensors are copied file to file by
the kernel (``copy_file_range``), never entering the process; an adapted tensor is read with a
positional read into one buffer, merged and written. The source is deliberately not memory-mapped:
the pages of a mapped file count in the process's resident memory until it is unmapped, a whole
shard once it has been read through, while pages read with ``read`` stay only in the page cache,
which the kernel may drop at will.

Checked before anything is written (the adapter's problems gathered into one error):

* the index (``model.safetensors.index.json``) is JSON with a ``weight_map`` whose shard files
  exist, are valid safetensors files (safetensors' own header check) and hold exactly the tensors
  the map gives them;
* every module the adapter targets, and every tensor it replaces, is in some shard, with a shape
  its ``B A`` fits (the merge itself run on meta tensors: no memory, no arithmetic); nothing is
  left unmerged silently;
* a weight tied to another (input and output embeddings; found on the base's modules built on
  the meta device, ``models.meta_base``) is refused, as ``lorakit.merge`` refuses it: merging
  would change both;
* the adapter's base fingerprint (``lorakit.fingerprint``) is compared with one computed from the
  files: the model's class (``config.json``'s ``architectures``), ``model_type``, the shapes of
  the targeted weights and the hash of their strided sample, read from the shards element by
  element. It equals the fingerprint of the loaded model, so the check is the one
  ``load_adapter`` makes (``allow_base_mismatch`` turns it into a warning).

A merged weight that would hold a non-finite value stops the write (``MergeError`` naming it).
The result appears atomically: it is written to a staging directory beside ``out`` and renamed
into place (``safety``); a failure at any point leaves no directory behind, and an existing
model directory is replaced only with ``overwrite=True``. The shards keep the base's split
(named ``model-0000i-of-0000n.safetensors``, or ``model.safetensors`` for one file).
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import hashlib
import json
import os
import shutil
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from ..errors import AdapterFileError, MergeError
from ..models import ModelLoadError, meta_base
from . import fingerprint as fp
from . import safety
from .adapter import AdapterFile, check_recorded_base, read_checked
from .export import _dtype
from .merge_state import adapter_modules, merge_state_dict

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"
_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U64": torch.uint64,
    "U32": torch.uint32,
    "U16": torch.uint16,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
_NAMES = {v: k for k, v in _DTYPES.items()}
_CHUNK = 16 * 2**20  # bytes per step of the copy that falls back to read/write


@dataclasses.dataclass
class Shard:
    """One safetensors file of the base: its header, read and checked."""

    path: Path
    entries: dict[str, dict[str, Any]]  # name -> {"dtype", "shape", "data_offsets"}
    metadata: dict[str, str]
    start: int  # where the data begins: 8 + the header's length

    def dtype(self, name: str) -> torch.dtype | None:
        """The tensor's torch dtype; None for one torch has no name for (copied as bytes)."""
        return _DTYPES.get(self.entries[name]["dtype"])

    def meta(self, name: str) -> torch.Tensor:
        """The tensor's shape and dtype (bytes for an unknown dtype), with no storage."""
        kind = self.dtype(name) or torch.uint8
        return torch.empty(self.entries[name]["shape"], dtype=kind, device="meta")


def is_sharded_base(base: str | os.PathLike | None) -> bool:
    """Whether ``base`` is a model directory whose weights are safetensors files."""
    if base is None or not Path(base).is_dir():
        return False
    return (Path(base) / INDEX).is_file() or (Path(base) / SINGLE).is_file()


def merge_shards(
    base: str | os.PathLike,
    adapter: str | os.PathLike,
    out: str | os.PathLike,
    *,
    dtype: torch.dtype | str | None = None,
    overwrite: bool = False,
    allow_base_mismatch: bool = False,
) -> Path:
    """Write the base directory ``base`` with the adapter ``adapter`` merged in to ``out``, one
    tensor at a time from the safetensors files. ``dtype``: of the written floating tensors
    (default: each tensor's own). Returns ``out``."""
    target = Path(out)
    replace = safety.check_target(target, overwrite, kind="model")
    file = read_checked(adapter)
    config = file.lora_config()
    out_dtype = _dtype(dtype)
    root = Path(base)
    model_config, shards = read_checkpoint(root)
    touched = _check(root, model_config, shards, file, allow_base_mismatch)
    fan_in_fan_out = bool(file.config.get("fan_in_fan_out", False))

    def merge_one(name: str, tensor: torch.Tensor) -> torch.Tensor:
        work = tensor.float() if out_dtype is not None and tensor.is_floating_point() else tensor
        merged = merge_state_dict(
            {name: work}, file.tensors, config, fan_in_fan_out=fan_in_fan_out, strict=False
        )[name]
        if merged.is_floating_point() and not torch.isfinite(merged).all():
            raise MergeError(
                f"merge refused, nothing was written: {name} would hold non-finite values"
            )
        return merged

    staged = safety.staging_dir(target)
    try:
        names = _output_names(len(shards), sharded=(root / INDEX).is_file())
        weight_map, total = {}, 0
        with _write_errors(target):
            for shard, name in zip(shards, names, strict=True):
                total += _write_shard(shard, staged / name, touched, merge_one, out_dtype)
                weight_map.update(dict.fromkeys(shard.entries, name))
            if (root / INDEX).is_file():
                index = safety.read_json(
                    (root / INDEX).read_text(encoding="utf-8"), str(root / INDEX)
                )
                metadata = {**(index.get("metadata") or {}), "total_size": total}
                text = json.dumps({"metadata": metadata, "weight_map": weight_map}, indent=2)
                safety.write_file(staged / INDEX, (text + "\n").encode())
            _copy_side_files(root, staged, model_config, out_dtype)
        safety.default_modes(staged)
        safety.publish(staged, target, replace)
    finally:
        if staged.exists():
            safety.discard(staged)
    return target


@contextlib.contextmanager
def _write_errors(target: Path) -> Iterator[None]:
    """An ``OSError`` while writing as ``AdapterFileError`` naming ``target`` and the reason (no
    space left, ...); a damaged base (``ModelLoadError``, itself an ``OSError``) as it is."""
    try:
        yield
    except ModelLoadError:
        raise
    except OSError as exc:
        reason = safety.reason(exc)
        raise AdapterFileError(f"cannot write the merged model to {target}: {reason}") from None


# -- reading the checkpoint -----------------------------------------------------------------------
def read_checkpoint(root: Path) -> tuple[dict[str, Any], list[Shard]]:
    """(``config.json``, the shards in order) of a model directory, every header checked."""
    config_file = root / "config.json"
    if not config_file.is_file():
        raise ModelLoadError(f"{root} is not a transformers model directory (no config.json)")
    with safety.os_errors(f"cannot read {config_file}"):
        config = safety.read_json(config_file.read_text(encoding="utf-8"), str(config_file))
    if not isinstance(config, dict):
        raise ModelLoadError(f"{config_file} must hold a JSON object, not {type(config).__name__}")
    if config.get("quantization_config") is not None:
        raise ModelLoadError(
            f"{config_file} describes a quantized checkpoint; its weights are not floats and "
            "cannot be merged shard by shard (merge into its full-precision original)"
        )
    index = root / INDEX
    if not index.is_file():
        if not (root / SINGLE).is_file():
            raise ModelLoadError(f"{root} holds neither {INDEX} nor {SINGLE}")
        return config, [_read_shard(root / SINGLE)]
    with safety.os_errors(f"cannot read {index}"):
        data = safety.read_json(index.read_text(encoding="utf-8"), str(index))
    weight_map = data.get("weight_map") if isinstance(data, dict) else None
    if (
        not isinstance(weight_map, dict)
        or not weight_map
        or not all(isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items())
    ):
        raise ModelLoadError(
            f"{index} is not a valid shard index: expected a JSON object whose 'weight_map' maps "
            "tensor names to shard file names"
        )
    shards = []
    for name in sorted(set(weight_map.values())):
        try:
            path = safety.safe_join(root, name)
        except AdapterFileError as exc:
            raise ModelLoadError(f"{index}: shard {name!r}: {exc}") from None
        if not path.is_file():
            raise ModelLoadError(f"{index} lists the shard {name}, which is missing from {root}")
        shard = _read_shard(path)
        listed = {k for k, v in weight_map.items() if v == name}
        for what, keys in (
            ("listed, not in the file", sorted(listed - set(shard.entries))),
            ("in the file, not listed", sorted(set(shard.entries) - listed)),
        ):
            if keys:
                raise ModelLoadError(
                    f"{index} does not match {name}: {what}: {', '.join(keys[:3])}"
                )
        shards.append(shard)
    return config, shards


def _read_shard(path: Path) -> Shard:
    """A shard's header, after safetensors' own check of the file (sizes, offsets, dtypes)."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(path, framework="pt", device="cpu"):
            pass
        with open(path, "rb") as f:
            (size,) = struct.unpack("<Q", f.read(8))
            header = safety.read_json(f.read(size).decode("utf-8"), f"{path}: header")
    except (SafetensorError, OSError, UnicodeDecodeError, struct.error) as exc:
        raise ModelLoadError(
            f"{path} is not a valid safetensors file (truncated or corrupted?): {exc}"
        ) from None
    metadata = header.pop("__metadata__", None) or {}
    return Shard(path, header, metadata, 8 + size)


# -- the checks, before anything is written ------------------------------------------------------
def _check(
    root: Path, config: dict[str, Any], shards: list[Shard], file: AdapterFile, allow: bool
) -> set[str]:
    """The names of the tensors the adapter changes; raises for anything that would go wrong."""
    owner = {name: shard for shard in shards for name in shard.entries}
    meta_state = {name: shard.meta(name) for name, shard in owner.items()}
    meta_adapter = {k: v.to("meta") for k, v in file.tensors.items()}
    modules = adapter_modules(file.tensors)
    whole = modules.pop("")
    touched = {f"{path}.weight" for path in modules} | set(whole)
    model = meta_base(root)
    ties: dict[int, list[str]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        ties.setdefault(id(param), []).append(name)
    problems = []
    for names in (names for names in ties.values() if len(names) > 1):
        for name in sorted(touched.intersection(names)):
            others = ", ".join(n for n in names if n != name)
            problems.append(
                f"{name}: its weight is tied to {others}; merging would change those modules "
                "too. Keep this adapter unmerged, or untie the weights first"
                if name in owner
                else f"{name}: tied to {others}, which the checkpoint stores in its place"
            )
    for key, tensor in whole.items():  # a replaced tensor must fit its place in the shard
        if key in meta_state and tuple(tensor.shape) != tuple(meta_state[key].shape):
            problems.append(
                f"{key}: {tuple(tensor.shape)} in the adapter, {tuple(meta_state[key].shape)} in "
                "the base"
            )
    try:  # the merge itself on meta tensors: every shape, factor and module checked, all at once
        merge_state_dict(
            meta_state,
            meta_adapter,
            file.lora_config(),
            strict=True,
            fan_in_fan_out=bool(file.config.get("fan_in_fan_out", False)),
        )
    except AdapterFileError as exc:
        lines = str(exc).replace("not in the base state dict", "in no shard of the base")
        problems += [line.removeprefix("  - ") for line in lines.splitlines()[1:]]
    if problems:
        lines = "\n".join(f"  - {p}" for p in problems)
        raise AdapterFileError(
            f"cannot merge {file.directory} into {root} shard by shard, nothing was written:\n"
            f"{lines}"
        )
    _check_fingerprint(file, type(model).__name__, config, owner, allow)
    return touched & set(owner)


def _check_fingerprint(
    file: AdapterFile, architecture: str, config: dict, owner: dict[str, Shard], allow: bool
) -> None:
    """``load_adapter``'s base check, with the fingerprint computed from the files."""
    check_recorded_base(
        file,
        lambda saved: fingerprint_from_files(architecture, config, owner, saved["modules"]),
        allow,
        unchecked="merging without checking the base model",
    )


def fingerprint_from_files(
    architecture: str, config: dict, owner: dict[str, Shard], paths
) -> dict[str, Any]:
    """What ``fingerprint.fingerprint`` gives for the loaded model, from the shards: the same
    strided sample of each module's weight (``SAMPLE`` values), read element by element."""
    modules: dict[str, list[int] | None] = {}
    samples = []
    dtype = None
    for path in sorted(paths):
        shard = owner.get(f"{path}.weight")
        if shard is None:
            modules[path] = None
            continue
        name = f"{path}.weight"
        entry, kind = shard.entries[name], shard.dtype(name) or torch.uint8
        modules[path] = list(entry["shape"])
        dtype = dtype or str(kind).removeprefix("torch.")
        numel = int(torch.Size(entry["shape"]).numel())
        size = torch.empty((), dtype=kind).element_size()
        stride = max(1, numel // fp.SAMPLE)
        begin = shard.start + entry["data_offsets"][0]
        with open(shard.path, "rb", buffering=0) as f:
            raw = b"".join(
                os.pread(f.fileno(), size, begin + i * size)
                for i in range(0, numel, stride)[: fp.SAMPLE]
            )
        samples.append(torch.frombuffer(bytearray(raw), dtype=kind) if raw else torch.empty(0))
    weights = None
    if all(shape is not None for shape in modules.values()):
        digest = hashlib.sha256(json.dumps(modules, sort_keys=True).encode())
        digest.update(fp._as_bytes(samples))
        weights = digest.hexdigest()[:16]
    return {
        "architecture": architecture,
        "model_type": config.get("model_type"),
        "dtype": dtype,
        "modules": modules,
        "weights": weights,
    }


# -- writing --------------------------------------------------------------------------------------
def _output_names(count: int, sharded: bool) -> list[str]:
    if not sharded:
        return [SINGLE]
    return [f"model-{i:05d}-of-{count:05d}.safetensors" for i in range(1, count + 1)]


def _write_shard(shard: Shard, dest: Path, touched: set[str], merge_one, out_dtype) -> int:
    """Write one output shard; returns the bytes of its tensors."""
    order = sorted(shard.entries, key=lambda n: shard.entries[n]["data_offsets"][0])
    layout: dict[str, Any] = {"__metadata__": shard.metadata} if shard.metadata else {}
    dtypes, offset = {}, 0
    for name in order:
        entry = shard.entries[name]
        kind = _DTYPES.get(entry["dtype"])
        cast = out_dtype is not None and kind is not None and kind.is_floating_point
        dtypes[name] = out_dtype if cast else kind
        code = _NAMES[out_dtype] if cast else entry["dtype"]
        begin, end = entry["data_offsets"]
        size = (end - begin) if not cast else _numel(entry) * out_dtype.itemsize
        layout[name] = {
            "dtype": code,
            "shape": entry["shape"],
            "data_offsets": [offset, offset + size],
        }
        offset += size
    header = json.dumps(layout, separators=(",", ":")).encode()
    header += b" " * (-len(header) % 8)  # the data starts 8-byte aligned, as safetensors writes
    with open(shard.path, "rb", buffering=0) as src, open(dest, "xb", buffering=0) as dst:
        _write_all(dst.fileno(), struct.pack("<Q", len(header)) + header)
        run = [0, 0]  # a pending byte-for-byte copy: (start in the source's data, length)
        for name in order:
            begin, end = shard.entries[name]["data_offsets"]
            if name not in touched and dtypes[name] == _DTYPES.get(shard.entries[name]["dtype"]):
                if run[1] and run[0] + run[1] == begin:
                    run[1] += end - begin
                else:
                    _copy(src.fileno(), dst.fileno(), shard.start + run[0], run[1], shard.path)
                    run = [begin, end - begin]
                continue
            _copy(src.fileno(), dst.fileno(), shard.start + run[0], run[1], shard.path)
            run = [0, 0]
            tensor = _read_tensor(src.fileno(), shard, name)
            if name in touched:
                tensor = merge_one(name, tensor)
            tensor = tensor.to(dtypes[name]).contiguous()
            if (
                tensor.numel() * tensor.element_size()
                != layout[name]["data_offsets"][1] - layout[name]["data_offsets"][0]
            ):
                raise MergeError(f"{name}: the merged tensor does not fit its place in the shard")
            _write_all(dst.fileno(), tensor.reshape(-1).view(torch.uint8).numpy())
            del tensor
        _copy(src.fileno(), dst.fileno(), shard.start + run[0], run[1], shard.path)
        os.fsync(dst.fileno())
    return offset


def _numel(entry: dict[str, Any]) -> int:
    return int(torch.Size(entry["shape"]).numel())


def _read_tensor(fd: int, shard: Shard, name: str) -> torch.Tensor:
    """One tensor of the shard, read into a buffer of its own (no memory map)."""
    entry = shard.entries[name]
    begin, end = entry["data_offsets"]
    kind = shard.dtype(name)
    if kind is None:
        raise ModelLoadError(f"{shard.path}: {name} has dtype {entry['dtype']}, which torch lacks")
    if end == begin:
        return torch.empty(entry["shape"], dtype=kind)
    buffer = bytearray(end - begin)
    view, done = memoryview(buffer), 0
    while done < len(buffer):
        n = os.preadv(fd, [view[done:]], shard.start + begin + done)
        if n == 0:
            raise ModelLoadError(f"{shard.path} ends inside tensor {name} (truncated?)")
        done += n
    return torch.frombuffer(buffer, dtype=kind).reshape(entry["shape"])


def _write_all(fd: int, data) -> None:
    view, done = memoryview(data).cast("B"), 0
    while done < len(view):
        done += os.write(fd, view[done:])


def _copy(src: int, dst: int, offset: int, count: int, path: Path) -> None:
    """``count`` bytes of ``src`` from ``offset`` appended to ``dst``: in the kernel where it can
    (``copy_file_range``), else through a buffer of ``_CHUNK`` bytes."""
    while count > 0:
        try:
            n = os.copy_file_range(src, dst, count, offset)
        except (OSError, AttributeError) as exc:
            fallback = (errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP, errno.EPERM)
            if isinstance(exc, OSError) and exc.errno not in fallback:
                raise
            data = os.pread(src, min(count, _CHUNK), offset)
            _write_all(dst, data)
            n = len(data)
        if n == 0:
            raise ModelLoadError(f"{path} ends before its header says it does (truncated?)")
        offset += n
        count -= n


def _copy_side_files(root: Path, staged: Path, config: dict, out_dtype) -> None:
    """config.json (its dtype updated when one was asked), the generation config and the
    tokenizer files: the other files ``export_merged`` writes."""
    for path in sorted(root.iterdir()):
        name = path.name
        if name in (INDEX, SINGLE) or name.endswith(".safetensors") or not path.is_file():
            continue
        if not safety.MODEL_FILES.fullmatch(name):
            continue
        if name == "config.json" and out_dtype is not None:
            key = "torch_dtype" if "torch_dtype" in config and "dtype" not in config else "dtype"
            text = json.dumps({**config, key: str(out_dtype).removeprefix("torch.")}, indent=2)
            safety.write_file(staged / name, (text + "\n").encode())
        else:
            shutil.copyfile(path, staged / name)
