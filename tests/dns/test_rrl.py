"""Response rate limiting per client prefix, driven by a fake clock."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from interknit.dns.rrl import RateLimiter, RrlConfig, Verdict


def limiter(**kw: object) -> RateLimiter:
    kw.setdefault("exempt", ())
    return RateLimiter(RrlConfig(**kw))  # type: ignore[arg-type]


def test_burst_then_drop_and_slip() -> None:
    rrl = limiter(rate=10.0, burst=5.0, slip=2)
    assert [rrl.check("198.51.100.7", 0.0) for _ in range(5)] == [Verdict.ALLOW] * 5
    assert [rrl.check("198.51.100.7", 0.0) for _ in range(4)] == [
        Verdict.DROP,
        Verdict.SLIP,
        Verdict.DROP,
        Verdict.SLIP,
    ]


def test_slip_zero_drops_everything() -> None:
    rrl = limiter(rate=1.0, burst=1.0, slip=0)
    assert rrl.check("198.51.100.7", 0.0) is Verdict.ALLOW
    assert {rrl.check("198.51.100.7", 0.0) for _ in range(10)} == {Verdict.DROP}


def test_bucket_refills_at_rate() -> None:
    rrl = limiter(rate=10.0, burst=5.0)
    for _ in range(5):
        rrl.check("198.51.100.7", 0.0)
    assert rrl.check("198.51.100.7", 0.0) is not Verdict.ALLOW
    assert rrl.check("198.51.100.7", 0.1) is Verdict.ALLOW  # one token back after 100ms
    assert rrl.check("198.51.100.7", 0.1) is not Verdict.ALLOW
    # A long pause refills up to the burst, no further.
    results = [rrl.check("198.51.100.7", 100.0) for _ in range(6)]
    assert results.count(Verdict.ALLOW) == 5


def test_ipv4_slash_24_shares_a_bucket() -> None:
    rrl = limiter(rate=1.0, burst=2.0)
    assert rrl.check("198.51.100.1", 0.0) is Verdict.ALLOW
    assert rrl.check("198.51.100.200", 0.0) is Verdict.ALLOW
    assert rrl.check("198.51.100.9", 0.0) is not Verdict.ALLOW
    assert rrl.check("198.51.101.9", 0.0) is Verdict.ALLOW  # another /24


def test_ipv6_slash_56_shares_a_bucket() -> None:
    rrl = limiter(rate=1.0, burst=1.0)
    assert rrl.check("2001:db8:0:100::1", 0.0) is Verdict.ALLOW
    assert rrl.check("2001:db8:0:1ff::2", 0.0) is not Verdict.ALLOW  # same /56
    assert rrl.check("2001:db8:0:200::1", 0.0) is Verdict.ALLOW  # next /56


def test_loopback_is_exempt_by_default() -> None:
    rrl = RateLimiter(RrlConfig(rate=1.0, burst=1.0))
    assert {rrl.check("127.0.0.1", 0.0) for _ in range(100)} == {Verdict.ALLOW}
    assert {rrl.check("::1", 0.0) for _ in range(100)} == {Verdict.ALLOW}
    assert len(rrl) == 0


def test_memory_is_bounded_by_max_prefixes() -> None:
    rrl = limiter(rate=1.0, burst=2.0, max_prefixes=50)
    for i in range(1000):
        rrl.check(f"10.{i // 256}.{i % 256}.1", float(i))
    assert len(rrl) <= 50


@given(times=st.lists(st.floats(0, 10, allow_nan=False), min_size=1, max_size=200))
def test_never_more_than_burst_plus_rate_times_elapsed(times: list[float]) -> None:
    times.sort()
    rrl = limiter(rate=5.0, burst=3.0)
    allowed = sum(rrl.check("203.0.113.5", t) is Verdict.ALLOW for t in times)
    assert allowed <= 3 + 5.0 * (times[-1] - times[0]) + 1e-9


def test_bad_config_is_rejected() -> None:
    with pytest.raises(ValueError):
        RrlConfig(rate=0)
    with pytest.raises(ValueError):
        RrlConfig(slip=-1)
