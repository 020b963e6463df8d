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
directory); after step 2 the new one is complete. Only the fallback of step 2 has a moment where
the target name is missing: the previous adapter is then complete under ``.<name>.old-*``, and
:func:`interrupted_hint` names it when a later load finds the target missing.
"""

from __future__ import annotations

import ctypes
import errno
import os
import re
import secrets
import shutil
import sys
import tempfile
from pathlib import Path, PurePosixPath, PureWindowsPath

from ..errors import AdapterFileError

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


def safe_join(root: str | os.PathLike, *parts: str) -> Path:
    """``root / parts`` where no part may leave ``root``.

    Each part is a relative path without ``..`` components, backslashes or NUL bytes; the joined
    path, with symbolic links resolved, must still lie inside ``root``.
    """
    base = Path(root)
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
    joined = base.joinpath(*parts)
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
    """A new empty directory beside ``target``, for the files of step 1."""
    target.parent.mkdir(parents=True, exist_ok=True)
    return new_dir(target.parent, f".{target.name}.tmp-")


def new_dir(parent: Path, prefix: str) -> Path:
    """A new empty directory ``parent/<prefix><random>`` with the mode the umask gives (0755
    under umask 022), as ``mkdir``, PEFT and transformers give theirs; ``tempfile.mkdtemp``'s
    0700 would hide the published directory from other users, servers and containers."""
    while True:
        path = parent / f"{prefix}{secrets.token_hex(4)}"
        try:
            path.mkdir()  # mode 0o777, less the umask
            return path
        except FileExistsError:
            continue


def umask() -> int:
    """The process's umask (read from /proc on Linux; else set and restored at once)."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def default_modes(root: Path) -> None:
    """Give ``root`` and everything in it the modes a plain ``mkdir`` and ``open`` give under the
    umask (0755 and 0644 under umask 022): some writers (transformers' ``save_pretrained``) make
    their files through ``mkstemp``, 0600, which would hide them from other users."""
    mask = umask()
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
    from safetensors.torch import save_file

    save_file(tensors, str(path), metadata=metadata)
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


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
    _fsync_dir(staged)
    if not replace:
        os.rename(staged, target)  # fails rather than replace a directory created meanwhile
    elif _exchange(staged, target):
        shutil.rmtree(staged, ignore_errors=True)  # `staged` now holds the old adapter
    else:
        old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
        os.replace(target, old)
        try:
            os.replace(staged, target)
        except BaseException:
            os.replace(old, target)  # put the previous adapter back
            raise
        shutil.rmtree(old, ignore_errors=True)
    _fsync_dir(target.parent)


def discard(staged: Path) -> None:
    shutil.rmtree(staged, ignore_errors=True)


def interrupted_hint(target: Path) -> str:
    """When ``target`` is missing: where an interrupted save left the previous adapter, if any."""
    parent = target.parent
    if not parent.is_dir():
        return ""
    olds = sorted(parent.glob(f".{target.name}.old-*"))
    if not olds:
        return ""
    return (
        f"; an interrupted save left the previous adapter at {olds[-1]}: rename it to "
        f"{target.name} to use it"
    )
