"""Paths that cannot escape, and directory writes that a crash cannot leave half done.

An adapter directory is written in three steps:

1. every file goes into a fresh temporary directory beside the target (same parent, so the same
   file system), written and ``fsync``-ed;
2. the temporary directory takes the target's name in one rename. When a directory is already
   there it is swapped with the new one in one atomic ``renameat2(RENAME_EXCHANGE)`` call where
   the operating system offers it (Linux: ext4, xfs, btrfs, tmpfs); elsewhere the old directory
   is renamed away, the new one renamed in, and the old one put back if that fails;
3. the old directory, now under the temporary name, is deleted.

A crash during step 1 leaves the old directory untouched (plus a hidden ``.<name>.tmp-*``
directory, which the next save into the same parent removes: see ``staging``); after step 2 the
new one is complete. Only the fallback of step 2 has a moment where the target name is missing:
the previous adapter is then complete under ``.<name>.old-*``, and :func:`interrupted_hint` names
it when a later load finds the target missing. Written directories and files get the modes the
umask gives (0755 and 0644 under umask 022), as PEFT and transformers give theirs.

A write that fails for lack of space (or any other ``OSError``) is reported by :func:`os_errors`
as an ``AdapterFileError`` that names the directory and the reason ("no space left on device"),
after the staging directory is removed. Paths are checked before use (:func:`check_path`): a NUL
byte or a name longer than a file system allows is an error that names it, not an ``OSError``.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import json
import os
import re
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any

from ..errors import AdapterFileError
from . import staging

# The files an adapter directory may hold (PEFT writes a README.md model card beside them).
ADAPTER_FILES = frozenset(
    {"adapter_config.json", "adapter_model.safetensors", "adapter_model.bin", "README.md"}
)
# The files a merged-model export may hold: what ``save_pretrained`` writes for the model
# (config, generation config, safetensors shards and their index) and for a tokenizer.
MODEL_FILES = re.compile(
    r"(generation_)?config\.json|model(-\d+-of-\d+)?\.safetensors|model\.safetensors\.index\.json"
    r"|(tokenizer|tokenizer_config|special_tokens_map|added_tokens|vocab|merges|spiece"
    r"|sentencepiece\.bpe|chat_template)\.(json|txt|model|jinja)"
)


PATH_MAX = 4096  # bytes in a whole path (Linux)
MAX_JSON_DEPTH = 64  # nesting of a JSON document lorakit reads (an adapter config needs 3)


def shown(value: Any, limit: int = 100) -> str:
    """``repr`` of a value (of a path as a string), shortened in the middle past ``limit``."""
    text = os.fspath(value) if isinstance(value, os.PathLike) else value
    quoted = repr(text)
    if len(quoted) <= limit:
        return quoted
    size = f" ({len(text)} characters)" if isinstance(text, str) else ""
    return f"{quoted[: limit - 30]}...{quoted[-20:]}{size}"


def check_path(path: str | os.PathLike, what: str = "path") -> Path:
    """``path`` as a ``Path``, or an ``AdapterFileError`` naming it when no file system can hold
    it: a NUL byte, a name (one component) over ``NAME_MAX`` bytes, or a path over ``PATH_MAX``."""
    text = os.fsdecode(path) if isinstance(path, bytes) else os.fspath(path)
    if "\0" in text:
        raise AdapterFileError(f"{what} {shown(text)} contains a NUL byte; no file name may")
    try:
        size = len(os.fsencode(text))
        parts = [(p, len(os.fsencode(p))) for p in PurePosixPath(text).parts]
    except UnicodeEncodeError as exc:
        raise AdapterFileError(f"{what} {shown(text)} is not a valid file name: {exc}") from None
    for part, n in parts:
        if n > staging.NAME_MAX:
            raise AdapterFileError(
                f"{what} {shown(text)}: the name {shown(part, 60)} is {n} bytes long; file "
                f"systems allow at most {staging.NAME_MAX} bytes in one name"
            )
    if size > PATH_MAX:
        raise AdapterFileError(
            f"{what} {shown(text)} is {size} bytes long; paths may be at most {PATH_MAX} bytes"
        )
    return Path(text)


def reason(exc: OSError) -> str:
    """What went wrong, in words: "no space left on device", "permission denied", ..."""
    if exc.errno == errno.ENOSPC:
        return "no space left on device"
    if exc.errno == getattr(errno, "EDQUOT", None):
        return "disk quota exceeded"
    text = exc.strerror or str(exc) or type(exc).__name__
    return text[:1].lower() + text[1:] + (f" ({exc.filename})" if exc.filename else "")


@contextlib.contextmanager
def os_errors(action: str, note: str = "") -> Iterator[None]:
    """Turn an ``OSError`` raised inside into ``AdapterFileError("{action}: {reason}{note}")``."""
    try:
        yield
    except OSError as exc:
        raise AdapterFileError(f"{action}: {reason(exc)}{note}") from None


def read_json(text: str, source: str) -> Any:
    """``json.loads(text)``, with an ``AdapterFileError`` naming ``source`` for text that is not
    JSON or nests deeper than ``MAX_JSON_DEPTH`` (no ``RecursionError``, here or later when the
    document is walked or written again)."""
    try:
        data = json.loads(text)
    except RecursionError:
        raise AdapterFileError(
            f"{source} nests deeper than {MAX_JSON_DEPTH} levels; not a lorakit or PEFT document"
        ) from None
    except ValueError as exc:
        raise AdapterFileError(f"{source} is not valid JSON: {exc}") from None
    level = [data] if isinstance(data, (dict, list)) else []
    for _ in range(MAX_JSON_DEPTH):  # one level of containers per step, without recursion
        if not level:
            return data
        level = [
            v
            for item in level
            for v in (item.values() if isinstance(item, dict) else item)
            if isinstance(v, (dict, list))
        ]
    if not level:
        return data
    raise AdapterFileError(
        f"{source} nests deeper than {MAX_JSON_DEPTH} levels; not a lorakit or PEFT document"
    )


def safe_join(root: str | os.PathLike, *parts: str) -> Path:
    """``root / parts`` where no part may leave ``root``.

    Each part is a relative path without ``..`` components, backslashes or NUL bytes; the joined
    path, with symbolic links resolved, must still lie inside ``root``.
    """
    base = check_path(root, "directory")
    for part in parts:
        text = str(part)
        pure = PurePosixPath(text)
        if (
            not text
            or "\\" in text
            or "\0" in text
            or pure.is_absolute()
            or PureWindowsPath(text).drive
            or ".." in pure.parts
        ):
            raise AdapterFileError(
                f"path part {text!r} is not allowed: use a relative path inside {str(base)!r} "
                "without '..', a drive or a leading '/'"
            )
    joined = check_path(base.joinpath(*parts), "subfolder")
    if not joined.resolve().is_relative_to(base.resolve()):
        raise AdapterFileError(f"{str(joined)!r} leaves {str(base)!r} (through a symbolic link)")
    return joined


def check_target(target: Path, overwrite: bool, kind: str = "adapter") -> bool:
    """Whether ``target`` exists and will be replaced; raises if it must not be touched.

    A missing target or an empty directory is always fine. A directory of the expected ``kind``
    is replaced only with ``overwrite``: an adapter directory holds only the files in
    ``ADAPTER_FILES``, a model directory a ``config.json`` and only files ``MODEL_FILES`` names.
    Anything else (a file, a symbolic link, a directory holding other things, such as a user's
    notes) is never replaced: lorakit deletes only what it could have written.
    """
    if target.is_symlink():
        raise AdapterFileError(
            f"{target} is a symbolic link; write to the directory it points to instead"
        )
    if not target.exists():
        return False
    if not target.is_dir():
        raise AdapterFileError(f"{target} exists and is not a directory")
    entries = sorted(p.name for p in target.iterdir())
    if not entries:
        return True
    if kind == "adapter":
        others = [e for e in entries if e not in ADAPTER_FILES or (target / e).is_dir()]
    else:
        others = [e for e in entries if not MODEL_FILES.fullmatch(e) or (target / e).is_dir()]
        if "config.json" not in entries:
            others = entries
    article = "an" if kind[0] in "aeiou" else "a"
    if others:
        shown = ", ".join(others[:5]) + (", ..." if len(others) > 5 else "")
        raise AdapterFileError(
            f"{target} is not empty and is not {article} {kind} directory: it holds files "
            f"lorakit did not write ({shown}); lorakit only replaces {kind} directories, so "
            "nothing was changed. Move those files or choose another directory"
        )
    if not overwrite:
        raise AdapterFileError(
            f"{target} already holds {article} {kind} ({', '.join(entries[:5])}"
            f"{', ...' if len(entries) > 5 else ''}); pass overwrite=True to replace it"
        )
    return True


def staging_dir(target: Path) -> Path:
    """A new empty directory beside ``target``, for the files of step 1 (mode ``0o777 & ~umask``,
    locked until :func:`publish` or :func:`discard`); stale ones a killed save left there are
    removed first (see ``staging``)."""
    return staging.create(target)


def default_modes(root: Path) -> None:
    """Give ``root`` and everything in it the modes a plain ``mkdir`` and ``open`` give under the
    umask (0755 and 0644 under umask 022): some writers (transformers' ``save_pretrained``) make
    their files through ``mkstemp``, 0600, which would hide them from other users."""
    mask = staging.umask()
    os.chmod(root, 0o777 & ~mask)
    for path in root.rglob("*"):
        if not path.is_symlink():
            os.chmod(path, (0o777 if path.is_dir() else 0o666) & ~mask)


def write_file(path: Path, data: bytes) -> None:
    """Write a new file and flush it to the disk (``fsync``) before returning."""
    with open(path, "xb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def write_tensors(path: Path, tensors: dict, metadata: dict[str, str]) -> None:
    """Write a safetensors file (straight from the tensors, no copy in memory) and flush it."""
    from safetensors import SafetensorError
    from safetensors.torch import save_file

    try:
        save_file(tensors, str(path), metadata=metadata)
    except SafetensorError as exc:  # an I/O error, reported as Rust's io::Error text
        raise _os_error(exc, path) from None
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _os_error(exc: Exception, path: Path) -> OSError:
    """The ``OSError`` behind safetensors' ``SafetensorError`` ("... (os error 28)")."""
    found = re.search(r"(?:os error |code: )(\d+)", str(exc))
    code = int(found.group(1)) if found else errno.EIO
    return OSError(code, os.strerror(code) if found else str(exc), str(path))


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory handles
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover
        pass
    finally:
        os.close(fd)


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths atomically (Linux ``renameat2(RENAME_EXCHANGE)``); False if unsupported."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return False
    renameat2.argtypes = [
        ctypes.c_int,
        ctypes.c_char_p,
        ctypes.c_int,
        ctypes.c_char_p,
        ctypes.c_uint,
    ]
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.EXDEV, errno.EPERM):
        return False
    raise OSError(code, os.strerror(code), str(b))


