"""Smooth weighted round robin, as nginx does it.

Each pick adds every endpoint's effective weight to its ``current`` score, takes the endpoint
with the highest score, and takes the total weight off that one. Over one cycle every endpoint
is picked exactly in proportion to its weight, and the heavy ones are spread out instead of
bunched: weights 5, 1, 1 give ``a a b a c a a``, not ``a a a a a b c``.

Excluded endpoints (already tried by this request) sit the round out: they neither gain score
nor count in the total, so the rotation of the others is undisturbed.
"""

from __future__ import annotations

import random
from collections.abc import Container, Sequence

from interknit.balance.base import Endpoint
from interknit.balance.weights import WeightTable

# Seconds over which a newly usable endpoint's weight ramps up; 0 turns slow start off.
SLOW_START = 0.0


class RoundRobin:
    name = "round_robin"

    def __init__(self, slow_start: float = SLOW_START, rng: random.Random | None = None) -> None:
        self._table = WeightTable(slow_start)
        self._current: list[float] = []
        self._next = 0
        # With an rng, each new endpoint set starts its rotation at a random endpoint (as Envoy
        # does), so that nodes that all saw the same change do not step through it in lockstep.
        self._rng = rng

    def set_endpoints(self, endpoints: Sequence[Endpoint], now: float) -> None:
        ordered = list(endpoints)
        if self._rng is not None and ordered:
            start = self._rng.randrange(len(ordered))
            ordered = ordered[start:] + ordered[:start]
        self._table.reset(ordered)
        # nginx starts every peer at zero after a change; carrying scores over from a different
        # set would let a long-idle endpoint burst.
        self._current = [0.0] * len(endpoints)
        self._next = 0  # the rotation's next index while every weight is the same

    def pick(
        self, hash_key: bytes | None, now: float, exclude: Container[Endpoint] = ()
    ) -> Endpoint | None:
        table = self._table
        endpoints = table.endpoints
        if now >= table.uniform_from:
            # Equal weights: the smooth rotation from all-zero scores is plain rotation, and
            # this runs for every proxied request. Excluded endpoints are stepped over.
            n = len(endpoints)
            i = self._next
            for _ in range(n):
                if i >= n:
                    i = 0
                endpoint = endpoints[i]
                i += 1
                if not exclude or endpoint not in exclude:
                    self._next = i
                    return endpoint
            return None
        weights = table.weights(now)
        current = self._current
        best = -1
        best_score = 0.0
        total = 0.0
        for i, weight in enumerate(weights):
            if weight <= 0.0 or (exclude and endpoints[i] in exclude):
                continue
            score = current[i] + weight
            current[i] = score
            total += weight
            if best < 0 or score > best_score:
                best, best_score = i, score
        if best < 0:
            return None
        current[best] -= total
        return endpoints[best]
