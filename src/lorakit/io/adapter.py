"""Save and load adapters as PEFT adapter directories: strict, crash-safe, fingerprinted.

A directory holds ``adapter_config.json`` (PEFT's keys) and ``adapter_model.safetensors`` (PEFT's
tensor names, see ``peft_format``), so PEFT, serving engines that read PEFT directories and lorakit
all load it. The safetensors metadata adds lorakit's records, which PEFT ignores:
``lorakit.version``, ``lorakit.fingerprint`` (the base model, see ``fingerprint``) and, for
fused-slice adapters only, ``lorakit.config`` (the lorakit config, which PEFT's keys cannot say).

An adapter whose init rewrote the base (PiSSA, OLoRA) is saved as the plain LoRA of the original
base it equals; see ``init_conversion``.

Loading is strict: every tensor the adapter needs must be in the file with its shape, every
tensor in the file must belong somewhere, and every floating-point value must be finite (a NaN or
an infinity would make the model output NaN); otherwise one ``AdapterFileError`` lists them all
with the likely cause, and the model is left as it was. A fingerprint that cannot be read is an
error too (see :func:`load_adapter`), never a reason to skip the base model check.
"""

from __future__ import annotations

import dataclasses
import json
import os
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..config import LoraConfig
from ..errors import AdapterFileError, ConfigError
from ..model import (
    active_adapter,
    adapter_configs,
    apply_lora,
    check_adapter_name,
    delete_adapter,
    lora_layers,
    require_adapter,
    set_adapter,
)
from ..targeting import plan, suffix_match
from . import fingerprint as fp
from . import safety
from .init_conversion import converted, init_on_load
from .peft_format import PREFIX, TASK_MODULES, Slot, peft_config_dict, slots

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
LEGACY_FILE = "adapter_model.bin"
CONFIG_KEY = "lorakit.config"
VERSION_KEY = "lorakit.version"


def save_adapter(
    model: nn.Module,
    directory: str | os.PathLike,
    adapter_name: str = "default",
    *,
    overwrite: bool = False,
) -> Path:
    """Write adapter ``adapter_name`` of ``model`` to ``directory`` in PEFT's layout.

    The files are written to a temporary directory beside ``directory`` and renamed into place, so
    a crash leaves the previous adapter or the new one, never a mix. An existing adapter directory
    is replaced only with ``overwrite=True``; a directory holding other files never is.
    A write that fails (no space left on device, ...) raises ``AdapterFileError`` naming the
    directory and leaves nothing behind. Returns the directory.
    """
    check_adapter_name(adapter_name)
    target = safety.check_path(directory, "adapter directory")
    return write_adapter(target, adapter_contents(model, adapter_name), overwrite)


@dataclasses.dataclass
class AdapterContents:
    """What :func:`save_adapter` writes: the tensors by PEFT name, their metadata, the config."""

    tensors: dict[str, torch.Tensor]
    metadata: dict[str, str]
    config_text: str


def adapter_contents(
    model: nn.Module,
    adapter_name: str = "default",
    *,
    fingerprint: dict | None = None,
    gather: Any = None,
) -> AdapterContents:
    """The files' contents for adapter ``adapter_name`` of ``model``, on the CPU.

    ``gather``: applied to each tensor before it is copied (a distributed run gathers a sharded
    parameter whole this way, every rank calling this together); ``fingerprint``: the base's, when
    its weights cannot be read here (sharded), taken earlier with ``fingerprint.fingerprint``.
    """
    from .._version import __version__

    config = require_adapter(model, adapter_name, "save")
    layers = [(p, layer) for p, layer in lora_layers(model) if adapter_name in layer.lora_A]
    peft_dict = peft_config_dict(model, adapter_name, config, layers)
    required, _ = slots(model, adapter_name, config.bias, optional=False)
    tensors: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for key, slot in required.items():
        tensor = slot.pack(adapter_name)
        tensor = (gather(tensor) if gather is not None else tensor).contiguous().cpu()
        if tensor.data_ptr() in seen:  # a tensor reached twice (a shared module): store a copy
            tensor = tensor.clone()
        seen.add(tensor.data_ptr())
        tensors[key] = tensor
    if config.changes_base and config.init != "loftq":
        peft_dict = converted(model, adapter_name, config, peft_dict, required, tensors)
    if fingerprint is None:
        fingerprint = fp.fingerprint(model, [p for p, _ in layers])
    metadata = {"format": "pt", VERSION_KEY: __version__, fp.METADATA_KEY: fp.dumps(fingerprint)}
    if config.fused_slices:
        metadata[CONFIG_KEY] = json.dumps(config.to_dict(), sort_keys=True)
    config_text = json.dumps(peft_dict, indent=2, sort_keys=True) + "\n"
    return AdapterContents(tensors, metadata, config_text)


