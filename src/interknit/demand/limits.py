"""Concurrency limits: how many requests a pool may have in flight.

One small interface, as in Netflix concurrency-limits: a limit is fed one sample per finished
request, ``on_sample(rtt, inflight, dropped)``, and answers the new limit. ``rtt`` is the
request's time in service (not its time queued), ``inflight`` how many requests were in flight
when it started, ``dropped`` whether it was lost to a timeout or an overloaded upstream. Each
algorithm is one short class with its parameters and their defaults at the top. Limits are
sans-IO: they hold no clock; everything they know arrives through samples.
"""

from __future__ import annotations

import math
from typing import Protocol


class Limit(Protocol):
    """A concurrency limit that may move with the samples it is fed."""

    @property
    def limit(self) -> int:
        """The limit in force now."""
        ...

    def on_sample(self, rtt: float, inflight: int, dropped: bool) -> int:
        """Take one finished request into account and return the new limit."""
        ...


class FixedLimit:
    """A limit that never moves (HAProxy's ``maxconn``)."""

    def __init__(self, limit: int) -> None:
        if limit < 1:
            raise ValueError("a fixed limit must be at least 1")
        self._limit = limit

    @property
    def limit(self) -> int:
        return self._limit

    def on_sample(self, rtt: float, inflight: int, dropped: bool) -> int:
        return self._limit


class AimdLimit:
    """Additive increase, multiplicative decrease, driven by drops (and very slow requests).

    Grows by one while the pool is busy and nothing is dropped; shrinks by ``backoff_ratio`` on a
    drop. Needs drops to find the capacity, so it suits pools that refuse work loudly (503s,
    timeouts) rather than pools that just get slower.
    """

    initial_limit = 20
    min_limit = 1
    max_limit = 1000
    backoff_ratio = 0.9
    # A request slower than this counts as dropped: the caller has likely given up on it.
    timeout = 5.0

    def __init__(
        self,
        *,
        initial_limit: int | None = None,
        min_limit: int | None = None,
        max_limit: int | None = None,
        backoff_ratio: float | None = None,
        timeout: float | None = None,
    ) -> None:
        if min_limit is not None:
            self.min_limit = min_limit
        if max_limit is not None:
            self.max_limit = max_limit
        if backoff_ratio is not None:
            self.backoff_ratio = backoff_ratio
        if timeout is not None:
            self.timeout = timeout
        if not 1 <= self.min_limit <= self.max_limit:
            raise ValueError("need 1 <= min_limit <= max_limit")
        if not 0.0 < self.backoff_ratio < 1.0:
            raise ValueError("backoff_ratio must be between 0 and 1")
        start = self.initial_limit if initial_limit is None else initial_limit
        self._limit = max(self.min_limit, min(self.max_limit, start))

    @property
    def limit(self) -> int:
        return self._limit

    def on_sample(self, rtt: float, inflight: int, dropped: bool) -> int:
        if dropped or rtt > self.timeout:
            self._limit = max(self.min_limit, int(self._limit * self.backoff_ratio))
        elif inflight * 2 >= self._limit:
            # Only grow while the limit is actually being used; an idle pool proves nothing.
            self._limit = min(self.max_limit, self._limit + 1)
        return self._limit


_NORMAL = 0
_PROBING = 1


