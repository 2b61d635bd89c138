"""Passive health: what the proxy sees of each endpoint feeds one outlier detector per pool.

An ejection of a registry instance is written to the registry (``ejected_until``), so the API,
the status page and every consumer see it; a static server's ejection stays in its pool. The
sans-IO rules (how many failures, how long, at most what share of a pool) are
``health.outlier.OutlierDetector``'s.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
from collections.abc import Awaitable, Callable, Collection

from prometheus_client import CollectorRegistry, Counter, Gauge

from interknit.balance.base import Endpoint
from interknit.balance.pool import Pool
from interknit.health.outlier import OutlierDetector
from interknit.logs import iso_time
from interknit.proxy.pool_feed import RoutePool

log = logging.getLogger("interknit.proxy")

SetEjected = Callable[[str, str, float | None], Awaitable[None]]


class _Watch:
    """What ``report`` knows of a pool's detector, so that a plain success costs no call.

    A success changes nothing in the detector when the endpoint is a member, has no failure
    counted and no ejection is due to run out (which the detector would settle first).
    ``suspects`` may hold more than the endpoints with failures (only a failure adds one);
    ``due`` may be earlier than the detector's next expiry, never later.
    """

    __slots__ = ("detector", "due", "members", "suspects")

    def __init__(self, detector: OutlierDetector[str]) -> None:
        self.detector = detector
        self.members: set[str] = set()
        self.suspects: set[str] = set()
        self.due = -math.inf

    def set_members(self, pool: Pool) -> None:
        keys = {ep.key for ep in pool.endpoints}
        self.detector.set_members(keys)
        self.members = keys

    def sync_due(self) -> None:
        due = self.detector.next_expiry()
        self.due = math.inf if due is None else due


class PassiveHealth:
    def __init__(self, set_ejected: SetEjected, metrics: CollectorRegistry) -> None:
        self._set_ejected = set_ejected
        self._detectors: dict[Pool, OutlierDetector[str]] = {}
        self._watches: dict[Pool, _Watch] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self.ejections = Counter(
            "interknit_proxy_ejections",
            "Endpoints ejected by passive outlier detection.",
            ["pool"],
            registry=metrics,
        )
        self.ejected = Gauge(
            "interknit_proxy_ejected_endpoints",
            "Endpoints currently ejected by passive outlier detection.",
            ["pool"],
            registry=metrics,
        )

    def report(self, route_pool: RoutePool, endpoint: Endpoint, ok: bool, now: float) -> None:
        settings = route_pool.options.outlier
        if settings is None:
            return
        pool = route_pool.pool
        watch = self._watches.get(pool)
        key = endpoint.key
        if watch is None:
            detector = self._detectors[pool] = OutlierDetector(
                consecutive_failures=settings.consecutive_failures,
                base_ejection_time=settings.base_ejection_time,
                max_ejection_percent=settings.max_ejection_percent,
                max_ejection_time=settings.max_ejection_time,
                interval=settings.interval,
            )
            watch = self._watches[pool] = _Watch(detector)
            watch.set_members(pool)
        else:
            if ok and key in watch.members:
                if key not in watch.suspects and now < watch.due:
                    return
                watch.suspects.discard(key)
            detector = watch.detector
            if key not in watch.members:
                watch.set_members(pool)
        if not ok:
            watch.suspects.add(key)
        until = detector.on_result(key, ok, now)
        watch.sync_due()
        if until is None:
            return
        self.ejections.labels(pool.name).inc()
        self.ejected.labels(pool.name).set(detector.ejected_count(now))
        log.warning(
            "%s ejected from pool %s for %.0f s (until %s)",
            endpoint.key,
            pool.name,
            until - now,
            iso_time(until),
            extra={
                "event": "proxy.eject",
                "pool": pool.name,
                "endpoint": endpoint.key,
                "until": iso_time(until),
                "seconds": round(until - now, 3),
                "ejections": detector.ejection_count(endpoint.key, now),
            },
        )
        self._apply(pool, endpoint.key, until, now)

    def _apply(self, pool: Pool, key: str, until: float | None, now: float) -> None:
        # The pool acts at once, so the very next request already avoids the endpoint; a
        # registry instance's ejection is also written to the registry (every consumer sees
        # it, and the event that comes back carries the same time).
        with contextlib.suppress(KeyError):  # the endpoint left the pool meanwhile
            pool.set_health(key, now, ejected_until=until)
        service, sep, instance_id = key.partition("/")
        if sep and service == pool.name:
            task = asyncio.get_running_loop().create_task(self._write(service, instance_id, until))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _write(self, service: str, instance_id: str, until: float | None) -> None:
        try:
            await self._set_ejected(service, instance_id, until)
        except Exception as exc:  # the registry may be read-only (stale) or stopping
            log.warning(
                "could not record ejection",
                extra={"event": "proxy.eject_failed", "service": service, "error": str(exc)},
            )

    def retain(self, pools: Collection[Pool]) -> None:
        """Forget the detectors of pools no longer in use (a reload replaced them)."""
        for pool in [p for p in self._detectors if p not in pools]:
            del self._detectors[pool]
            self._watches.pop(pool, None)

    def expire(self, now: float) -> None:
        """Return endpoints whose ejection ran out (clears ``ejected_until`` in the registry)."""
        for pool, detector in self._detectors.items():
            # Follow the pool's membership, so the ejection cap counts today's endpoints.
            watch = self._watches[pool]
            watch.set_members(pool)
            returned = detector.expire(now)
            watch.sync_due()
            for key in returned:
                log.info(
                    "%s returned to pool %s (its ejection ran out)",
                    key,
                    pool.name,
                    extra={"event": "proxy.uneject", "pool": pool.name, "endpoint": key},
                )
                self._apply(pool, key, None, now)
            if returned:
                self.ejected.labels(pool.name).set(detector.ejected_count(now))

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
