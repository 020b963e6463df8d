"""``lorakit init [NAME] [--example EXAMPLE] [--force]``: start a training config without a clone.

Writes NAME.yaml (default lorakit.yaml): every section and key of the training config with its
default and a one-line comment, read from the config's schema when the command runs. Set
data.train (and data.eval), then run ``lorakit train NAME.yaml``. With ``--example``, writes
one of the configs that ship with lorakit instead (the README's demo is ``date_demo``) together
with its data files, beside the config, so ``lorakit train`` runs it as it is. An existing file is
replaced only with ``--force``; each file is written to a temporary name and renamed into place.
"""

from __future__ import annotations

import argparse
import contextlib
import os
from pathlib import Path
from typing import Any

EPILOG = """examples:
  lorakit init                          # lorakit.yaml: every key, its default, a comment
  lorakit init my_task                  # my_task.yaml
  lorakit init --example date_demo      # date_demo.yaml and data/dates/*.jsonl; then:
  lorakit train date_demo.yaml
"""


def examples_dir() -> Any:
    """The directory of the example configs shipped in the package (package data)."""
    from importlib.resources import files

    return files("lorakit") / "examples"


def examples() -> list[str]:
    """The names of the shipped example configs (none when the package data is missing)."""
    folder = examples_dir()
    if not folder.is_dir():
        return []
    return sorted(p.name[: -len(".yaml")] for p in folder.iterdir() if p.name.endswith(".yaml"))


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "init",
        help="write a starter training config (or a shipped example) to start from",
        description=__doc__,
        epilog=EPILOG,
    )
    parser.add_argument(
        "name",
        nargs="?",
        metavar="NAME",
        help="the config file to write (.yaml added; default lorakit, or the example's name)",
    )
    parser.add_argument(
        "--example", choices=examples(), default=None, help="write a shipped example and its data"
    )
    parser.add_argument("--force", action="store_true", help="replace files that exist")
    parser.set_defaults(run=run)
    return parser


def starter_yaml(name: str = "lorakit.yaml") -> str:
    """The starter config (to be saved as ``name``): every key of the schema with its default
    and its comment."""
    import yaml

    from .._version import __version__
    from ..train.config import TrainConfig
    from ..train.config_comments import COMMENTS

    lines = [
        f"# A lorakit training config: every key with its default (lorakit {__version__}).",
        "# Only data.train is required; delete what you do not change. Then:",
        f"#   lorakit train {name}                  (section.key=value overrides may follow)",
        f"#   lorakit train {name} --print-config   (the resolved config; nothing loaded)",
        "# Data paths are relative to this file; output.dir to the working directory.",
    ]

    def comment(key: str) -> str:  # a key without a line yet is still written (a test asks)
        return f"  # {COMMENTS[key]}" if key in COMMENTS else ""

    for section, values in TrainConfig().to_dict().items():
        lines += ["", f"{section}:{comment(section)}"]
        pairs = []
        for key, value in values.items():
            text = yaml.safe_dump({key: value}, default_flow_style=True, width=10**6).strip()
            pairs.append((f"  {text[1:-1]}", comment(f"{section}.{key}")))  # {key: value}
        width = max((len(entry) for entry, _ in pairs), default=0)
        lines += [f"{entry:<{width}}{note}".rstrip() for entry, note in pairs]
    return "\n".join(lines) + "\n"


def _config_path(name: str | None, default: str) -> Path:
    path = Path(name or default)
    return path if path.suffix in (".yaml", ".yml") else path.with_name(path.name + ".yaml")


def _example_files(example: str, config: Path) -> dict[Path, bytes]:
    """{path to write: content}: the example's config as ``config`` and the data files it names,
    at the same paths relative to ``config`` as they are relative to the shipped config."""
    import yaml

    source = examples_dir() / f"{example}.yaml"
    text = source.read_bytes()
    data = (yaml.safe_load(text) or {}).get("data") or {}
    files = {config: text}
    for key in ("train", "eval"):
        relative = data.get(key)
        if isinstance(relative, str):
            piece = examples_dir()
            for part in Path(relative).parts:
                piece = piece / part
            files[config.parent / relative] = piece.read_bytes()
    return files


def _write_all(files: dict[Path, bytes]) -> None:
    """Write every file under a temporary name beside it, then rename each into place: an error
    while writing leaves no file changed, and no temporary file or new directory behind."""
    staged: list[tuple[Path, Path]] = []
    made: list[Path] = []  # directories created here, parents first
    done = False
    try:
        for path, content in files.items():
            missing = [d for d in (path.parent, *path.parent.parents) if not d.exists()]
            path.parent.mkdir(parents=True, exist_ok=True)
            made += reversed(missing)
            tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
            staged.append((tmp, path))
            with open(tmp, "wb") as f:
                f.write(content)
                f.flush()
                os.fsync(f.fileno())
        for tmp, path in staged:
            os.replace(tmp, path)
        done = True
    finally:
        for tmp, _ in staged:
            tmp.unlink(missing_ok=True)
        for directory in reversed(made if not done else []):
            with contextlib.suppress(OSError):  # not empty: something else wrote there
                directory.rmdir()


def run(args: argparse.Namespace) -> int:
    from ..errors import ConfigError

    try:
        import yaml  # noqa: F401
    except ModuleNotFoundError:
        raise ConfigError(
            "lorakit init writes YAML and needs PyYAML: pip install 'lorakit[train]'"
        ) from None
    config = _config_path(args.name, args.example or "lorakit")
    if args.example:
        files = _example_files(args.example, config)
    else:
        files = {config: starter_yaml(config.name).encode()}
    existing = [str(p) for p in files if p.exists() or p.is_symlink()]
    if existing and not args.force:
        raise ConfigError(
            f"{', '.join(existing)} already exist{'s' if len(existing) == 1 else ''}; "
            "pass --force to replace"
        )
    _write_all(files)
    print("wrote " + ", ".join(str(p) for p in files))
    if args.example:
        print(f"next: lorakit train {config}")
    else:
        print(f"next: set data.train (and data.eval) in {config}, then: lorakit train {config}")
    return 0
