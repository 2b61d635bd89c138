"""Demand control for the proxy's routes: the ``Admission`` and ``AdmissionSource`` it expects.

The proxy (``proxy/pools.py``) asks an ``AdmissionSource`` for a route's ``Admission`` once,
then per request ``await admission.acquire(now, ...)``: a permit to go ahead, or ``None`` to
answer with ``admission.last_rejection`` (status 503 or 429 and ``Retry-After``). The request's
own demand headers go in as raw values, so the proxy parses nothing itself; the permit then
says what to forward upstream in ``X-Request-Timeout``.

``last_rejection`` is read right after ``acquire`` returns ``None``: nothing else runs on the
loop between the coroutine's return and the caller's next line, so it is that request's.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Protocol

from interknit.demand.asyncio_gate import Gate, Permit, Rejected
from interknit.demand.deadline import format_remaining
from interknit.demand.http import read_demand
from interknit.demand.metrics import DemandMetrics
from interknit.demand.overload import OverloadMonitor
from interknit.demand.settings import DemandSettings


class RouteLike(Protocol):
    """What this module needs of a route (``proxy.spec.RouteSpec`` has it)."""

    @property
    def label(self) -> str: ...

    @property
    def timeout(self) -> float | None: ...


class RoutePermit:
    """An admitted proxied request; ``release`` it exactly once when the exchange ends."""

    __slots__ = ("_gate", "_permit", "deadline")

    def __init__(self, gate: Gate, permit: Permit, deadline: float | None) -> None:
        self._gate = gate
        self._permit = permit
        self.deadline = deadline

    def release(self, ok: bool, now: float) -> None:
        """``ok`` False (upstream failed, timed out or answered 503) feeds the limit a drop.
        ``now`` is accepted for the proxy's interface; the gate reads its own clock."""
        self._gate.release(self._permit, dropped=not ok)

    def forward_timeout(self) -> str | None:
        """The ``X-Request-Timeout`` value to send upstream: the time still left, or None."""
        if self.deadline is None:
            return None
        return format_remaining(self.deadline, self._gate.clock())


class RouteAdmission:
    """One route's gate behind the proxy's ``Admission`` interface."""

    __slots__ = ("gate", "last_rejection")

    def __init__(self, gate: Gate) -> None:
        self.gate = gate
        self.last_rejection: Rejected | None = None

    async def acquire(
        self,
        now: float,
        *,
        request_timeout: str | bytes | None = None,
        grpc_timeout: str | bytes | None = None,
        priority: str | bytes | None = None,
        client_key: str | None = None,
    ) -> RoutePermit | None:
        """Wait for admission. ``request_timeout``, ``grpc_timeout`` and ``priority`` are the
        raw ``X-Request-Timeout``, ``grpc-timeout`` and ``X-Priority`` values; ``client_key`` is
        the client's address (or the header the route keys rate limits on). ``now`` is accepted
        for the proxy's interface; deadlines are on the gate's own clock."""
        gate = self.gate
        level, deadline = read_demand(gate, gate.clock(), request_timeout, grpc_timeout, priority)
        try:
            permit = await gate.acquire(level, deadline, client_key)
        except Rejected as rejected:
            self.last_rejection = rejected
            return None
        return RoutePermit(gate, permit, deadline)


class DemandAdmissions:
    """The proxy's ``AdmissionSource``: one gate per route that has demand settings."""

    def __init__(
        self,
        settings_for: Callable[[RouteLike], DemandSettings | None],
        *,
        metrics: DemandMetrics | None = None,
        overload: OverloadMonitor | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._settings_for = settings_for
        self.metrics = metrics
        self.overload = overload
        self.clock = clock
        # Keyed by the route itself (RouteSpec is frozen and hashable): same-named routes on
        # two listeners still get their own settings.
        self._admissions: dict[RouteLike, RouteAdmission | None] = {}

    def admission(self, route: RouteLike) -> RouteAdmission | None:
        if route in self._admissions:
            return self._admissions[route]
        settings = self._settings_for(route)
        found = None
        if settings is not None:
            gate = Gate.from_settings(
                settings,
                route=route.label,
                metrics=self.metrics,
                overload=self.overload,
                timeout=route.timeout,
                clock=self.clock,
            )
            found = RouteAdmission(gate)
        self._admissions[route] = found
        return found

    def gates(self) -> list[Gate]:
        """The gates built so far (for the status page)."""
        return [a.gate for a in self._admissions.values() if a is not None]

    def describe(self) -> list[dict[str, object]]:
        """One row per route with demand control: what the status page's demand panel shows."""
        rows: list[dict[str, object]] = []
        for route, admission in self._admissions.items():
            if admission is None:
                continue
            limiter = admission.gate.limiter
            rows.append(
                {
                    "route": route.label,
                    "limit": "-" if limiter is None else limiter.limit,
                    "in flight": "-" if limiter is None else limiter.inflight,
                    "queued": "-" if limiter is None else len(limiter.queue),
                    "median service ms": "-"
                    if limiter is None
                    else round(limiter.service_times.median * 1000, 1),
                    "overloaded": admission.gate.overloaded(),
                }
            )
        return rows

    def overloaded(self) -> bool:
        """For ``GET /v1/health``: True while the node sheds more than its threshold."""
        return self.overload is not None and self.overload.overloaded(self.clock())