def write_adapter(target: Path, contents: AdapterContents, overwrite: bool = False) -> Path:
    """Write ``contents`` as the adapter directory ``target``, crash-safe (see
    :func:`save_adapter`)."""
    with safety.os_errors(f"cannot save the adapter to {target}", "; nothing was changed"):
        replace = safety.check_target(target, overwrite)
        staged = safety.staging_dir(target)
        try:
            safety.write_tensors(staged / WEIGHTS_FILE, contents.tensors, contents.metadata)
            safety.write_file(staged / CONFIG_FILE, contents.config_text.encode())
            safety.publish(staged, target, replace)
        finally:
            if staged.exists():
                safety.discard(staged)
    return target


# -- reading ------------------------------------------------------------------------------------
@dataclasses.dataclass
class AdapterFile:
    """What an adapter directory holds, read and checked for form (not yet against a model)."""

    directory: Path
    config: dict[str, Any]  # adapter_config.json as written
    weights: Path  # the tensor file read
    metadata: dict[str, str]
    shapes: dict[str, tuple[int, ...]]
    dtypes: dict[str, str]
    tensors: dict[str, torch.Tensor] | None = None  # None when only the header was read

    def lora_config(self) -> LoraConfig:
        """The adapter's ``LoraConfig``: lorakit's own record if there is one, else PEFT's keys."""
        source = str(self.directory / CONFIG_FILE)
        own = self.metadata.get(CONFIG_KEY)
        try:
            if own is not None:
                own_source = f"{self.weights}: metadata {CONFIG_KEY!r}"
                return LoraConfig.from_dict(safety.read_json(own, own_source))
            return LoraConfig.from_peft_dict(self.config, source=source)
        except ConfigError:
            raise
        except (TypeError, ValueError, AttributeError) as exc:
            raise AdapterFileError(f"{source}: a value has the wrong type: {exc}") from None

    @property
    def fingerprint(self) -> dict[str, Any] | None:
        """The base model's fingerprint; None if the file has none; ``AdapterFileError`` naming
        the metadata key if it has one that cannot be read."""
        source = f"{self.weights}: metadata {fp.METADATA_KEY!r}"
        return fp.loads(self.metadata.get(fp.METADATA_KEY), source)


def read_adapter(
    directory: str | os.PathLike, *, allow_bin: bool = False, tensors: bool = True
) -> AdapterFile:
    """Read an adapter directory; ``tensors=False`` reads only the tensor names and shapes.

    Only ``adapter_model.safetensors`` is read by default. A directory holding only a legacy
    ``adapter_model.bin`` is refused unless ``allow_bin=True``, which reads it with
    ``torch.load(weights_only=True)``: tensors only, any other object refused, no code run.
    """
    path = safety.check_path(directory, "adapter directory")
    with safety.os_errors(f"cannot read the adapter at {path}"):
        return _read(path, allow_bin, tensors)


