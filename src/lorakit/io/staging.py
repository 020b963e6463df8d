"""Staging directories: where a save writes its files before they are renamed into place.

A save into ``parent/name`` writes into ``parent/.name.tmp-XXXXXXXX`` (eight characters of
``[a-z0-9_]``, as ``tempfile.mkdtemp`` names them), then renames it (see ``safety``). This module
makes those directories and cleans the ones a killed save left behind.

**Modes.** A staging directory is made with ``os.mkdir(path, 0o777)``, so the kernel applies the
umask: 0755 under umask 022, as PEFT and transformers give their directories (``mkdtemp`` would
make it 0700, and so the published directory, unreadable by any other account or container).
Before publishing, every file in it gets ``0o666 & ~umask`` (safetensors creates its files 0600).

**Who owns a staging directory.** The save that made it holds an exclusive ``flock`` on it (an
open descriptor of the directory itself) until it has published or discarded it. The kernel drops
the lock when that process ends, however it ends, including ``kill -9``. So the rule for cleaning
is: a directory beside the target whose name has the staging form is removed only when

* its lock can be taken without waiting (no save of any process or thread holds it; ``flock``
  locks belong to open file descriptions, so two threads of one process exclude each other too),
* it is not a staging directory of this process that is still registered as live, and
* it holds no subdirectory (lorakit's staging directories are flat: anything else is not ours).

A save that creates its directory and is beaten to the lock by a cleaner finds its directory gone
once it holds the lock, and makes a new one: it never writes into a directory a cleaner deletes.
Where ``flock`` is not available (Windows, some network file systems) a save runs unlocked and
cleaning falls back to age: only directories untouched for ``STALE_AFTER`` seconds (a day) go.
Hidden ``.name.old-*`` directories (the previous adapter of an interrupted replace) are never
removed automatically: they hold the user's data.
"""

from __future__ import annotations

import os
import re
import secrets
import shutil
import stat
import threading
import time
from pathlib import Path

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None

NAME_MAX = 255  # bytes in one file name: ext4, xfs, btrfs, tmpfs, APFS, NTFS
STALE_AFTER = 24 * 3600  # seconds; the age rule where a lock cannot be taken
_ALPHABET = "abcdefghijklmnopqrstuvwxyz0123456789_"
_STAGING = re.compile(r"\..+\.tmp-[a-z0-9_]{8}")
_held: dict[str, int] = {}  # live staging directories of this process -> their locked descriptor
_held_lock = threading.Lock()


def hidden_prefix(target: Path, tag: str) -> str:
    """``.name.tag-``, with ``name`` cut short so that the name plus 8 characters still fits."""
    room = NAME_MAX - len(tag) - 12
    name = os.fsencode(target.name)[:room].decode("utf-8", "ignore")
    return f".{name}.{tag}-"


def umask() -> int:
    """The process's umask, read without changing it where the system allows."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):  # pragma: no cover - not Linux
        pass
    with _held_lock:  # pragma: no cover
        mask = os.umask(0o022)
        os.umask(mask)
    return mask  # pragma: no cover


def new_dir(parent: Path, prefix: str) -> Path:
    """A new empty directory ``parent/prefix + 8 random characters``, mode ``0o777 & ~umask``."""
    for _ in range(100):
        path = parent / (prefix + "".join(secrets.choice(_ALPHABET) for _ in range(8)))
        try:
            os.mkdir(path, 0o777)
        except FileExistsError:
            continue
        return path
    raise FileExistsError(f"no free name {prefix}XXXXXXXX in {parent}")  # pragma: no cover


def create(target: Path) -> Path:
    """A new locked staging directory beside ``target``, after removing stale ones there."""
    parent = target.parent
    parent.mkdir(parents=True, exist_ok=True)
    clean(parent)
    prefix = hidden_prefix(target, "tmp")
    for _ in range(100):
        path = new_dir(parent, prefix)
        try:
            fd = _lock(path, wait=True)
        except FileNotFoundError:  # a cleaner removed it before it was opened
            continue
        if fd is None:  # no locks here: the age rule protects the directory
            return path
        try:
            same = os.path.samestat(os.lstat(path), os.fstat(fd))
        except FileNotFoundError:
            same = False
        if same:
            with _held_lock:
                _held[str(path)] = fd
            return path
        os.close(fd)  # a cleaner removed it between mkdir and the lock: make another
    raise FileExistsError(f"staging directories in {parent} keep disappearing")  # pragma: no cover


def release(path: Path) -> None:
    """Give up the lock on a staging directory (after it was published or removed)."""
    with _held_lock:
        fd = _held.pop(str(path), None)
    if fd is not None:
        os.close(fd)


def set_modes(directory: Path) -> None:
    """Give every file under ``directory`` the mode the umask gives new files (0644 under 022)."""
    mode = 0o666 & ~umask()
    for root, _, files in os.walk(directory):
        for name in files:
            path = os.path.join(root, name)
            if not os.path.islink(path):
                os.chmod(path, mode)


def clean(parent: Path) -> list[Path]:
    """Remove the staging directories in ``parent`` that no live save owns (see the module
    docstring for the rule); returns the removed paths. Never raises."""
    removed = []
    try:
        entries = [e for e in os.scandir(parent) if _STAGING.fullmatch(e.name)]
    except OSError:
        return removed
    for entry in entries:
        path = Path(entry.path)
        with _held_lock:
            if str(path) in _held:
                continue
        try:
            if _remove_if_stale(path):
                removed.append(path)
        except OSError:
            continue
    return removed


def _remove_if_stale(path: Path) -> bool:
    info = os.lstat(path)
    if not stat.S_ISDIR(info.st_mode):
        return False
    try:
        fd = _lock(path, wait=False)
    except BlockingIOError:  # a live save holds it
        return False
    try:
        if fd is None and time.time() - info.st_mtime < STALE_AFTER:
            return False
        with os.scandir(path) as it:
            if any(e.is_dir(follow_symlinks=False) for e in it):
                return False  # not one of ours
        if fd is not None and not os.path.samestat(os.lstat(path), os.fstat(fd)):
            return False  # replaced meanwhile
        shutil.rmtree(path, ignore_errors=True)
        return not path.exists()
    finally:
        if fd is not None:
            os.close(fd)


def _lock(path: Path, *, wait: bool) -> int | None:
    """An open descriptor of ``path`` holding its exclusive lock, or ``None`` where locks are not
    available. Without ``wait``, ``BlockingIOError`` when another descriptor holds the lock."""
    if fcntl is None:  # pragma: no cover
        return None
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0) | os.O_NOFOLLOW)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
    except BlockingIOError:
        os.close(fd)
        raise
    except OSError:  # the file system does not lock
        os.close(fd)
        return None
    return fd
