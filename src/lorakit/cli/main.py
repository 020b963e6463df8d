"""``lorakit COMMAND ...``: the command-line entry point.

Each command is a module ``lorakit/cli/<name>.py`` that defines ``add_parser(subparsers)``: it
adds its subparser with ``subparsers.add_parser(name, ...)``, its arguments, and
``set_defaults(run=run)`` where ``run(args) -> int`` does the work. Every module of this package
that defines ``add_parser`` is a command, so a new command is one new module. Command modules
import nothing heavy at module level (transformers, safetensors and the model code are imported by
``run``), so building the parser and ``--help`` stay fast.

Errors lorakit raises on purpose (bad input, a file that does not fit) print one message and exit
with status 1; usage errors exit with status 2, as argparse does.
"""

from __future__ import annotations

import argparse
import importlib
import pkgutil
import sys
from collections.abc import Sequence

# The order commands are listed in; a command module not named here comes after, by name.
ORDER = ("train", "eval", "generate", "chat", "merge", "inspect", "bench")


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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lorakit",
        description="LoRA adapters for PyTorch and transformers models.",
    )
    parser.add_argument("--version", action="version", version=f"lorakit {_version()}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in commands():
        module = importlib.import_module(f"{__package__}.{name}")
        if hasattr(module, "add_parser"):
            module.add_parser(subparsers)
    return parser


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("lorakit")
    except PackageNotFoundError:  # pragma: no cover - running from a source tree
        return "unknown"


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command; returns the exit status (the console script exits with it)."""
    from ..errors import LorakitError

    args = build_parser().parse_args(argv)
    try:
        return int(args.run(args) or 0)
    except (LorakitError, OSError) as exc:
        print(f"lorakit {args.command}: error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