def _read(path: Path, allow_bin: bool, tensors: bool) -> AdapterFile:
    if not path.is_dir():
        what = "is not a directory" if path.exists() else "does not exist"
        raise AdapterFileError(f"adapter directory {path} {what}{safety.interrupted_hint(path)}")
    config_path = path / CONFIG_FILE
    if not config_path.is_file():
        hint = (
            " (it looks like a base model: it has config.json)"
            if (path / "config.json").is_file()
            else ""
        )
        raise AdapterFileError(f"{path} has no {CONFIG_FILE}: not an adapter directory{hint}")
    try:
        text = config_path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise AdapterFileError(f"{config_path} is not valid JSON: {exc}") from None
    config = safety.read_json(text, str(config_path))
    if not isinstance(config, dict):
        raise AdapterFileError(
            f"{config_path} must hold a JSON object, not {type(config).__name__}"
        )
    task = config.get("task_type")
    if task is not None and not isinstance(task, str):
        raise AdapterFileError(
            f"{config_path}: task_type is {safety.shown(task, 60)}; expected a string such as "
            "'CAUSAL_LM', or null"
        )
    weights = path / WEIGHTS_FILE
    if weights.is_file():
        return _read_safetensors(path, config, weights, tensors)
    legacy = path / LEGACY_FILE
    if not legacy.is_file():
        raise AdapterFileError(f"{path} has no {WEIGHTS_FILE}")
    if not allow_bin:
        raise AdapterFileError(
            f"{path} holds only the legacy {LEGACY_FILE}, a pickle file; lorakit reads "
            f"safetensors by default. Pass allow_bin=True to read it with "
            "torch.load(weights_only=True) (tensors only, no code run), then save it again"
        )
    return _read_bin(path, config, legacy)


def _read_safetensors(path: Path, config: dict, weights: Path, load: bool) -> AdapterFile:
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(weights, framework="pt", device="cpu") as f:
            metadata = dict(f.metadata() or {})
            shapes, dtypes, tensors = {}, {}, {} if load else None
            for key in f.keys():
                piece = f.get_slice(key)
                shapes[key] = tuple(piece.get_shape())
                dtypes[key] = piece.get_dtype()
                if load:
                    tensors[key] = f.get_tensor(key)
    except SafetensorError as exc:
        raise AdapterFileError(
            f"{weights} is not a valid safetensors file (truncated or corrupted?): {exc}"
        ) from None
    return AdapterFile(path, config, weights, metadata, shapes, dtypes, tensors)


def _read_bin(path: Path, config: dict, legacy: Path) -> AdapterFile:
    try:
        state = torch.load(legacy, map_location="cpu", weights_only=True)
    except Exception as exc:  # a pickle that is not only tensors, or not a torch file at all
        raise AdapterFileError(
            f"{legacy} was refused by torch.load(weights_only=True) (not only tensors, or not "
            f"a PyTorch file: truncated, corrupted, or text?): {type(exc).__name__}: "
            f"{str(exc)[:300]}"
        ) from None
    if not isinstance(state, dict) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()
    ):
        raise AdapterFileError(f"{legacy} does not hold a flat {{name: tensor}} dictionary")
    shapes = {k: tuple(v.shape) for k, v in state.items()}
    dtypes = {k: str(v.dtype).removeprefix("torch.") for k, v in state.items()}
    return AdapterFile(path, config, legacy, {}, shapes, dtypes, dict(state))


# -- loading ------------------------------------------------------------------------------------
def load_adapter(
    model: nn.Module,
    directory: str | os.PathLike,
    adapter_name: str = "default",
    *,
    allow_base_mismatch: bool = False,
    allow_bin: bool = False,
    subfolder: str | None = None,
) -> nn.Module:
    """Load an adapter directory (lorakit's or PEFT's) into ``model``; returns the model.

    If the model has no adapter ``adapter_name`` it is injected with the file's config and the
    tensors loaded, in one call; otherwise the tensors are loaded into the existing adapter, whose
    ranks and scales must match the file's. Strict: a missing tensor, an unexpected one or a shape
    mismatch is one ``AdapterFileError`` listing them with the likely cause, and the model is left
    as it was. A fingerprint that names another base model is an error too, or a warning with
    ``allow_base_mismatch=True``. ``subfolder`` reads ``directory/subfolder`` (it may not leave
    ``directory``); ``allow_bin`` see :func:`read_adapter`.

    A fingerprint that is in the file but cannot be read (not JSON, or a field of the wrong type)
    means the base model cannot be checked: that is an error naming the metadata key, or with
    ``allow_base_mismatch=True`` a warning, and the file loads without the check. A NaN or
    infinite value in any tensor of the file is an error naming the tensor.
    """
    check_adapter_name(adapter_name)
    file = read_checked(adapter_path(directory, subfolder), allow_bin=allow_bin)
    return attach_adapter(model, file, adapter_name, allow_base_mismatch=allow_base_mismatch)


