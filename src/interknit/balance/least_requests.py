"""Least requests by the power of two choices, weighted.

Scanning every endpoint for the least loaded one is O(n) per request and herds: every proxy
that saw the same counts sends its next burst to the same endpoint. Drawing ``choices`` (2)
endpoints at random and taking the less loaded of them is O(1), almost as good at evening out
load, and does not herd (Mitzenmacher, "The Power of Two Choices in Randomized Load Balancing").

Weights enter twice: candidates are drawn in proportion to effective weight, and load is
compared as outstanding requests per unit of weight, so an endpoint of weight 2 is as "busy"
with two requests as one of weight 1 is with one. When nothing is outstanding the first draw
wins ties, so an idle pool is shared in proportion to weight.
"""

from __future__ import annotations

import random
from collections.abc import Container, Sequence
from itertools import accumulate

from interknit.balance.base import Endpoint
from interknit.balance.weights import WeightTable, draw

# Endpoints drawn per pick; 2 is the classic choice, more approaches a full scan.
CHOICES = 2
SLOW_START = 0.0


class LeastRequests:
    name = "least_requests"

    def __init__(
        self,
        rng: random.Random | None = None,
        slow_start: float = SLOW_START,
        choices: int = CHOICES,
    ) -> None:
        if choices < 1:
            raise ValueError("choices must be at least 1")
        self._rng = rng if rng is not None else random.Random()
        self._table = WeightTable(slow_start)
        self._choices = choices

    def set_endpoints(self, endpoints: Sequence[Endpoint], now: float) -> None:
        self._table.reset(endpoints)

    def pick(
        self, hash_key: bytes | None, now: float, exclude: Container[Endpoint] = ()
    ) -> Endpoint | None:
        table = self._table
        rng = self._rng
        if not exclude and now >= table.uniform_from:
            return self._pick_uniform(table.endpoints, rng)
        if exclude:
            endpoints, weights = table.candidates(now, exclude)
            cumulative = list(accumulate(weights))
        else:
            endpoints = table.endpoints
            weights = table.weights(now)
            cumulative = table.cumulative(now)
        count = len(endpoints)
        if count == 0 or cumulative[-1] <= 0.0:
            return None
        if count == 1:
            return endpoints[0]
        best = draw(cumulative, rng)
        best_load = endpoints[best].inflight / weights[best]
        seen = {best}
        # Redraw a repeat a few times: comparing an endpoint with itself wastes a choice.
        attempts = 4 * self._choices
        while len(seen) < min(self._choices, count) and attempts:
            attempts -= 1
            i = draw(cumulative, rng)
            if i in seen:
                continue
            seen.add(i)
            load = endpoints[i].inflight / weights[i]
            if load < best_load:
                best, best_load = i, load
        return endpoints[best]

    def _pick_uniform(self, endpoints: Sequence[Endpoint], rng: random.Random) -> Endpoint | None:
        count = len(endpoints)
        if count <= 1:
            return endpoints[0] if count else None
        if self._choices == 2:
            # The common case: two different endpoints drawn in two steps.
            first = rng.randrange(count)
            second = rng.randrange(count - 1)
            best = endpoints[first]
            other = endpoints[second + 1 if second >= first else second]
            return other if other.inflight < best.inflight else best
        drawn = [endpoints[i] for i in rng.sample(range(count), min(self._choices, count))]
        return min(drawn, key=lambda ep: ep.inflight)
