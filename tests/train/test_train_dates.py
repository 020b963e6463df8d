"""The example task: dates written in several styles, to ISO; deterministic, disjoint splits."""

import datetime as dt
from pathlib import Path

from lorakit.train import dates
from lorakit.train.data import read_jsonl

EXAMPLE_DATA = Path(__file__).parents[2] / "examples" / "data" / "dates"


def test_every_style_writes_the_same_date():
    day = dt.date(1987, 3, 5)
    written = [dates.row(day, style)["prompt"].removeprefix(dates.PROMPT) for style in dates.STYLES]
    assert written == list(dates.STYLES)  # each style's name is its own rendering of 1987-03-05
    assert {dates.row(day, s)["completion"] for s in dates.STYLES} == {"1987-03-05"}
    assert dates.row(dt.date(2001, 11, 12), "March 5th, 1987")["prompt"].endswith(
        "November 12th, 2001"
    )
    assert dates.row(dt.date(2001, 1, 23), "the 5th of March 1987")["prompt"].endswith(
        "23rd of January 2001"
    )


def test_splits_are_deterministic_disjoint_and_cover_the_styles():
    train, held_out = dates.generate(300, 40, seed=3)
    assert (train, held_out) == dates.generate(300, 40, seed=3)
    assert dates.generate(300, 40, seed=4) != (train, held_out)
    answers = {r["completion"] for r in train}
    assert len(answers) == 300 and not answers & {r["completion"] for r in held_out}
    assert len({r["prompt"] for r in held_out[: len(dates.STYLES)]}) == len(dates.STYLES)
    for r in train + held_out:
        assert dt.date.fromisoformat(r["completion"]).isoformat() == r["completion"]


def test_the_committed_example_data_is_what_the_generator_writes(tmp_path):
    dates.write(tmp_path)  # the defaults: 1000 training rows, 64 held-out, seed 0
    for name in ("train.jsonl", "held_out.jsonl"):
        assert (tmp_path / name).read_text() == (EXAMPLE_DATA / name).read_text()
    assert len(read_jsonl(EXAMPLE_DATA / "held_out.jsonl")) == 64
