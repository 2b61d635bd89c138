"""The node-wide cap on checks started per second (``[health] max_checks_per_second``).

A token bucket: ``rate`` tokens a second, holding at most one second's worth, so a burst of
checks that came due together may start at once up to that many, and no more than ``rate`` a
second start over any longer time. The scheduler asks before it starts each check; a check
that finds no token waits, and so starts late (its lag shows it) instead of never.

No clock of its own: ``now`` is passed in (the loop's monotonic time).
"""

from __future__ import annotations


class CheckBudget:
    __slots__ = ("capacity", "rate", "tokens", "updated")

    def __init__(self, rate: float) -> None:
        if rate <= 0:
            raise ValueError("rate must be positive")
        self.rate = rate
        self.capacity = max(1.0, rate)
        self.tokens = self.capacity
        self.updated: float | None = None

    def wait(self, now: float) -> float:
        """0.0: a check may start now (it has taken its token). Else the seconds until one
        may; nothing is taken."""
        if self.updated is not None and now > self.updated:
            self.tokens = min(self.capacity, self.tokens + (now - self.updated) * self.rate)
        if self.updated is None or now > self.updated:
            self.updated = now
        if self.tokens >= 1.0 - 1e-9:  # after exactly the wait it was told, rounding aside
            self.tokens = max(0.0, self.tokens - 1.0)
            return 0.0
        return (1.0 - self.tokens) / self.rate
