"""The trim's grid search: bisection's answer, in fewer forward passes when the slack is linear."""

from __future__ import annotations

import math
import random

import pytest

from workers.editing.grid_search import smallest_passing


def bisection(n: int, passes: dict[int, bool]) -> tuple[int, int]:
    """The trim's former search: test n, then halve (lo, hi] until it is one point wide."""
    if not passes[n]:
        return n, 1
    lo, hi, made = 0, n, 1
    while hi - lo > 1:
        mid = (lo + hi) // 2
        made += 1
        lo, hi = (lo, mid) if passes[mid] else (mid, hi)
    return hi, made


def counted(table: dict[int, tuple[bool, float]]) -> tuple[list[int], object]:
    asked: list[int] = []

    def test(k: int) -> tuple[bool, float]:
        asked.append(k)
        return table[k]

    return asked, test


@pytest.mark.parametrize("seed", range(6))
def test_answer_is_bisections_on_monotone_tests(seed: int) -> None:
    rng = random.Random(seed)
    for _ in range(400):
        n = rng.choice([1, 2, 8, 32, 64])
        # the weakest of several curved rows, as the trim's lead over 8 contexts
        rows = [(rng.uniform(-9, 2), rng.uniform(2, 25), rng.uniform(-5, 5)) for _ in range(8)]

        def slack(k: int, rows: list[tuple[float, float, float]] = rows, n: int = n) -> float:
            s = k / n
            return min(a + b * s + c * s * s for a, b, c in rows) - 4

        # passing is monotone in k even where the slack is not (a top-1 miss also fails)
        lowest = next(
            (k for k in range(1, n + 1) if min(slack(j) for j in range(k, n + 1)) >= 0), None
        )
        table = {k: (lowest is not None and k >= lowest, slack(k)) for k in range(1, n + 1)}
        asked, test = counted(table)
        start = rng.choice([0.25, 0.5, 0.875])
        answer, made = smallest_passing(n, test, start)  # type: ignore[arg-type]
        assert answer == bisection(n, {k: v[0] for k, v in table.items()})[0]
        assert made == len(asked) and len(set(asked)) == len(asked)  # no point tested twice
        assert made <= 3 * math.log2(n) + 1 if n > 1 else made == 1


def test_a_linear_slack_takes_four_tests_where_bisection_takes_six() -> None:
    n = 32
    for root in (17.3, 20.0, 23.6, 28.1, 31.2):
        table = {k: (k >= math.ceil(root), 0.4 * (k - root)) for k in range(1, n + 1)}
        asked, test = counted(table)
        answer, made = smallest_passing(n, test)  # type: ignore[arg-type]
        assert answer == math.ceil(root) and made <= 4, asked
        assert bisection(n, {k: v[0] for k, v in table.items()}) == (answer, 6)


def test_unknown_slacks_fall_back_to_bisection() -> None:
    table = {k: (k >= 11, math.nan) for k in range(1, 33)}
    asked, test = counted(table)
    assert smallest_passing(32, test) == (11, 6)  # type: ignore[arg-type]
    assert asked == [32, 16, 8, 12, 10, 11]


def test_failing_at_the_top_returns_the_top_after_one_test() -> None:
    asked, test = counted({k: (False, -1.0) for k in range(1, 9)})
    assert smallest_passing(8, test) == (8, 1) and asked == [8]  # type: ignore[arg-type]


def test_passing_everywhere_goes_down_to_one() -> None:
    table = {k: (True, 5.0 + k) for k in range(1, 33)}
    _, test = counted(table)
    assert smallest_passing(32, test)[0] == 1  # type: ignore[arg-type]


def test_a_grid_without_points_is_refused() -> None:
    with pytest.raises(ValueError, match="n: must be >= 1"):
        smallest_passing(0, lambda k: (True, 0.0))


def test_a_first_test_near_the_usual_answer_saves_tests_and_keeps_the_answer() -> None:
    table = {k: (k >= 29, 0.3 * (k - 28.5)) for k in range(1, 33)}
    asked, test = counted(table)
    assert smallest_passing(32, test, first=0.875) == (29, 3)  # type: ignore[arg-type]
    assert asked == [32, 28, 29]
    with pytest.raises(ValueError, match="first: must be in"):
        smallest_passing(32, test, first=1.0)  # type: ignore[arg-type]
