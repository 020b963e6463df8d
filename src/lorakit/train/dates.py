"""An example task, generated deterministically: normalise a written date to ISO ``YYYY-MM-DD``.

    python -m lorakit.train.dates OUT_DIR [--train 1000] [--held-out 64] [--seed 0]

writes ``OUT_DIR/train.jsonl`` and ``OUT_DIR/held_out.jsonl`` in the prompt/completion shape::

    {"prompt": "Convert to ISO date (YYYY-MM-DD): 5 Mar 1987", "completion": "1987-03-05"}

The two splits hold disjoint calendar dates, so a held-out answer cannot be remembered from
training; each date is written in one of :data:`STYLES` (the held-out split cycles through them
evenly). Nothing in lorakit treats this data specially: it is ordinary JSONL for ``lorakit train``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import random
from pathlib import Path

PROMPT = "Convert to ISO date (YYYY-MM-DD): "
MONTHS = (
    "January February March April May June July August September October November December"
).split()
FIRST_YEAR, LAST_YEAR = 1900, 2099


def _ordinal(d: int) -> str:
    suffix = "th" if 11 <= d % 100 <= 13 else {1: "st", 2: "nd", 3: "rd"}.get(d % 10, "th")
    return f"{d}{suffix}"


STYLES = {
    "March 5, 1987": lambda y, m, d: f"{MONTHS[m - 1]} {d}, {y}",
    "Mar 5, 1987": lambda y, m, d: f"{MONTHS[m - 1][:3]} {d}, {y}",
    "5 March 1987": lambda y, m, d: f"{d} {MONTHS[m - 1]} {y}",
    "5 Mar 1987": lambda y, m, d: f"{d} {MONTHS[m - 1][:3]} {y}",
    "3/5/1987": lambda y, m, d: f"{m}/{d}/{y}",
    "1987.03.05": lambda y, m, d: f"{y}.{m:02d}.{d:02d}",
    "March 5th, 1987": lambda y, m, d: f"{MONTHS[m - 1]} {_ordinal(d)}, {y}",
    "the 5th of March 1987": lambda y, m, d: f"the {_ordinal(d)} of {MONTHS[m - 1]} {y}",
}


def row(date: dt.date, style: str) -> dict[str, str]:
    """One prompt/completion pair for ``date`` written in ``style`` (a key of :data:`STYLES`)."""
    written = STYLES[style](date.year, date.month, date.day)
    return {"prompt": PROMPT + written, "completion": date.isoformat()}


def generate(n_train: int, n_held_out: int, seed: int = 0) -> tuple[list[dict], list[dict]]:
    """(train rows, held-out rows) over disjoint dates; the same arguments give the same rows."""
    first, last = dt.date(FIRST_YEAR, 1, 1).toordinal(), dt.date(LAST_YEAR, 12, 31).toordinal()
    if n_train + n_held_out > last - first + 1:
        raise ValueError(f"at most {last - first + 1} distinct dates between the years")
    rng = random.Random(seed)
    days = rng.sample(range(first, last + 1), n_train + n_held_out)
    dates = [dt.date.fromordinal(day) for day in days]
    styles = list(STYLES)
    held_out = [row(d, styles[i % len(styles)]) for i, d in enumerate(dates[:n_held_out])]
    train = [row(d, rng.choice(styles)) for d in dates[n_held_out:]]
    return train, held_out


def write(out_dir: str | Path, n_train: int = 1000, n_held_out: int = 64, seed: int = 0) -> None:
    """Write ``train.jsonl`` and ``held_out.jsonl`` into ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    train, held_out = generate(n_train, n_held_out, seed)
    for name, rows in (("train.jsonl", train), ("held_out.jsonl", held_out)):
        text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
        (out / name).write_text(text, encoding="utf-8")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir")
    parser.add_argument("--train", type=int, default=1000, help="training rows (default 1000)")
    parser.add_argument("--held-out", type=int, default=64, help="held-out rows (default 64)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    write(args.out_dir, args.train, args.held_out, args.seed)
    print(f"wrote {args.train} training and {args.held_out} held-out rows to {args.out_dir}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
