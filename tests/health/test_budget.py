"""CheckBudget: never more than ``rate`` starts a second over any window, and never a wait
when a token is there."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from interknit.health.budget import CheckBudget


def test_a_seconds_worth_at_once_then_one_per_token() -> None:
    budget = CheckBudget(10)
    assert [budget.wait(0.0) for _ in range(10)] == [0.0] * 10
    assert budget.wait(0.0) == pytest.approx(0.1)
    assert budget.wait(0.05) == pytest.approx(0.05)
    assert budget.wait(0.1) == 0.0
    assert budget.wait(0.1) == pytest.approx(0.1)
    assert budget.wait(100.0) == 0.0  # a long quiet refills it, to a second's worth only
    assert sum(budget.wait(100.0) == 0.0 for _ in range(20)) == 9


@given(st.floats(0.5, 1000.0), st.lists(st.floats(0.0, 0.2), min_size=1, max_size=400))
def test_starts_over_any_time_are_bounded_by_the_rate(rate: float, gaps: list[float]) -> None:
    """A scheduler that starts a check whenever the budget says 0 and otherwise sleeps the
    time it is told: over the whole run, at most a second's worth plus rate x elapsed."""
    budget = CheckBudget(rate)
    now = 0.0
    started = 0
    for gap in gaps:
        now += gap
        wait = budget.wait(now)
        if wait == 0.0:
            started += 1
        else:
            assert wait > 0.0
            now += wait
            assert budget.wait(now) == 0.0  # after the wait it was told, it may start
            started += 1
    assert started <= max(1.0, rate) + rate * now + 1e-6
