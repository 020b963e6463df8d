"""The split of a global micro-batch between processes (lorakit.train.shares) against a brute
force over every assignment of rows to processes."""

from __future__ import annotations

import itertools
import random

import pytest

from lorakit.train.shares import balanced_shares


def padded(lengths, share) -> int:
    return len(share) * max((lengths[i] for i in share), default=0)


def best_possible(lengths, parts) -> int:
    """The smallest largest padded area over every assignment with no empty share."""
    best = None
    for owner in itertools.product(range(parts), repeat=len(lengths)):
        shares = [[i for i, o in enumerate(owner) if o == p] for p in range(parts)]
        if any(not s for s in shares):
            continue
        worst = max(padded(lengths, s) for s in shares)
        best = worst if best is None else min(best, worst)
    return best


@pytest.mark.parametrize("parts", [2, 3])
def test_every_row_once_and_the_largest_padded_share_as_small_as_any_assignment(parts):
    rng = random.Random(parts)
    for _ in range(40):
        lengths = [rng.randint(1, 96) for _ in range(rng.randint(parts, 7))]
        shares = balanced_shares(lengths, parts)
        assert len(shares) == parts and all(shares)
        assert sorted(i for s in shares for i in s) == list(range(len(lengths)))
        assert max(padded(lengths, s) for s in shares) == best_possible(lengths, parts)
        assert balanced_shares(lengths, parts) == shares  # every process computes the same


def test_one_long_row_does_not_pad_a_whole_half_of_the_batch():
    lengths = [40, 90, 30, 35, 38, 42, 36, 33]  # the drawn halves: 4 x 90 and 4 x 42 positions
    shares = balanced_shares(lengths, 2)
    assert sorted(padded(lengths, s) for s in shares) == [180, 240]  # [90, 42] | the other six
    assert shares[0] == [1, 5]


def test_one_process_and_fewer_rows_than_processes():
    assert balanced_shares([5, 3, 9], 1) == [[0, 1, 2]]
    assert balanced_shares([5, 3], 3) == [[0], [1], []]
