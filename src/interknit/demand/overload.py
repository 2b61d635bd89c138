"""Is this node overloaded? Health that reflects load, with hysteresis.

Fed one outcome per request (admitted or shed) with its time. Outcomes are counted in a ring of
``buckets`` time slices covering ``window`` seconds. The monitor turns overloaded when the shed
share of the window exceeds ``threshold`` (with at least ``min_requests`` outcomes, so three
requests cannot flip a node), and recovers only after the share has stayed below
``threshold * recover_ratio`` for ``hold`` seconds: a node on the edge does not flap between
ready and not ready. Sans-IO: ``now`` is passed in.
"""

from __future__ import annotations


class OverloadMonitor:
    """Shed share over a sliding window, with a hysteresis on the way back."""

    threshold = 0.1
    window = 5.0
    buckets = 10
    recover_ratio = 0.5
    hold = 5.0
    min_requests = 20

    def __init__(
        self,
        *,
        threshold: float | None = None,
        window: float | None = None,
        buckets: int | None = None,
        recover_ratio: float | None = None,
        hold: float | None = None,
        min_requests: int | None = None,
    ) -> None:
        if threshold is not None:
            self.threshold = threshold
        if window is not None:
            self.window = window
        if buckets is not None:
            self.buckets = buckets
        if recover_ratio is not None:
            self.recover_ratio = recover_ratio
        if hold is not None:
            self.hold = hold
        if min_requests is not None:
            self.min_requests = min_requests
        if not 0.0 < self.threshold <= 1.0:
            raise ValueError("overload threshold must be in (0, 1]")
        if self.window <= 0.0 or self.buckets < 1:
            raise ValueError("window must be positive and buckets at least 1")
        self._slice = self.window / self.buckets
        self._admitted = [0] * self.buckets
        self._shed = [0] * self.buckets
        self._epoch = [-1] * self.buckets  # which slice number each ring cell holds
        self._overloaded = False
        self._calm_since: float | None = None

    def record(self, now: float, shed: bool) -> None:
        """Count one request: ``shed`` True when it was refused, False when admitted."""
        number = int(now / self._slice)
        cell = number % self.buckets
        if self._epoch[cell] != number:
            self._epoch[cell] = number
            self._admitted[cell] = 0
            self._shed[cell] = 0
            # Once per slice, so hysteresis advances even when nobody asks for a while.
            self.overloaded(now)
        if shed:
            self._shed[cell] += 1
        else:
            self._admitted[cell] += 1

    def shed_ratio(self, now: float) -> tuple[float, int]:
        """The shed share of the window ending at ``now`` and how many outcomes it holds."""
        newest = int(now / self._slice)
        oldest = newest - self.buckets + 1
        admitted = shed = 0
        for cell in range(self.buckets):
            if oldest <= self._epoch[cell] <= newest:
                admitted += self._admitted[cell]
                shed += self._shed[cell]
        total = admitted + shed
        return (shed / total if total else 0.0), total

    def overloaded(self, now: float) -> bool:
        """True while overloaded; evaluate it when answering health checks."""
        ratio, total = self.shed_ratio(now)
        if not self._overloaded:
            if total >= self.min_requests and ratio > self.threshold:
                self._overloaded = True
                self._calm_since = None
            return self._overloaded
        if ratio < self.threshold * self.recover_ratio:
            if self._calm_since is None:
                self._calm_since = now
            elif now - self._calm_since >= self.hold:
                self._overloaded = False
                self._calm_since = None
        else:
            self._calm_since = None
        return self._overloaded
