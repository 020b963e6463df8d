"""``lorakit COMMAND ...``: the command-line entry point.

Each command is a module ``lorakit/cli/<name>.py`` that defines ``add_parser(subparsers)``: it
adds its subparser with ``subparsers.add_parser(name, ...)``, its arguments, and
``set_defaults(run=run)`` where ``run(args) -> int`` does the work. Every module of this package
that defines ``add_parser`` is a command, so a new command is one new module (``export_gguf.py``
adds ``export-gguf``: a command's name is its module's with dashes for underscores). Command modules
import nothing heavy at module level (transformers, safetensors and the model code are imported by
``run``), so building the parser and ``--help`` stay fast.

Errors lorakit raises on purpose (bad input, a file that does not fit) print one message and exit
with status 2, as usage errors do (argparse's status), so scripts tell them from a crash (1). A
message that names a keyword argument of the library (``overwrite=True``) names the command's flag
instead (``--overwrite``): each command's flags are read from its parser, so a flag and the keyword
it sets share a name; a command whose flags build a library object under other names sets
``args.keywords`` ({library name: flag}, see ``with_flags``) before it builds it.
When the reader of the output goes away (``lorakit inspect DIR --json | head``), the command stops
quietly with status 141 (128 + SIGPIPE), as a Unix tool killed by SIGPIPE does, so a pipeline
under ``set -o pipefail`` still sees that the output was cut short. Help texts are the commands'
docstrings with their reStructuredText markup removed. Warnings lorakit raises print as one line,
``lorakit COMMAND: warning: ...``, with flags named as in errors.
"""

from __future__ import annotations

import argparse
import importlib
import os
import pkgutil
import re
import sys
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path

# The status of a command whose output pipe closed early: 128 + SIGPIPE, as the shell reports
# for a tool killed by the signal (Python ignores SIGPIPE, so it surfaces as BrokenPipeError).
BROKEN_PIPE_STATUS = 141
PACKAGE_DIR = Path(__file__).resolve().parents[1]  # lorakit/

# The order commands are listed in; a command module not named here comes after, by name.
ORDER = ("init", "train", "eval", "generate", "chat", "serve", "merge", "inspect")


def commands() -> list[str]:
    """The names of the command modules of this package, in ``ORDER``."""
    path = importlib.import_module(__package__).__path__
    names = [
        info.name
        for info in pkgutil.iter_modules(path)
        if info.name != "main" and not info.name.startswith("_")
    ]
    rank = {name: i for i, name in enumerate(ORDER)}
    return sorted(names, key=lambda n: (rank.get(n, len(ORDER)), n))


def plain(text: str) -> str:
    """``text`` without reStructuredText markup: ````x```` and ``:mod:`x``` read ``x``,
    ``:class:`~a.B``` reads ``B``."""
    text = re.sub(r":[a-z]+:`~[\w.]*?(\w+)`", r"\1", text)
    text = re.sub(r":[a-z]+:`([^`]+)`", r"\1", text)
    return text.replace("``", "")


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Descriptions and epilogs as written (line breaks kept), every text without markup."""

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        return super()._fill_text(plain(text), width, indent)

    def _split_lines(self, text: str, width: int) -> list[str]:
        return super()._split_lines(plain(text), width)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lorakit",
        description="LoRA adapters for PyTorch and transformers models.",
        formatter_class=HelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"lorakit {_version()}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in commands():
        module = importlib.import_module(f"{__package__}.{name}")
        if hasattr(module, "add_parser"):
            module.add_parser(subparsers)
    for command in subparsers.choices.values():
        command.formatter_class = HelpFormatter
    return parser


def command_parser(parser: argparse.ArgumentParser, name: str) -> argparse.ArgumentParser:
    """The subparser of the command ``name``."""
    (subparsers,) = (a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return subparsers.choices[name]


def with_flags(
    message: str, parser: argparse.ArgumentParser, keywords: Mapping[str, str] | None = None
) -> str:
    """``message`` as a user of the command line reads it: each keyword argument of the library
    is written as the command's flag that sets it; other text is left as it is.

    ``name=True`` becomes the store-true flag whose ``dest`` is ``name`` (``overwrite=True`` ->
    ``--overwrite``). ``keywords`` ({library name: flag}) names the fields a command builds from
    flags of other names (``inspect``'s plan options build a ``LoraConfig``): ``name=value``
    becomes ``flag value``, and a name with an underscore becomes the flag wherever it stands
    (``target_modules entry 'x'`` -> ``--target entry 'x'``). A dotted config key
    (``training.batch_size``) is never touched.
    """
    switches = {
        action.dest: max(action.option_strings, key=len)
        for action in parser._actions
        if isinstance(action, argparse._StoreTrueAction)
    }
    word = r"(?<![\w.-])"  # a whole name, not the tail of a dotted key or of a flag
    message = re.sub(
        word + r"([a-z_]+)=True\b", lambda m: switches.get(m.group(1), m.group(0)), message
    )
    for name, flag in (keywords or {}).items():
        message = re.sub(word + re.escape(name) + "=", flag + " ", message)
        if "_" in name:
            message = re.sub(word + re.escape(name) + r"\b(?![=.])", flag, message)
    return message


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("lorakit")
    except PackageNotFoundError:  # pragma: no cover - running from a source tree
        return "unknown"


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command; returns the exit status (the console script exits with it)."""
    try:
        try:
            return _run(argv)
        finally:  # output still buffered meets a closed pipe here, not at interpreter exit
            sys.stdout.flush()
    except BrokenPipeError:
        _discard_output()
        return BROKEN_PIPE_STATUS


def _run(argv: Sequence[str] | None) -> int:
    from ..errors import LorakitError

    parser = build_parser()
    args = parser.parse_args(argv)
    command = command_parser(parser, args.command)

    def said(text: object) -> str:
        return with_flags(str(text), command, getattr(args, "keywords", None))

    def show_warning(message, category, filename, lineno, file=None, line=None) -> None:
        if Path(filename).resolve().is_relative_to(PACKAGE_DIR):  # lorakit's own: one line
            print(f"lorakit {args.command}: warning: {said(message)}", file=sys.stderr)
        else:
            default_show_warning(message, category, filename, lineno, file, line)

    default_show_warning = warnings.showwarning
    try:
        with warnings.catch_warnings():
            warnings.showwarning = show_warning
            return int(args.run(args) or 0)
    except BrokenPipeError:
        raise
    except (LorakitError, OSError) as exc:
        print(f"lorakit {args.command}: error: {said(exc)}", file=sys.stderr)
        return 2


def _discard_output() -> None:
    """Point stdout and stderr at the null device, so the interpreter's last flush of what is
    still buffered for the closed pipe neither fails nor prints a warning."""
    null = os.open(os.devnull, os.O_WRONLY)
    for stream in (sys.stdout, sys.stderr):
        try:
            os.dup2(null, stream.fileno())
        except (AttributeError, OSError, ValueError):  # not a real file (a test's capture)
            pass
    os.close(null)


if __name__ == "__main__":
    sys.exit(main())
