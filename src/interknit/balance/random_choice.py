"""Weighted random choice: no state, no coordination, and good enough with many callers.

With many proxies in front of the same pool, round robin's per-proxy rotations line up by chance
no better than random draws do, and random needs no shared state. It is also the baseline the
other policies are measured against.
"""

from __future__ import annotations

import random
from collections.abc import Container, Sequence
from itertools import accumulate

from interknit.balance.base import Endpoint
from interknit.balance.weights import WeightTable, draw

SLOW_START = 0.0


class RandomChoice:
    name = "random"

    def __init__(self, rng: random.Random | None = None, slow_start: float = SLOW_START) -> None:
        self._rng = rng if rng is not None else random.Random()
        self._table = WeightTable(slow_start)

    def set_endpoints(self, endpoints: Sequence[Endpoint], now: float) -> None:
        self._table.reset(endpoints)

    def pick(
        self, hash_key: bytes | None, now: float, exclude: Container[Endpoint] = ()
    ) -> Endpoint | None:
        table = self._table
        if not exclude:
            endpoints = table.endpoints
            if not endpoints:
                return None
            if now >= table.uniform_from:
                return endpoints[self._rng.randrange(len(endpoints))]
            cumulative = table.cumulative(now)
            if cumulative[-1] <= 0.0:
                return None
            return endpoints[draw(cumulative, self._rng)]
        endpoints, weights = table.candidates(now, exclude)
        if not endpoints:
            return None
        return endpoints[draw(list(accumulate(weights)), self._rng)]
