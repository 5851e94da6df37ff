"""The smallest point of a grid at which a monotone test passes, in fewer tests than bisection.

LOKI's trim asks, per edit, for the smallest scale k/n of the change at which the target still
leads by the required margin. Each test is a forward pass, so the number of tests is the trim's
cost. The test also reports a slack (how far above its bars the weakest prompt is), which is
near linear in the scale close to the answer, so the root of the line through two tested points
predicts the answer and a test just beside the prediction confirms it. Under monotonicity the
answer is exactly bisection's (a prediction only chooses which point of the bracket to test).
On 10 trimmed CounterFact edits (records 0–9, lead ≥ 4 in 8 contexts, n = 32): 28 tests where
bisection took 45; the 7 that were trimmed took 3–5 tests where bisection took 6.
"""

from __future__ import annotations

import math
from collections.abc import Callable

# test(k) -> (passes at k/n, slack at k/n: ≥ 0 where it passes, NaN or ±inf if not known)
GridTest = Callable[[int], tuple[bool, float]]


def smallest_passing(n: int, test: GridTest, first: float = 0.5) -> tuple[int, int]:
    """(k, tests made): the smallest k in 1..n whose test passes, assuming it passes from some
    k on and 0 fails; k = n when the test fails at n as well. ``first``: where (as a fraction of
    n) to test after n, before a line can be drawn: where the answer usually is."""
    if n < 1:
        raise ValueError(f"n: must be >= 1, got {n}")
    if not 0 < first < 1:
        raise ValueError(f"first: must be in (0, 1), got {first}")
    made = 1
    passes, slack = test(n)
    if not passes:
        return n, made
    lo, hi = 0, n
    slacks: dict[int, float] = {n: slack}
    kept_end = 0  # which end the last two tests kept: +1 hi, -1 lo (Illinois' rule below)
    predictions = 0
    while hi - lo > 1:
        line = _line(slacks, lo, hi)
        if made == 1:
            k = min(max(round(first * n), 1), n - 1)
        elif predictions >= 4 or line is None:
            k, predictions = (lo + hi) // 2, 0
        else:
            (x0, y0), (x1, y1) = line
            root = x0 - y0 * (x1 - x0) / (y1 - y0)
            k, predictions = min(max(math.ceil(root), lo + 1), hi - 1), predictions + 1
        passes, slack = test(k)
        made += 1
        slacks[k] = slack
        moved = -1 if passes else 1  # passing moves hi down, so lo was kept
        if moved == kept_end and lo in slacks and hi in slacks:
            # the same end kept twice: the line leans on it too hard (a concave slack puts every
            # root on one side), so halve its slack, as the Illinois variant of regula falsi does
            end = lo if passes else hi
            slacks[end] /= 2
        kept_end = moved
        lo, hi = (lo, k) if passes else (k, hi)
    return hi, made


def _line(slacks: dict[int, float], lo: int, hi: int) -> tuple[tuple[int, float], ...] | None:
    """Two known points to draw the slack's line through: the bracket's ends when both are
    known, else hi and the nearest known point above it (extrapolating down)."""
    above = sorted(k for k in slacks if k >= hi and math.isfinite(slacks[k]))
    if lo in slacks and math.isfinite(slacks[lo]) and above and above[0] == hi:
        pair = ((lo, slacks[lo]), (hi, slacks[hi]))
    elif len(above) >= 2 and above[0] == hi:
        pair = ((hi, slacks[hi]), (above[1], slacks[above[1]]))
    else:
        return None
    return pair if pair[1][1] > pair[0][1] else None
