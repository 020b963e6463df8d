"""Which adapters a server can serve, where their files are, and which are in memory.

Names resolve only to what the store itself found: every adapter directory directly under the
adapters directory (``DIR/NAME/adapter_config.json``, served as ``NAME``), every run's adapter
(``DIR/RUN/adapter/adapter_config.json``, served as ``RUN``), the ``--adapter NAME=PATH`` pairs and
those an admin loaded at run time. A request's name is looked up in that table and never joined to
a path, so ``..``, absolute paths and separators cannot reach outside; an entry under DIR whose real
path (symlinks followed) is outside DIR is not listed.

Files are read and checked on a worker thread (:func:`lorakit.io.adapter.read_checked`); the
engine attaches the result to the model between decoding steps, so a load never stalls the
requests of other adapters. Past ``max_loras`` adapters in memory, the least recently used one that
no request is using is evicted (it loads again on its next use).

``max_bytes`` (``--max-lora-memory``) bounds the adapters' bytes as well as their number: the
bytes of an adapter are those of its tensors as attached on the model's device (A, B and any saved
module copies, in the adapters' dtype there), known from the file's shapes before it is attached
and measured after. Before an adapter is attached, least recently used idle adapters are evicted
until both limits hold with it; while the adapters in the way are in use, it waits. An adapter
that alone needs more than ``max_bytes`` fails at once (evicting everything would not make room).

The budget also holds the most that the layers' stacks of all adapters can take
(:func:`~lorakit.serve.adapter_bytes.stack_projection`): a batch of more than four distinct
adapters makes each layer stack every adapter in memory, zero-padded to the layer's largest rank,
``(n + 1) · R · (in + out)`` values a layer for n adapters (an embedding's or a convolution's
adapters stack in any mixed batch). Counted as soon as it could be built, it makes ``max_bytes``
a bound on all the memory adapters take, copies included; the stack actually built is shown
apart in ``/metrics``.
"""

from __future__ import annotations

import concurrent.futures
import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..adapter_memory import human_bytes
from ..errors import AdapterError, LorakitError
from ..model import check_adapter_name
from .adapter_bytes import stack_projection

CONFIG_FILE = "adapter_config.json"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")