def read_checked(directory: str | os.PathLike, *, allow_bin: bool = False) -> AdapterFile:
    """The first half of :func:`load_adapter`, which needs no model: the directory read and
    every tensor checked finite. A server does this away from its model's thread."""
    file = read_adapter(directory, allow_bin=allow_bin)
    check_finite(file)
    return file


def attach_adapter(
    model: nn.Module, file: AdapterFile, adapter_name: str, *, allow_base_mismatch: bool = False
) -> nn.Module:
    """The second half of :func:`load_adapter`: a file from :func:`read_checked` checked against
    the model and loaded into it as ``adapter_name`` (all or nothing)."""
    check_adapter_name(adapter_name)
    path = file.directory
    config = file.lora_config()
    config = _without_absent_task_modules(config, model, file.config.get("task_type"))
    config = init_on_load(model, config, path)
    _check_base(model, file, allow_base_mismatch)
    existing = adapter_configs(model).get(adapter_name)
    if existing is not None:
        _check_same_adapter(model, adapter_name, config, path)
        _load_tensors(model, file, adapter_name, existing.bias)
        return model
    grads = {id(p): p.requires_grad for p in model.parameters()}
    active = active_adapter(model)
    model = apply_lora(model, config, adapter_name)
    try:
        _load_tensors(model, file, adapter_name, config.bias)
    except BaseException:
        # leave the model as it was: no half-loaded adapter (delete_adapter takes it out of the
        # registry and the layers), the same flags and active adapter
        model = delete_adapter(model, adapter_name)
        for p in model.parameters():
            p.requires_grad_(grads.get(id(p), p.requires_grad))
        set_adapter(model, active)
        raise
    return model


def adapter_path(directory: str | os.PathLike, subfolder: str | None) -> Path:
    """``directory/subfolder`` (which may not leave ``directory``), or ``directory``; checked."""
    if subfolder is None:
        return safety.check_path(directory, "adapter directory")
    return safety.safe_join(directory, subfolder)


def check_finite(file: AdapterFile) -> None:
    """Refuse a file whose floating-point tensors hold NaN or infinity (loaded, the model would
    compute NaN): one ``AdapterFileError`` naming the file and every such tensor."""
    problems = []
    for key, tensor in (file.tensors or {}).items():
        if not (tensor.is_floating_point() or tensor.is_complex()):
            continue
        values = tensor if tensor.itemsize >= 2 else tensor.float()  # float8: no isnan kernel
        # NaN and ±inf propagate through a sum, so a finite sum means every value is finite (one
        # cheap reduction); a sum of finite values can still overflow, hence the exact look next
        if bool(torch.isfinite(values.sum())) or bool(torch.isfinite(values).all()):
            continue
        nan, inf = int(torch.isnan(values).sum()), int(torch.isinf(values).sum())
        problems.append(f"{key}: {nan} NaN and {inf} infinite of {values.numel()} values")
    if problems:
        raise AdapterFileError(
            _listing(f"{file.weights} holds values that are not finite numbers", problems)
            + "\nwas it saved from a training run that diverged, or damaged since?"
        )


def overflow(key: str, value: torch.Tensor, target: torch.Tensor, finite: bool = False) -> str:
    """A problem line when ``value`` would not be finite in ``target``'s dtype (a float64 value
    beyond float32's range, or a B a hot swap scaled up), else ``""``. ``finite``: ``value`` is
    known to be finite (checked by :func:`check_finite`), so a dtype of at least its range needs
    no look at the values."""
    if not (value.is_floating_point() and target.is_floating_point()):
        return ""
    if finite and torch.finfo(target.dtype).max >= torch.finfo(value.dtype).max:
        return ""
    if bool(torch.isfinite(value.to(target.dtype)).all()):
        return ""
    limit = torch.finfo(target.dtype).max
    return f"{key}: values beyond {target.dtype}'s range (±{limit:.3g}) of the model's tensor"


def _check_base(model: nn.Module, file: AdapterFile, allow: bool) -> None:
    check_recorded_base(
        file,
        lambda saved: fp.fingerprint(model, saved["modules"]),
        allow,
        unchecked="loading it without checking the base model (allow_base_mismatch=True)",
    )


