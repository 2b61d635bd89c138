"""LogThrottle: a burst, then one line a second, each line saying how many it stands for."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from interknit.logs import LogThrottle


def test_a_burst_then_one_a_second_with_the_count_left_out() -> None:
    throttle = LogThrottle(every=1.0, burst=3)
    assert [throttle.allow(0.0) for _ in range(5)] == [0, 0, 0, None, None]
    assert throttle.allow(0.5) is None
    assert throttle.allow(1.0) == 3  # the three left out since the last line
    assert throttle.allow(1.1) is None
    assert throttle.allow(100.0) == 1
    assert [throttle.allow(100.0) for _ in range(3)] == [0, 0, None]


@given(st.lists(st.floats(0, 10), min_size=1, max_size=300))
def test_lines_written_never_exceed_the_burst_plus_the_time(gaps: list[float]) -> None:
    throttle = LogThrottle(every=1.0, burst=10)
    now = 0.0
    written = left_out = 0
    for gap in gaps:
        now += gap
        held = throttle.allow(now)
        if held is None:
            left_out += 1
        else:
            written += 1
            left_out -= held
    assert written <= 10 + now + 1e-9
    assert left_out == throttle.held
