"""The exceptions lorakit raises.

Every error the library raises for bad input derives from :class:`LorakitError`, so a caller can
catch one base class. Each subclass also derives from the built-in exception a Python user would
expect (``ValueError`` for a bad value, ``KeyError``-free lookups, ...), so generic handlers keep
working. Messages name the module, field or value at fault and what is allowed.
"""

from __future__ import annotations


class LorakitError(Exception):
    """Base class of every error lorakit raises on purpose."""


class ConfigError(LorakitError, ValueError):
    """A configuration field holds a value that is not allowed."""


class TargetError(LorakitError, ValueError):
    """A target pattern matches nothing, or matches a module lorakit cannot adapt."""


class AdapterError(LorakitError, ValueError):
    """An adapter name is unknown, already taken, or not valid."""


class MergeError(LorakitError, RuntimeError):
    """Merging or unmerging an adapter would produce a wrong or non-finite weight."""


class AdapterFileError(LorakitError, ValueError):
    """An adapter directory cannot be read, written or loaded: a missing, corrupt or mismatched
    file, a base model it was not saved for, or a write that would replace something it must not."""


class DataError(LorakitError, ValueError):
    """A data file is missing, empty, or has a line that cannot be trained on."""


class QuantError(LorakitError, ValueError):
    """A weight cannot be quantized, or quantized data is inconsistent with what it claims."""


def gather(problems: list[str], error: type[LorakitError], header: str) -> None:
    """Raise ``error`` once with every problem listed, or return when there are none."""
    if not problems:
        return
    if len(problems) == 1:
        raise error(f"{header}: {problems[0]}")
    lines = "\n".join(f"  - {p}" for p in problems)
    raise error(f"{header} ({len(problems)} problems):\n{lines}")