def check_recorded_base(
    file: AdapterFile,
    actual_of: Callable[[dict[str, Any]], dict[str, Any]],
    allow: bool,
    *,
    verb: str = "load",
    gerund: str = "loading",
    unchecked: str,
    than: str = "",
) -> None:
    """Raise ``AdapterFileError`` (a warning with ``allow``) when the base ``file`` records differs
    from ``actual_of(recorded)``, the fingerprint of the base at hand over the recorded modules
    (a loaded model's, or one computed from a base's files); a file whose record cannot be read
    is an error too (``unchecked``: the warning instead). ``verb``/``gerund``/``than`` word the
    message for the caller (load, merge, export)."""
    try:
        saved = file.fingerprint
    except AdapterFileError as exc:
        if not allow:
            raise AdapterFileError(
                f"{exc}\nso the base model it was saved for cannot be checked; pass "
                f"allow_base_mismatch=True to {verb} it without the check"
            ) from None
        warnings.warn(f"{exc}\n{unchecked}", stacklevel=4)
        return
    if saved is None:  # PEFT's files record no base
        return
    actual = actual_of(saved)
    found = fp.differences(saved, actual)
    if not found:
        return
    message = (
        f"the adapter at {file.directory} was saved for another base model{than}:\n"
        f"  file: {fp.describe(saved)}\n  here: {fp.describe(actual)}\n"
        + "".join(f"  - {line}\n" for line in found)
    )
    if allow:
        warnings.warn(message + f"{gerund} it anyway (allow_base_mismatch=True)", stacklevel=4)
        return
    raise AdapterFileError(message + f"pass allow_base_mismatch=True to {verb} it anyway")


def _check_same_adapter(model: nn.Module, name: str, config: LoraConfig, path: Path) -> None:
    """Loading into an existing adapter: the file's ranks and scales must be the adapter's."""
    rows = {row.path: row for row in plan(model, config).rows}
    layers = {p: layer for p, layer in lora_layers(model) if name in layer.lora_A}
    problems = [
        f"{p}: targeted by the file, not by adapter {name!r}" for p in rows if p not in layers
    ]
    problems += [
        f"{p}: in adapter {name!r}, not targeted by the file" for p in layers if p not in rows
    ]
    for p in rows.keys() & layers.keys():
        row, layer = rows[p], layers[p]
        record = layer.record(name)
        if (row.r, row.scaling) != (record.rank, record.scale):
            problems.append(
                f"{p}: r={row.r}, scale {row.scaling:g} in the file; "
                f"r={record.rank}, scale {record.scale:g} in adapter {name!r}"
            )
    if problems:
        raise AdapterFileError(
            _listing(
                f"the adapter at {path} does not match the existing adapter {name!r}", problems
            )
            + "\nload it under another adapter_name, or delete_adapter first"
        )


def _without_absent_task_modules(config: LoraConfig, model: nn.Module, task: Any) -> LoraConfig:
    """Drop the modules PEFT adds by itself for a task type (``classifier``, ``score``) that
    this model does not have: PEFT skips them too."""
    defaults = TASK_MODULES.get(task, ())
    if not config.modules_to_save or not defaults:
        return config
    paths = [p for p, _ in model.named_modules() if p]
    keep = tuple(
        m
        for m in config.modules_to_save
        if m not in defaults or any(suffix_match(p, m) for p in paths)
    )
    return (
        config if keep == config.modules_to_save else config.replace(modules_to_save=keep or None)
    )


