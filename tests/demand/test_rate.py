from __future__ import annotations

import contextlib

import pytest
from hypothesis import given
from hypothesis import strategies as st

from interknit.demand.rate import KeyedRateLimiter, TokenBucket, parse_rate


def test_parse_rate() -> None:
    assert parse_rate("500/s") == 500.0
    assert parse_rate("30/m") == 0.5
    assert parse_rate(" 7200 / h ") == 2.0
    for bad in ("500", "0/s", "-1/s", "5/d", "fast", ""):
        with pytest.raises(ValueError):
            parse_rate(bad)


@given(st.text(max_size=30))
def test_parse_rate_garbage_raises_only_value_error(text: str) -> None:
    with contextlib.suppress(ValueError):
        assert parse_rate(text) > 0


def test_bucket_allows_burst_then_refuses_with_refill_time() -> None:
    bucket = TokenBucket(rate=10.0, burst=3)
    assert [bucket.take(0.0) for _ in range(3)] == [0.0, 0.0, 0.0]
    # Empty: the next token arrives in 1/rate seconds.
    assert bucket.take(0.0) == pytest.approx(0.1)
    assert bucket.take(0.05) == pytest.approx(0.05)
    assert bucket.take(0.1) == 0.0
    # Refill never exceeds the burst.
    assert bucket.tokens(100.0) == 3.0


def test_bucket_sustains_its_rate() -> None:
    bucket = TokenBucket(rate=100.0, burst=1)
    allowed = sum(1 for i in range(1000) if bucket.take(i * 0.001) == 0.0)
    # 1 s at 100/s, plus the initial token.
    assert 100 <= allowed <= 101


def test_bucket_default_burst_is_one_second() -> None:
    assert TokenBucket(rate=50.0).burst == 50.0
    assert TokenBucket(rate=0.5).burst == 1.0
    with pytest.raises(ValueError):
        TokenBucket(rate=0.0)
    with pytest.raises(ValueError):
        TokenBucket(rate=1.0, burst=0)


def test_keyed_buckets_are_separate_and_bounded() -> None:
    keyed = KeyedRateLimiter(rate=1.0, burst=1, max_keys=3)
    assert keyed.take("a", 0.0) == 0.0
    assert keyed.take("a", 0.0) == pytest.approx(1.0)
    assert keyed.take("b", 0.0) == 0.0
    keyed.take("c", 0.0)
    keyed.take("a", 0.0)  # a is now the most recent
    keyed.take("d", 0.0)  # evicts b, the least recently used
    assert len(keyed) == 3
    assert keyed.take("a", 0.0) > 0.0  # a kept its empty bucket
    assert keyed.take("b", 0.0) == 0.0  # b came back fresh