def publish(staged: Path, target: Path, replace: bool) -> None:
    """Step 2 and 3: give ``staged`` the name ``target``, replacing the old directory if asked."""
    staging.set_modes(staged)
    _fsync_dir(staged)
    try:
        if not replace:
            os.rename(staged, target)  # fails rather than replace a directory created meanwhile
        elif _exchange(staged, target):
            shutil.rmtree(staged, ignore_errors=True)  # `staged` now holds the old adapter
        else:
            old = staging.new_dir(target.parent, staging.hidden_prefix(target, "old"))
            os.replace(target, old)
            try:
                os.replace(staged, target)
            except BaseException:
                os.replace(old, target)  # put the previous adapter back
                raise
            shutil.rmtree(old, ignore_errors=True)
    finally:
        if not staged.exists():
            staging.release(staged)
    _fsync_dir(target.parent)


def discard(staged: Path) -> None:
    """Remove a staging directory that will not be published, and give up its lock."""
    shutil.rmtree(staged, ignore_errors=True)
    staging.release(staged)


def interrupted_hint(target: Path) -> str:
    """When ``target`` is missing: where an interrupted save left the previous adapter, if any."""
    parent = target.parent
    if not parent.is_dir():
        return ""
    prefix = staging.hidden_prefix(target, "old")
    olds = sorted(p for p in parent.iterdir() if p.name.startswith(prefix))
    if not olds:
        return ""
    return (
        f"; an interrupted save left the previous adapter at {olds[-1]}: rename it to "
        f"{target.name} to use it"
    )
