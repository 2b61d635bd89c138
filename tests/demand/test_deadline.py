from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from interknit.demand.deadline import (
    ServiceTimes,
    format_remaining,
    parse_grpc_timeout,
    parse_request_timeout,
    request_deadline,
)


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("250ms", 0.25), ("2s", 2.0), ("1.5", 1.5), (b"3", 3.0), (" 1m ", 60.0), ("0", 0.0)],
)
def test_parse_request_timeout(text: str | bytes, seconds: float) -> None:
    assert parse_request_timeout(text) == pytest.approx(seconds)


@pytest.mark.parametrize("text", ["", "-1", "1e3", "nan", "inf", "2 s", "ms", "1.", "\xff"])
def test_parse_request_timeout_rejects(text: str) -> None:
    with pytest.raises(ValueError):
        parse_request_timeout(text)


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("100m", 0.1), ("2S", 2.0), ("1M", 60.0), ("1H", 3600.0), ("5000u", 0.005), ("7n", 7e-9)],
)
def test_parse_grpc_timeout(text: str, seconds: float) -> None:
    assert parse_grpc_timeout(text) == pytest.approx(seconds)


@pytest.mark.parametrize("text", ["", "100", "123456789S", "1s", "m", "-1S", "1.5S"])
def test_parse_grpc_timeout_rejects(text: str) -> None:
    with pytest.raises(ValueError):
        parse_grpc_timeout(text)


@given(st.one_of(st.text(max_size=40), st.binary(max_size=40)))
def test_header_parsers_raise_only_value_error(value: str | bytes) -> None:
    for parse in (parse_request_timeout, parse_grpc_timeout):
        try:
            seconds = parse(value)
        except ValueError:
            continue
        assert 0.0 <= seconds <= 7 * 24 * 3600.0


@given(st.one_of(st.none(), st.text(max_size=20), st.binary(max_size=20)))
def test_request_deadline_ignores_garbage(value: str | bytes | None) -> None:
    deadline = request_deadline(100.0, value, value, default_timeout=2.0)
    assert deadline is not None and 100.0 <= deadline <= 102.0


def test_request_deadline_precedence() -> None:
    assert request_deadline(10.0, "250ms", "2S", 5.0) == pytest.approx(10.25)
    assert request_deadline(10.0, "junk", "2S", 5.0) == pytest.approx(12.0)
    assert request_deadline(10.0, None, None, 5.0) == pytest.approx(15.0)
    # The route's timeout caps what a caller asks for.
    assert request_deadline(10.0, "60s", None, 5.0) == pytest.approx(15.0)
    assert request_deadline(10.0, None, None, None) is None


def test_format_remaining() -> None:
    assert format_remaining(10.25, 10.0) == "250ms"
    assert format_remaining(9.0, 10.0) == "0ms"
    assert parse_request_timeout(format_remaining(12.0, 10.0)) == pytest.approx(2.0)


def test_service_times_median_of_recent_samples() -> None:
    times = ServiceTimes(size=5, every=1)
    assert times.median == 0.0
    for value in (0.1, 0.2, 0.3, 10.0, 0.2):
        times.add(value)
    assert times.median == pytest.approx(0.2)
    for value in (1.0, 1.0, 1.0):
        times.add(value)  # the ring forgets the oldest
    assert times.median == pytest.approx(1.0)
    times.add(float("nan"))
    times.add(-1.0)
    assert len(times) == 5


def test_service_times_recompute_lazily() -> None:
    times = ServiceTimes(size=64, every=8)
    for _ in range(64):
        times.add(0.01)
    for _ in range(7):
        times.add(5.0)
    assert times.median == pytest.approx(0.01)  # not re-sorted yet
    for _ in range(30):
        times.add(5.0)
    assert times.median == pytest.approx(5.0)
