"""A simulated backend pool for the adaptive limits: concurrency C, service time S.

A request that starts with ``n`` requests in flight (itself included) takes ``S * max(1, n/C)``:
up to C requests are served in parallel at full speed, beyond that they share the pool and
everybody slows down (processor sharing). Demand is unbounded: whenever the limiter has a free
slot a new request starts, so the only thing holding the pool back is the limit under test.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass, field

from interknit.demand.limiter import ADMIT, Limiter
from interknit.demand.queue import DEFAULT


@dataclass
class Pool:
    capacity: int
    service: float
    now: float = 0.0
    limits: list[int] = field(default_factory=list)
    rtts: list[float] = field(default_factory=list)
    # Drop (as an upstream timeout would) requests slower than this, when set.
    timeout: float | None = None
    _running: list[tuple[float, int, float, int]] = field(default_factory=list)
    _seq: int = 0

    def _fill(self, limiter: Limiter) -> None:
        while limiter.try_acquire(self.now, DEFAULT) is ADMIT:
            n = limiter.inflight
            rtt = self.service * max(1.0, n / self.capacity)
            self._seq += 1
            heapq.heappush(self._running, (self.now + rtt, self._seq, rtt, n))

    def run(self, limiter: Limiter, completions: int) -> None:
        """Serve ``completions`` requests, recording the limit after each."""
        self._fill(limiter)
        for _ in range(completions):
            done, _, rtt, started_with = heapq.heappop(self._running)
            self.now = done
            dropped = self.timeout is not None and rtt > self.timeout
            limiter.release(self.now, rtt, dropped, started_with)
            self.limits.append(limiter.limit)
            self.rtts.append(rtt)
            self._fill(limiter)


def mean(values: list[int] | list[float]) -> float:
    return sum(values) / len(values)
