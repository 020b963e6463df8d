"""Run side-by-side benchmarks and record them in BENCHMARKS.md.

    python bench/run.py                  # every bench/bench_*.py
    python bench/run.py import           # only the benches named
    python bench/run.py --threads 4 --no-write

A benchmark is a module ``bench/bench_<name>.py`` that defines:

    NAME = "import"                      # what the command line selects it by
    TITLE = "Import cost"                # the section heading in BENCHMARKS.md
    ANCHOR_PACKAGES = ["peft"]           # optional: distributions whose versions are recorded
    def run(threads: int) -> list[dict]: ...

Each row of ``run`` has the keys:

    figure       what is measured (text)
    lorakit      lorakit's figure (a number, or None)
    anchor       the same figure for the anchor (a number, or None)
    anchor_name  what the anchor figure comes from ("peft", "bitsandbytes", "LoRA paper", ...)
    ratio        lorakit / anchor, or None to let the runner compute it
    goal         "<= 0.5x" (a bound on the ratio), "<= 0.3 s" (a bound on the lorakit figure), or ""
    unit         the unit of both figures ("s", "ms", "MiB", "params", ...)

A row may also carry ``met`` (a bool) when its goal cannot be read that way.

Each bench owns one section of BENCHMARKS.md, between ``<!-- bench:NAME -->`` and
``<!-- /bench:NAME -->``; a run rewrites only the sections of the benches it ran.
"""

from __future__ import annotations

import argparse
import datetime
import importlib
import importlib.metadata
import math
import os
import platform
import re
import shlex
import sys
import tempfile
from pathlib import Path
from types import ModuleType

BENCH_DIR = Path(__file__).resolve().parent
REPO_ROOT = BENCH_DIR.parent
DEFAULT_OUTPUT = REPO_ROOT / "BENCHMARKS.md"
ROW_KEYS = ("figure", "lorakit", "anchor", "anchor_name", "ratio", "goal", "unit")
_GOAL = re.compile(r"^\s*(<=|>=|<|>|==)\s*([-+]?[0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?)\s*(x|×)?")
_OPS = {
    "<=": lambda a, b: a <= b,
    ">=": lambda a, b: a >= b,
    "<": lambda a, b: a < b,
    ">": lambda a, b: a > b,
    "==": lambda a, b: a == b,
}


def discover() -> dict[str, ModuleType]:
    """Import every ``bench/bench_*.py`` and map its ``NAME`` to the module."""
    if str(BENCH_DIR) not in sys.path:
        sys.path.insert(0, str(BENCH_DIR))
    benches: dict[str, ModuleType] = {}
    for path in sorted(BENCH_DIR.glob("bench_*.py")):
        module = importlib.import_module(path.stem)
        missing = [attr for attr in ("NAME", "TITLE", "run") if not hasattr(module, attr)]
        if missing:
            raise SystemExit(f"{path.name}: a bench module must define {', '.join(missing)}")
        if module.NAME in benches:
            raise SystemExit(f"{path.name}: NAME {module.NAME!r} is already used")
        benches[module.NAME] = module
    return benches


def check_rows(name: str, rows: list[dict]) -> list[dict]:
    """Validate a bench's rows and fill in the ratio where the bench left it to the runner."""
    problems = []
    checked = []
    for i, row in enumerate(rows):
        missing = [key for key in ROW_KEYS if key not in row]
        if missing:
            problems.append(f"row {i} ({row.get('figure', '?')!r}) lacks {', '.join(missing)}")
            continue
        row = dict(row)
        if row["ratio"] is None and _is_number(row["lorakit"]) and _is_number(row["anchor"]):
            row["ratio"] = row["lorakit"] / row["anchor"] if row["anchor"] else None
        checked.append(row)
    if problems:
        raise SystemExit(f"bench {name!r} returned bad rows:\n  " + "\n  ".join(problems))
    return checked


def goal_met(row: dict) -> bool | None:
    """Whether the row meets its goal; None when there is no goal or nothing to compare."""
    if "met" in row:
        return row["met"]
    match = _GOAL.match(row["goal"] or "")
    if not match:
        return None
    op, bound, is_ratio = match.group(1), float(match.group(2)), match.group(3)
    value = row["ratio"] if is_ratio else row["lorakit"]
    if not _is_number(value):
        return None
    return _OPS[op](value, bound)


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def fmt(value: object, unit: str = "") -> str:
    if value is None or value == "":
        return "–"
    if isinstance(value, bool) or not isinstance(value, int | float):
        text = str(value)
    elif isinstance(value, int):
        text = f"{value:,}"
    else:
        text = f"{value:.4g}"
    return f"{text} {unit}".strip()