class GradientLimit:
    """Follow the ratio of the pool's no-load latency to its current latency.

    Gradient2's update (Netflix) over a no-load RTT measured the way Envoy's adaptive
    concurrency filter measures it.

    - Probe: every ``probe_every`` windows (round trips, below) the limit is pinned to
      ``min_limit`` until ``probe_samples`` requests that started with at most ``min_limit`` in
      flight have finished; their median is the no-load RTT. Re-probing keeps it honest when
      backends get permanently slower (Gradient2's long average drifts up under sustained load).
    - Update: samples are gathered in windows of about one round trip (``limit`` samples,
      within ``window_min``..``window_max``); each window moves the limit towards
      ``limit * gradient + sqrt(limit)``, ``gradient = rtt_tolerance * noload / median RTT``
      clamped to [0.5, 2] (Envoy's bounds). Latency at no-load grows the limit (a slow start);
      latency beyond the tolerance shrinks it in proportion. Updating once a round trip, as TCP
      does, keeps the loop stable: per-sample updates react to requests started under an older
      limit and overshoot.

    The limit settles near ``rtt_tolerance * capacity + sqrt(limit)`` and follows capacity down
    when backends leave or slow, and up when they are added.
    """

    initial_limit = 20
    min_limit = 4
    max_limit = 1000
    smoothing = 0.5
    rtt_tolerance = 1.25
    window_min = 10
    window_max = 250
    # In windows, so probing costs the same few percent of time whatever the request rate.
    probe_every = 500
    probe_samples = 25

    def __init__(
        self,
        *,
        initial_limit: int | None = None,
        min_limit: int | None = None,
        max_limit: int | None = None,
        smoothing: float | None = None,
        rtt_tolerance: float | None = None,
        window_min: int | None = None,
        window_max: int | None = None,
        probe_every: int | None = None,
        probe_samples: int | None = None,
    ) -> None:
        if min_limit is not None:
            self.min_limit = min_limit
        if max_limit is not None:
            self.max_limit = max_limit
        if smoothing is not None:
            self.smoothing = smoothing
        if rtt_tolerance is not None:
            self.rtt_tolerance = rtt_tolerance
        if window_min is not None:
            self.window_min = window_min
        if window_max is not None:
            self.window_max = window_max
        if probe_every is not None:
            self.probe_every = probe_every
        if probe_samples is not None:
            self.probe_samples = probe_samples
        if not 1 <= self.min_limit <= self.max_limit:
            raise ValueError("need 1 <= min_limit <= max_limit")
        if not 0.0 < self.smoothing <= 1.0:
            raise ValueError("smoothing must be in (0, 1]")
        if self.rtt_tolerance < 1.0:
            raise ValueError("rtt_tolerance must be at least 1")
        if not 1 <= self.window_min <= self.window_max:
            raise ValueError("need 1 <= window_min <= window_max")
        if self.probe_samples < 1 or self.probe_every < 1:
            raise ValueError("probe_samples and probe_every must be at least 1")
        start = self.initial_limit if initial_limit is None else initial_limit
        self._estimate = float(max(self.min_limit, min(self.max_limit, start)))
        self._phase = _PROBING
        self._samples: list[float] = []  # the probe's, then the current window's RTTs
        self._window_inflight = 0
        self._window_dropped = False
        self._since_probe = 0
        self.noload_rtt: float | None = None

    @property
    def limit(self) -> int:
        if self._phase == _PROBING:
            return self.min_limit
        return int(self._estimate)

    def on_sample(self, rtt: float, inflight: int, dropped: bool) -> int:
        samples = self._samples
        if self._phase == _PROBING:
            # Requests that started before the probe ran at a higher concurrency: not no-load.
            if not dropped and inflight <= self.min_limit and rtt > 0.0:
                samples.append(rtt)
                if len(samples) >= self.probe_samples:
                    samples.sort()
                    self.noload_rtt = samples[len(samples) // 2]
                    samples.clear()
                    self._phase = _NORMAL
                    self._since_probe = 0
            return self.limit

        samples.append(rtt)
        if inflight > self._window_inflight:
            self._window_inflight = inflight
        self._window_dropped = self._window_dropped or dropped
        estimate = self._estimate
        if len(samples) < max(self.window_min, min(self.window_max, int(estimate))):
            return int(estimate)

        samples.sort()
        window_rtt = samples[len(samples) // 2]
        busiest = self._window_inflight
        samples.clear()
        self._window_inflight = 0
        dropped_any, self._window_dropped = self._window_dropped, False
        self._since_probe += 1
        if self._since_probe >= self.probe_every:
            self._phase = _PROBING
            return self.min_limit

        noload = self.noload_rtt
        assert noload is not None
        if dropped_any:
            gradient = 0.5
        elif window_rtt <= 0.0:
            gradient = 1.0
        else:
            gradient = max(0.5, min(2.0, self.rtt_tolerance * noload / window_rtt))
        target = estimate * gradient + math.sqrt(estimate)
        if target > estimate and busiest < estimate / 2:
            # Application-limited: the pool was never tried at this limit, so do not grow it.
            return int(estimate)
        estimate = estimate * (1.0 - self.smoothing) + target * self.smoothing
        self._estimate = max(float(self.min_limit), min(float(self.max_limit), estimate))
        return int(self._estimate)
