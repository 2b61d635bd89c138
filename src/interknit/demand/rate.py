"""Rate limits: token buckets per route and per client key.

A bucket holds up to ``burst`` tokens and refills at ``rate`` tokens a second; a request takes
one. An empty bucket answers how long until the next token, which becomes ``Retry-After`` on the
429. Per-client buckets live in a bounded table (least recently used keys are forgotten first),
so a flood of distinct client keys costs memory that is capped, not a leak. Sans-IO: ``now`` is
passed in.
"""

from __future__ import annotations

import re
from collections import OrderedDict

_RATE = re.compile(r"\s*(\d+(?:\.\d+)?)\s*/\s*(s|sec|second|m|min|minute|h|hour)\s*")
_PER = {"s": 1.0, "sec": 1.0, "second": 1.0, "m": 60.0, "min": 60.0, "minute": 60.0}
_PER.update({"h": 3600.0, "hour": 3600.0})


def parse_rate(text: str) -> float:
    """Requests per second in ``"500/s"``, ``"30/m"`` or ``"100/h"``; ValueError otherwise."""
    match = _RATE.fullmatch(text) if isinstance(text, str) else None
    if match is None:
        raise ValueError(f"{str(text)[:40]!r} is not a rate such as '500/s' or '30/m'")
    per_second = float(match.group(1)) / _PER[match.group(2)]
    if per_second <= 0.0:
        raise ValueError("a rate must be more than zero")
    return per_second


class TokenBucket:
    """``burst`` tokens refilled at ``rate`` a second; starts full."""

    __slots__ = ("_stamp", "_tokens", "burst", "rate")

    def __init__(self, rate: float, burst: float | None = None, now: float = 0.0) -> None:
        if rate <= 0.0:
            raise ValueError("rate must be more than zero")
        # Default burst: one second's worth, at least one request.
        self.burst = max(1.0, rate if burst is None else float(burst))
        if burst is not None and burst < 1:
            raise ValueError("burst must be at least 1")
        self.rate = rate
        self._tokens = self.burst
        self._stamp = now

    def take(self, now: float, cost: float = 1.0) -> float:
        """Take ``cost`` tokens: 0.0 when allowed, else seconds until they would be there."""
        tokens = self._tokens
        if now > self._stamp:
            tokens = min(self.burst, tokens + (now - self._stamp) * self.rate)
            self._stamp = now
        # The epsilon absorbs float drift in refills: 0.001 * 10 must buy a 100/s token.
        if tokens >= cost - 1e-9:
            self._tokens = max(0.0, tokens - cost)
            return 0.0
        self._tokens = tokens
        return (cost - tokens) / self.rate

    def refund(self, cost: float = 1.0) -> None:
        """Give back tokens taken for a request that was refused by a later check."""
        self._tokens = min(self.burst, self._tokens + cost)

    def tokens(self, now: float) -> float:
        """Tokens available at ``now`` (without taking any)."""
        if now <= self._stamp:
            return self._tokens
        return min(self.burst, self._tokens + (now - self._stamp) * self.rate)


class KeyedRateLimiter:
    """One ``TokenBucket`` per client key, at most ``max_keys`` of them (LRU)."""

    def __init__(self, rate: float, burst: float | None = None, max_keys: int = 10_000) -> None:
        if max_keys < 1:
            raise ValueError("max_keys must be at least 1")
        TokenBucket(rate, burst)  # validate once, here, rather than on a request
        self.rate = rate
        self.burst = burst
        self.max_keys = max_keys
        self._buckets: OrderedDict[str, TokenBucket] = OrderedDict()

    def take(self, key: str, now: float, cost: float = 1.0) -> float:
        """As ``TokenBucket.take`` for ``key``'s bucket."""
        buckets = self._buckets
        bucket = buckets.get(key)
        if bucket is None:
            bucket = TokenBucket(self.rate, self.burst, now)
            buckets[key] = bucket
            if len(buckets) > self.max_keys:
                # A forgotten key comes back with a full bucket: generous, but bounded.
                buckets.popitem(last=False)
        else:
            buckets.move_to_end(key)
        return bucket.take(now, cost)

    def refund(self, key: str, cost: float = 1.0) -> None:
        bucket = self._buckets.get(key)
        if bucket is not None:
            bucket.refund(cost)

    def __len__(self) -> int:
        return len(self._buckets)
