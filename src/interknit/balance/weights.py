"""Effective weights of one endpoint set, shared by the weighted policies.

Theory of operation: a weighted policy asks for the weights of its endpoints on every pick.
Outside a slow-start window those weights never change between two ``set_endpoints`` calls, so
they (and their running sums, for weighted random draws) are computed once and reused; only
while some endpoint is still ramping are they recomputed per pick.

Weights below zero count as zero (no new work). A set whose weights are all zero is balanced as
if every weight were one: an operator who zeroes every weight did not mean "serve nothing".
"""

from __future__ import annotations

import math
import random
from bisect import bisect_right
from collections.abc import Container, Sequence
from itertools import accumulate

from interknit.balance.base import SLOW_START_FLOOR, Endpoint


def base_weights(endpoints: Sequence[Endpoint]) -> list[float]:
    """Configured weights as floats, with the all-zero set read as all-one."""
    weights = [float(max(ep.weight, 0)) for ep in endpoints]
    if weights and not any(weights):
        return [1.0] * len(weights)
    return weights


def draw(cumulative: Sequence[float], rng: random.Random) -> int:
    """Index of a weighted random draw given running sums of the weights (last one > 0)."""
    index = bisect_right(cumulative, rng.random() * cumulative[-1])
    # random() < 1, but the product can still round up to the total.
    return min(index, len(cumulative) - 1)


class WeightTable:
    """Weights of the current endpoint set at a given time, cached while nothing ramps."""

    def __init__(self, slow_start: float = 0.0, floor: float = SLOW_START_FLOOR) -> None:
        self.slow_start = slow_start
        self.floor = floor
        self.endpoints: list[Endpoint] = []
        self._base: list[float] = []
        self._cumulative: list[float] = []
        self._ramp_until = -math.inf
        # From this time on every weight is the same (the end of the ramp; never if the
        # configured weights differ): one comparison per pick tells a policy it may draw
        # without weights.
        self.uniform_from = -math.inf

    def reset(self, endpoints: Sequence[Endpoint]) -> None:
        self.endpoints = list(endpoints)
        self._base = base_weights(self.endpoints)
        self._cumulative = list(accumulate(self._base))
        if self.slow_start > 0.0 and self.endpoints:
            self._ramp_until = max(ep.since for ep in self.endpoints) + self.slow_start
        else:
            self._ramp_until = -math.inf
        self.uniform_from = self._ramp_until if len(set(self._base)) <= 1 else math.inf

    def ramping(self, now: float) -> bool:
        return now < self._ramp_until

    def weights(self, now: float) -> list[float]:
        if not self.ramping(now):
            return self._base
        span, floor = self.slow_start, self.floor
        out = []
        for ep, weight in zip(self.endpoints, self._base, strict=True):
            age = now - ep.since
            out.append(weight if age >= span else weight * max(floor, age / span))
        return out

    def cumulative(self, now: float) -> list[float]:
        if not self.ramping(now):
            return self._cumulative
        return list(accumulate(self.weights(now)))

    def candidates(
        self, now: float, exclude: Container[Endpoint]
    ) -> tuple[list[Endpoint], list[float]]:
        """Endpoints not in ``exclude`` with a positive weight, and their weights."""
        eps: list[Endpoint] = []
        weights: list[float] = []
        for ep, weight in zip(self.endpoints, self.weights(now), strict=True):
            if weight > 0.0 and ep not in exclude:
                eps.append(ep)
                weights.append(weight)
        return eps, weights