class UnknownModel(LorakitError, KeyError):
    """A request names a model the server does not serve."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0])


@dataclass
class Entry:
    """One servable adapter: its directory and where it stands."""

    name: str
    path: Path
    pinned: bool = False  # given on the command line or by an admin (not found by scanning)
    state: str = "on disk"  # "on disk" | "loading" | "ready" | "failed"
    error: str | None = None
    failed_stamp: tuple | None = None  # the files' times when it failed; a change retries it
    last_used: float = 0.0
    tokenizer: Any = None  # its own tokenizer (and chat template), when it ships one
    future: concurrent.futures.Future | None = None
    users: int = 0  # requests waiting or running on it
    bytes: int = 0  # its tensors on the model's device: from the file's shapes, then measured
    #: module -> (rank, bytes of its stacked A and B per unit of rank, stacked in any mixed
    #: batch): what the layers' stacks hold for it (``stack_projection``)
    stacked: dict[str, tuple[int, int, bool]] = field(default_factory=dict)
    created: float = field(default_factory=time.time)


def _stamp(path: Path) -> tuple:
    out = []
    for name in (CONFIG_FILE, "adapter_model.safetensors"):
        try:
            st = (path / name).stat()
            out.append((st.st_mtime_ns, st.st_size))
        except OSError:
            out.append(None)
    return tuple(out)


def _inside(path: Path, root: Path) -> bool:
    try:
        return path.resolve().is_relative_to(root.resolve())
    except (OSError, RuntimeError):
        return False


def scan(root: Path) -> dict[str, Path]:
    """``{name: adapter directory}`` for the adapters under ``root`` (see the module docstring)."""
    found: dict[str, Path] = {}
    try:
        children = sorted(root.iterdir())
    except OSError:
        return found
    for child in children:
        for candidate in (child, child / "adapter"):
            try:
                if (candidate / CONFIG_FILE).is_file() and _inside(candidate, root):
                    check_adapter_name(child.name)
                    found[child.name] = candidate
                    break
            except (OSError, LorakitError):
                break
    return found


class AdapterStore:
    """The table of servable adapters and their loading (thread-safe)."""

    def __init__(
        self,
        root: str | os.PathLike | None,
        explicit: dict[str, str | os.PathLike] | None = None,
        max_loras: int = 8,
        max_bytes: int | None = None,
        allow_bin: bool = False,
        reserved: tuple[str, ...] = (),
    ) -> None:
        self.root = Path(root) if root is not None else None
        self.max_loras = max_loras
        self.max_bytes = max_bytes
        self.allow_bin = allow_bin
        self.reserved = set(reserved)
        self.lock = threading.RLock()
        self.entries: dict[str, Entry] = {}
        self.pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="lorakit-load")
        self.loads = 0
        self.evictions = 0
        self.failures = 0
        for name, path in (explicit or {}).items():
            self.add(name, path)
        self.refresh()

    def add(self, name: str, path: str | os.PathLike) -> Entry:
        """Register ``name`` for the adapter at ``path`` (an admin's load, a command-line pair)."""
        check_adapter_name(name)
        if name in self.reserved:
            raise AdapterError(f"{name!r} is the base model's name; choose another adapter name")
        path = Path(path)
        if not (path / CONFIG_FILE).is_file():
            raise AdapterError(f"{path} is not an adapter directory (it has no {CONFIG_FILE})")
        with self.lock:
            old = self.entries.get(name)
            if old is not None and old.state in ("ready", "loading") and old.path != path:
                raise AdapterError(f"an adapter named {name!r} is already loaded from {old.path}")
            entry = Entry(name, path, pinned=True)
            if old is not None and old.path == path:
                entry = old
                entry.pinned = True
            self.entries[name] = entry
            return entry

    def refresh(self) -> None:
        """Look in the adapters directory again (new runs appear, removed ones go)."""
        if self.root is None:
            return
        found = scan(self.root)
        with self.lock:
            for name, path in found.items():
                if name in self.reserved:
                    continue
                if name not in self.entries:
                    self.entries[name] = Entry(name, path)
            for name in [n for n, e in self.entries.items() if not e.pinned and n not in found]:
                if self.entries[name].state == "on disk":
                    del self.entries[name]

    def names(self) -> list[str]:
        self.refresh()
        with self.lock:
            return sorted(self.entries)

    def get(self, name: str, available: str) -> Entry:
        """The entry for ``name`` or ``UnknownModel`` listing ``available``."""
        with self.lock:
            entry = self.entries.get(name)
        if entry is None:
            self.refresh()
            with self.lock:
                entry = self.entries.get(name)
        if entry is None:
            raise UnknownModel(f"the model {name!r} does not exist; available: {available}")
        return entry

    def start_load(self, entry: Entry, read) -> None:
        """Begin reading ``entry``'s files on the worker thread, unless that is under way, done,
        or failed on the same files."""
        with self.lock:
            if entry.state in ("loading", "ready"):
                return
            if entry.state == "failed" and entry.failed_stamp == _stamp(entry.path):
                return
            entry.state, entry.error = "loading", None
            entry.future = self.pool.submit(read, entry)

    def fail(self, entry: Entry, message: str) -> None:
        with self.lock:
            entry.state, entry.error = "failed", message
            entry.failed_stamp = _stamp(entry.path)
            entry.future = None
            self.failures += 1

    def loaded(self) -> list[Entry]:
        with self.lock:
            return [e for e in self.entries.values() if e.state == "ready"]

    def bytes_loaded(self) -> int:
        """Bytes of the adapters in memory (their tensors as attached)."""
        with self.lock:
            return sum(e.bytes for e in self.loaded())

    def too_large(self, entry: Entry) -> str | None:
        """Why ``entry`` can never be loaded under the byte budget, or None."""
        need = entry.bytes + stack_projection([entry])
        if self.max_bytes is None or need <= self.max_bytes:
            return None
        return (
            f"adapter {entry.name!r} needs {human_bytes(need)} ({need:,} bytes) in "
            f"memory, more than the whole --max-lora-memory budget of "
            f"{human_bytes(self.max_bytes)} ({self.max_bytes:,} bytes); raise the budget or "
            "serve an adapter of lower rank or fewer target modules"
        )

    def room_for(self, entry: Entry) -> tuple[str, Entry | None]:
        """What attaching ``entry`` (``entry.bytes`` known) needs now: ``("fits", None)``,
        ``("evict", the least recently used idle adapter)`` or ``("wait", None)`` when every
        adapter in the way is in use. Both limits hold after: at most ``max_loras`` adapters and
        at most ``max_bytes`` bytes."""
        with self.lock:
            ready = [e for e in self.loaded() if e is not entry]
            full = len(ready) >= self.max_loras
            if self.max_bytes is not None:
                need = sum(e.bytes for e in ready) + entry.bytes
                need += stack_projection([*ready, entry])
                full = full or need > self.max_bytes
            if not full:
                return "fits", None
            idle = [e for e in ready if e.users == 0]
            if not idle:
                return "wait", None
            return "evict", min(idle, key=lambda e: e.last_used)

    def remove(self, name: str) -> Entry:
        with self.lock:
            entry = self.entries.pop(name, None)
        if entry is None:
            raise UnknownModel(f"no adapter named {name!r} is loaded")
        return entry

    def tokenizer_files(self, path: Path) -> bool:
        return any((path / f).is_file() for f in TOKENIZER_FILES)

    def close(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)
