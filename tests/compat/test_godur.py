"""Go's duration syntax, as Consul's clients write it and read it back."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from interknit.compat.godur import format_go_duration, parse_go_duration


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("120000ms", 120.0),
        ("1s", 1.0),
        ("0", 0.0),
        ("1m30s", 90.0),
        ("1h0m0s", 3600.0),
        ("1.5s", 1.5),
        (".5s", 0.5),
        ("300us", 0.0003),
        ("300\u00b5s", 0.0003),
        ("10ns", 1e-8),
        ("+2m", 120.0),
    ],
)
def test_parses_what_go_writes(text: str, seconds: float) -> None:
    assert parse_go_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize(
    "text", ["", "-1s", "10", "1x", "s", "1s2", "1 s", "9" * 70 + "s", "9999h"]
)
def test_refuses_with_a_reason(text: str) -> None:
    with pytest.raises(ValueError):
        parse_go_duration(text)


@pytest.mark.parametrize(
    ("seconds", "text"),
    [
        (0, "0s"),
        (0.5, "500ms"),
        (1.5, "1.5s"),
        (60, "1m0s"),
        (90, "1m30s"),
        (3600, "1h0m0s"),
        (3723.25, "1h2m3.25s"),
        (0.0003, "300\u00b5s"),
        (2e-9, "2ns"),
    ],
)
def test_formats_as_go_does(seconds: float, text: str) -> None:
    assert format_go_duration(seconds) == text


@given(st.integers(min_value=0, max_value=7 * 24 * 3600 * 1000))
def test_round_trip_in_milliseconds(ms: int) -> None:
    assert round(parse_go_duration(format_go_duration(ms / 1000)) * 1000) == ms


@given(st.text(max_size=80))
def test_garbage_is_a_value_error(text: str) -> None:
    try:
        seconds = parse_go_duration(text)
    except ValueError:
        return
    assert 0 <= seconds <= 7 * 24 * 3600
