"""Passive outlier detection, driven with injected time."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from interknit.health.outlier import OutlierDetector


def detector(members: int = 4, **kwargs: float) -> OutlierDetector[str]:
    d: OutlierDetector[str] = OutlierDetector(**kwargs)  # type: ignore[arg-type]
    d.set_members(f"e{i}" for i in range(members))
    return d


def fail(d: OutlierDetector[str], key: str, times: int, now: float) -> list[float | None]:
    return [d.on_result(key, False, now) for _ in range(times)]


def test_ejects_after_consecutive_failures() -> None:
    d = detector(consecutive_failures=5, base_ejection_time=30.0)
    assert fail(d, "e0", 4, 100.0) == [None] * 4
    assert not d.ejected("e0", 100.0)
    assert d.on_result("e0", False, 100.0) == 130.0
    assert d.ejected("e0", 100.0)
    assert d.ejected("e0", 129.9)
    assert not d.ejected("e0", 130.0)
    assert d.ejected_until("e0") == 130.0


def test_success_resets_the_count() -> None:
    d = detector(consecutive_failures=3)
    fail(d, "e0", 2, 0.0)
    assert d.on_result("e0", True, 0.0) is None
    assert fail(d, "e0", 2, 0.0) == [None, None]
    assert not d.ejected("e0", 0.0)


def test_results_while_ejected_are_ignored() -> None:
    d = detector(consecutive_failures=1, base_ejection_time=10.0)
    assert d.on_result("e0", False, 0.0) == 10.0
    # Late results of requests already in flight neither extend nor count.
    assert fail(d, "e0", 5, 1.0) == [None] * 5
    assert d.ejected_until("e0") == 10.0
    assert d.expire(10.0) == ["e0"]
    assert d.ejection_count("e0", 10.0) == 1


def test_returns_on_expiry() -> None:
    d = detector(consecutive_failures=1, base_ejection_time=30.0)
    d.on_result("e0", False, 0.0)
    d.on_result("e1", False, 5.0)
    assert d.next_expiry() == 30.0
    assert d.expire(29.9) == []
    assert d.expire(30.0) == ["e0"]
    assert d.next_expiry() == 35.0
    assert d.expire(100.0) == ["e1"]
    assert d.expire(100.0) == []
    assert d.next_expiry() is None
    assert d.ejected_until("e0") is None


def test_ejection_time_multiplies_with_each_ejection() -> None:
    d = detector(consecutive_failures=2, base_ejection_time=10.0, interval=1000.0)
    now = 0.0
    for n in (1, 2, 3):
        until = fail(d, "e0", 2, now)[-1]
        assert until == now + 10.0 * n
        assert d.expire(until) == ["e0"]
        now = until


def test_ejection_time_is_capped() -> None:
    d = detector(
        consecutive_failures=1, base_ejection_time=10.0, max_ejection_time=25.0, interval=1e6
    )
    now = 0.0
    durations = []
    for _ in range(4):
        until = d.on_result("e0", False, now)
        assert until is not None
        durations.append(until - now)
        d.expire(until)
        now = until
    assert durations == [10.0, 20.0, 25.0, 25.0]


def test_multiplier_decays_while_back_in_the_pool() -> None:
    d = detector(consecutive_failures=1, base_ejection_time=10.0, interval=10.0)
    assert d.on_result("e0", False, 0.0) == 10.0
    d.expire(10.0)
    assert d.on_result("e0", False, 10.0) == 30.0  # twice
    d.expire(30.0)
    assert d.ejection_count("e0", 30.0) == 2
    assert d.ejection_count("e0", 39.9) == 2
    assert d.ejection_count("e0", 40.0) == 1
    assert d.ejection_count("e0", 55.0) == 0
    assert d.on_result("e0", False, 60.0) == 70.0  # back to the base time


def test_expiry_without_an_expire_call_still_counts_as_returned() -> None:
    d = detector(consecutive_failures=1, base_ejection_time=10.0)
    d.on_result("e0", False, 0.0)
    # The caller has not called expire() yet; a failure after the time is up re-ejects.
    assert d.on_result("e0", False, 12.0) == 32.0
    assert d.expire(12.0) == ["e0"]  # the return in between is still reported once


def test_max_ejection_percent_caps_the_pool() -> None:
    d = detector(members=4, consecutive_failures=1, max_ejection_percent=50)
    assert d.on_result("e0", False, 0.0) is not None
    assert d.on_result("e1", False, 0.0) is not None
    assert d.on_result("e2", False, 0.0) is None  # a third would be 75%
    assert d.ejected_count(0.0) == 2
    assert not d.ejected("e2", 0.0)
    # When a slot frees, the next failure of the member still over the threshold ejects it.
    d.expire(30.0)
    assert d.on_result("e2", False, 30.0) is not None


def test_a_pool_of_one_is_never_ejected() -> None:
    d = detector(members=1, consecutive_failures=1, max_ejection_percent=50)
    assert fail(d, "e0", 10, 0.0) == [None] * 10


def test_full_percent_may_eject_everyone() -> None:
    d = detector(members=2, consecutive_failures=1, max_ejection_percent=100)
    assert d.on_result("e0", False, 0.0) is not None
    assert d.on_result("e1", False, 0.0) is not None


def test_unknown_and_removed_members_are_ignored() -> None:
    d = detector(members=2, consecutive_failures=1, max_ejection_percent=100)
    assert d.on_result("stranger", False, 0.0) is None
    assert d.on_result("e0", False, 0.0) == 30.0
    d.set_members(["e1", "e2"])
    assert sorted(d.members()) == ["e1", "e2"]
    assert not d.ejected("e0", 1.0)
    assert d.expire(100.0) == []
    # Coming back, it starts clean.
    d.set_members(["e0", "e1", "e2"])
    assert d.ejection_count("e0", 100.0) == 0
    assert not d.ejected("e0", 1.0)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"consecutive_failures": 0},
        {"base_ejection_time": 0},
        {"max_ejection_percent": 101},
        {"interval": 0},
    ],
)
def test_rejects_bad_parameters(kwargs: dict[str, float]) -> None:
    with pytest.raises(ValueError):
        OutlierDetector(**kwargs)  # type: ignore[arg-type]


@given(
    ops=st.lists(
        st.tuples(st.integers(0, 5), st.booleans(), st.floats(0, 20)),
        max_size=200,
    ),
    percent=st.sampled_from([0, 10, 34, 50, 100]),
)
def test_never_ejects_more_than_the_cap(ops: list[tuple[int, bool, float]], percent: float) -> None:
    d = detector(
        members=6, consecutive_failures=2, base_ejection_time=5.0, max_ejection_percent=percent
    )
    now = 0.0
    for member, ok, step in ops:
        now += step
        until = d.on_result(f"e{member}", ok, now)
        if until is not None:
            assert until > now
            assert d.ejected(f"e{member}", now)
        assert d.ejected_count(now) * 100 <= percent * 6
        for key in d.expire(now):
            assert not d.ejected(key, now)
