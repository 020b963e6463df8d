"""How a global micro-batch's rows are split between the processes of a data-parallel run.

Each process pads its rows to its own longest one, so its step costs about (its rows) x (its
longest row) token positions, and a step waits for the slowest process. Splitting the rows in
the order they were drawn gives one process the long rows by chance; :func:`balanced_shares`
sorts them by length and cuts the sorted list into consecutive pieces whose padded areas are as
even as they can be (the largest piece as small as possible: a short dynamic program over the
cut points, exact for these batch sizes). The split changes who computes which row, not what is
computed: every row is in exactly one share, and the run's loss and gradients are sums over rows
divided by the global token count (``distributed.py``), the same whatever the split.
"""

from __future__ import annotations

from collections.abc import Sequence


def balanced_shares(lengths: Sequence[int], parts: int) -> list[list[int]]:
    """Row indices for each of ``parts`` processes: every index once, each share non-empty when
    there are at least ``parts`` rows, sorted longest first; ties keep the drawn order, so every
    process computes the same split."""
    n = len(lengths)
    if parts <= 1:
        return [list(range(n))]
    if n <= parts:  # a row each (and nothing for the rest)
        return [[i] for i in range(n)] + [[] for _ in range(parts - n)]
    order = sorted(range(n), key=lambda i: (-lengths[i], i))
    longest = [lengths[i] for i in order]  # descending: a piece's first row is its longest

    def area(start: int, end: int) -> int:
        return (end - start) * longest[start]

    # best[k][j]: the smallest largest area cutting the first j sorted rows into k pieces
    inf = float("inf")
    best = [[inf] * (n + 1) for _ in range(parts + 1)]
    cut = [[0] * (n + 1) for _ in range(parts + 1)]
    best[0][0] = 0
    for k in range(1, parts + 1):
        for j in range(k, n - (parts - k) + 1):
            for i in range(k - 1, j):
                worst = max(best[k - 1][i], area(i, j))
                if worst < best[k][j]:
                    best[k][j], cut[k][j] = worst, i
    pieces, end = [], n
    for k in range(parts, 0, -1):
        start = cut[k][end]
        pieces.append(order[start:end])
        end = start
    return pieces[::-1]