def table_rows(rows: list[dict]) -> list[list[str]]:
    out = []
    for row in rows:
        anchor = fmt(row["anchor"], row["unit"])
        if row["anchor"] is not None and row["anchor_name"]:
            anchor += f" ({row['anchor_name']})"
        ratio = "–" if row["ratio"] is None else f"{row['ratio']:.3g}x"
        met = goal_met(row)
        met_text = {True: "yes", False: "no", None: ""}[met]
        out.append(
            [row["figure"], fmt(row["lorakit"], row["unit"]), anchor, ratio, row["goal"], met_text]
        )
    return out


HEADER = ["figure", "lorakit", "anchor", "ratio", "goal", "met?"]


def print_table(title: str, rows: list[list[str]]) -> None:
    widths = [max(len(r[i]) for r in [HEADER, *rows]) for i in range(len(HEADER))]
    print(f"\n{title}")
    for r in [HEADER, ["-" * w for w in widths], *rows]:
        print("  ".join(cell.ljust(w) for cell, w in zip(r, widths)).rstrip())


def markdown_table(rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(HEADER) + " |", "|" + "---|" * len(HEADER)]
    for r in rows:
        cells = [cell.replace("|", "\\|") for cell in r]
        cells[-1] = "**no**" if cells[-1] == "no" else cells[-1]  # a missed goal stands out
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def cpu_model() -> str:
    """The CPU's model name and the widest vector instructions it has, with the kernels torch
    picked: AVX2 and AVX-512 machines run different GEMM kernels and give different ratios."""
    name, flags = "", set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name") and not name:
                name = line.split(":", 1)[1].strip()
            elif line.startswith("flags") and not flags:
                flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    name = name or platform.processor() or platform.machine() or "unknown"
    isa = "AVX-512" if "avx512f" in flags else "AVX2" if "avx2" in flags else ""
    import torch

    kernels = torch.backends.cpu.get_cpu_capability()
    return (
        f"{name}, {isa} (torch kernels: {kernels})" if isa else f"{name} (torch kernels: {kernels})"
    )


def package_version(name: str) -> str:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def section(module: ModuleType, rows: list[list[str]], command: str, threads: int) -> str:
    import torch

    anchors = getattr(module, "ANCHOR_PACKAGES", [])
    anchor_text = ", ".join(f"{p} {package_version(p)}" for p in anchors) or "–"
    date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    return "\n".join(
        [
            f"<!-- bench:{module.NAME} -->",
            f"## {module.TITLE}",
            "",
            f"- command: `{command}`",
            f"- date: {date}",
            f"- torch {torch.__version__}; anchors: {anchor_text}",
            f"- Python {platform.python_version()}; threads: {threads}; CPU: {cpu_model()}",
            "",
            markdown_table(rows),
            f"<!-- /bench:{module.NAME} -->",
        ]
    )


def replace_section(text: str, name: str, new: str) -> str:
    """Swap the section of bench ``name`` for ``new``, or append it; other text is kept as is."""
    pattern = re.compile(
        rf"^<!-- bench:{re.escape(name)} -->$.*?^<!-- /bench:{re.escape(name)} -->$",
        re.DOTALL | re.MULTILINE,
    )
    if pattern.search(text):
        return pattern.sub(lambda _: new, text, count=1)
    return text.rstrip("\n") + "\n\n" + new + "\n"


def write_atomically(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("names", nargs="*", help="benches to run (default: all)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (default: 2)")
    parser.add_argument("--no-write", action="store_true", help="print only; leave the file")
    parser.add_argument("--list", action="store_true", help="list the benches and exit")
    parser.add_argument(
        "--output", type=Path, default=DEFAULT_OUTPUT, help="markdown file (default: BENCHMARKS.md)"
    )
    args = parser.parse_args(argv)

    # Before torch is imported, so that its thread pools (and child processes) see it too.
    os.environ["OMP_NUM_THREADS"] = str(args.threads)
    os.environ["MKL_NUM_THREADS"] = str(args.threads)
    import torch

    torch.set_num_threads(args.threads)

    benches = discover()
    if args.list:
        for name, module in benches.items():
            print(f"{name:20s} {module.TITLE}")
        return 0
    unknown = [n for n in args.names if n not in benches]
    if unknown:
        parser.error(f"unknown bench {', '.join(unknown)}; available: {', '.join(benches)}")
    selected = args.names or list(benches)

    command = shlex.join(["python", "bench/run.py", *argv])
    for name in selected:
        module = benches[name]
        print(f">> {name}: {module.TITLE} (threads={args.threads})", flush=True)
        rows = table_rows(check_rows(name, module.run(args.threads)))
        print_table(module.TITLE, rows)
        if not args.no_write:
            path = args.output
            text = path.read_text(encoding="utf-8") if path.exists() else ""
            text = replace_section(text, name, section(module, rows, command, args.threads))
            write_atomically(path, text)
            print(f"wrote section {name!r} of {path.name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
