from __future__ import annotations

import math

import pytest

from interknit.balance.base import Endpoint, effective_weight


def ep(weight: int = 4, since: float = 100.0) -> Endpoint:
    return Endpoint(key="svc/a", address="10.0.0.1", port=80, weight=weight, since=since)


@pytest.mark.parametrize(
    ("now", "expected"),
    [(100.0, 0.4), (101.0, 0.4), (105.0, 2.0), (107.5, 3.0), (110.0, 4.0), (1e9, 4.0)],
)
def test_slow_start_ramp_is_linear_with_a_floor(now: float, expected: float) -> None:
    assert effective_weight(ep(), now, slow_start=10.0) == pytest.approx(expected)


def test_no_slow_start_and_odd_weights() -> None:
    assert effective_weight(ep(), 100.0, slow_start=0.0) == 4.0
    assert effective_weight(ep(since=-math.inf), 0.0, slow_start=10.0) == 4.0
    assert effective_weight(ep(weight=0), 105.0, slow_start=10.0) == 0.0
    assert effective_weight(ep(weight=-3), 105.0, slow_start=0.0) == 0.0


def test_inflight_never_goes_negative() -> None:
    endpoint = ep()
    endpoint.started()
    endpoint.finished()
    endpoint.finished()
    assert endpoint.inflight == 0