def _load_tensors(model: nn.Module, file: AdapterFile, name: str, bias: str) -> None:
    """Check every key and shape of the file against the adapter, then copy (all or nothing)."""
    required, optional = slots(model, name, bias)
    shapes = file.shapes
    missing = [slot for key, slot in required.items() if key not in shapes]
    unexpected = [key for key in shapes if key not in required and key not in optional]
    present = [(key, slot) for key, slot in {**optional, **required}.items() if key in shapes]
    mismatched = [(slot, shapes[key]) for key, slot in present if tuple(shapes[key]) != slot.shape]
    kinds = [
        f"dtype mismatch: {key}: {file.tensors[key].dtype} in the file, {slot.target.dtype} here"
        for key, slot in present
        if file.tensors[key].is_floating_point() != slot.target.is_floating_point()
    ]
    if missing or unexpected or mismatched or kinds:
        report = _mismatch_report(model, file, missing, unexpected, mismatched, kinds)
        raise AdapterFileError(report)
    values = [(slot, slot.unpack(file.tensors[key], name)) for key, slot in required.items()]
    filled = {id(slot.target) for slot, _ in values}
    replaced = []
    for key, slot in optional.items():
        if key not in shapes or id(slot.target) in filled:
            continue
        filled.add(id(slot.target))
        value = file.tensors[key]
        if not torch.equal(slot.target.detach(), value.to(slot.target.device, slot.target.dtype)):
            values.append((slot, value))
            replaced.append(key.removeprefix(PREFIX))
    too_large = [overflow(slot.key, value, slot.target, finite=True) for slot, value in values]
    if any(too_large):
        header = f"the adapter at {file.directory} does not fit {type(model).__name__}"
        raise AdapterFileError(_listing(header, [p for p in too_large if p]))
    with torch.no_grad():
        for slot, value in values:
            slot.target.copy_(value)
    if replaced:
        warnings.warn(
            f"the adapter at {file.directory} carries its own copy of {len(replaced)} base "
            f"tensor(s), which replaced the model's (as PEFT does): {', '.join(replaced[:5])}"
            + (" ..." if len(replaced) > 5 else ""),
            stacklevel=3,
        )


_MAX_LINES = 12


def _listing(header: str, lines: list[str]) -> str:
    shown = lines[:_MAX_LINES]
    more = [f"... and {len(lines) - len(shown)} more"] if len(lines) > len(shown) else []
    return f"{header} ({len(lines)} problem(s)):\n" + "\n".join(f"  - {x}" for x in shown + more)


def _mismatch_report(model, file, missing: list[Slot], unexpected, mismatched, kinds) -> str:
    lines = [f"missing from the file: {s.key} (expected {s.shape})" for s in missing]
    lines += [f"unexpected in the file: {k} {file.shapes[k]}" for k in unexpected]
    lines += [
        f"shape mismatch: {s.key}: expected {s.shape}, found {found}" for s, found in mismatched
    ]
    lines += kinds
    causes = []
    rank_only = [(s, f) for s, f in mismatched if _differs_only_in_rank(s, f)]
    if rank_only:
        s, found = rank_only[0]
        dim = 0 if s.role == "lora_A" else 1
        causes.append(
            f"another rank: the file has r={found[dim]} where the config gives r={s.shape[dim]} "
            f"(e.g. {s.module}); was {CONFIG_FILE} edited, or the tensors saved from another "
            "adapter?"
        )
    if len(rank_only) < len(mismatched):
        causes.append(
            "another base model: module shapes differ (another size of the architecture?)"
        )
    absent = sorted({_module_of(k) for k in unexpected} - {p for p, _ in model.named_modules()})
    if absent:
        causes.append(
            f"another base model or architecture: {len(absent)} module(s) of the file do not "
            f"exist in {type(model).__name__} (e.g. {absent[0]})"
        )
    elif unexpected:
        causes.append(f"the file adapts modules its {CONFIG_FILE} does not target (edited?)")
    if missing and not unexpected:
        causes.append("an incomplete file: tensors were left out (interrupted copy, or edited?)")
    text = _listing(f"the adapter at {file.directory} does not fit {type(model).__name__}", lines)
    return text + "".join(f"\nlikely cause: {c}" for c in causes)


def _differs_only_in_rank(slot: Slot, found: tuple[int, ...]) -> bool:
    if slot.role not in ("lora_A", "lora_B") or len(found) != len(slot.shape):
        return False
    dim = 0 if slot.role == "lora_A" else 1
    return all(a == b for i, (a, b) in enumerate(zip(slot.shape, found)) if i != dim)


_SUFFIXES = (
    ".lora_A.weight",
    ".lora_B.weight",
    ".lora_embedding_A",
    ".lora_embedding_B",
    ".lora_magnitude_vector",
)


def _module_of(key: str) -> str:
    """The module path a file key belongs to."""
    key = key.removeprefix(PREFIX)
    for suffix in _SUFFIXES:
        if key.endswith(suffix):
            return key[: -len(suffix)]
    key = key.replace(".base_layer.", ".")
    return key.rpartition(".")[0]
