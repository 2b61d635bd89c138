"""Demand control for the proxy's routes: the ``Admission`` and ``AdmissionSource`` it expects.

The proxy (``proxy/pools.py``) asks an ``AdmissionSource`` for a route's ``Admission`` once,
then per request ``admission.admit(now, ..., on_decided=...)``, which returns a ``Ticket``:
admitted at once, refused at once (status 503 or 429 and ``Retry-After``), or queued, in which
case ``on_decided`` is called when it is either, from a later turn of the loop, unless the
proxy ``cancel``s it first (its client left). The request's own demand headers go in as raw
values, so the proxy parses nothing itself; an admitted ticket then says what to forward
upstream in ``X-Request-Timeout`` and is released once when the exchange ends.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from typing import Protocol

from interknit.demand.asyncio_gate import Gate, Permit, Rejected, Waiter
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


class Ticket:
    """One proxied request before demand control: queued, then admitted or refused.

    Admitted: ``release`` it exactly once when the exchange ends. Refused: ``status``,
    ``reason`` and ``retry_after`` say how to answer. Queued: ``cancel`` frees the place.
    """

    __slots__ = ("_gate", "_on_decided", "_permit", "_refusal", "_waiter", "deadline")

    def __init__(self, gate: Gate, deadline: float | None, on_decided: Callable[[], None]) -> None:
        self._gate = gate
        self.deadline = deadline
        self._on_decided = on_decided
        self._permit: Permit | None = None
        self._refusal: Rejected | None = None
        self._waiter: Waiter | None = None

    @property
    def admitted(self) -> bool:
        return self._permit is not None

    @property
    def refused(self) -> bool:
        return self._refusal is not None

    @property
    def status(self) -> int:
        return 503 if self._refusal is None else self._refusal.status

    @property
    def reason(self) -> str:
        return "overloaded" if self._refusal is None else self._refusal.reason

    @property
    def retry_after(self) -> int:
        """``Retry-After`` in whole seconds, at least 1."""
        return 1 if self._refusal is None else int(self._refusal.retry_header)

    def settled(self, result: Permit | Rejected) -> None:
        self._waiter = None
        if isinstance(result, Permit):
            self._permit = result
        else:
            self._refusal = result
        self._on_decided()

    def release(self, ok: bool, now: float) -> None:
        """``ok`` False (upstream failed, timed out or answered 503) feeds the limit a drop.
        ``now`` is accepted for the proxy's interface; the gate reads its own clock."""
        permit, self._permit = self._permit, None
        if permit is not None:
            self._gate.release(permit, dropped=not ok)

    def cancel(self) -> None:
        """The request is gone while queued: give its place up."""
        waiter, self._waiter = self._waiter, None
        if waiter is not None:
            waiter.cancel()

    def forward_timeout(self) -> str | None:
        """The ``X-Request-Timeout`` value to send upstream: the time still left, or None."""
        if self.deadline is None:
            return None
        return format_remaining(self.deadline, self._gate.clock())


class RouteAdmission:
    """One route's gate behind the proxy's ``Admission`` interface."""

    __slots__ = ("client_header", "gate")

    def __init__(self, gate: Gate, client_header: str | None = None) -> None:
        self.gate = gate
        # The header that names a client for per-client rate limits (``client_key =
        # "header:NAME"``), lower-case; None: the client's address does.
        self.client_header = None if client_header is None else client_header.encode("latin-1")

    def admit(
        self,
        now: float,
        *,
        request_timeout: str | bytes | None = None,
        grpc_timeout: str | bytes | None = None,
        priority: str | bytes | None = None,
        client_key: str | None = None,
        on_decided: Callable[[], None],
    ) -> Ticket:
        """Ask for admission. ``request_timeout``, ``grpc_timeout`` and ``priority`` are the
        raw ``X-Request-Timeout``, ``grpc-timeout`` and ``X-Priority`` values; ``client_key`` is
        the client's address (or the header the route keys rate limits on). ``now`` is accepted
        for the proxy's interface; deadlines are on the gate's own clock."""
        gate = self.gate
        level, deadline = read_demand(gate, gate.clock(), request_timeout, grpc_timeout, priority)
        ticket = Ticket(gate, deadline, on_decided)
        try:
            got = gate.request(level, deadline, client_key, ticket.settled)
        except Rejected as rejected:
            ticket._refusal = rejected
            return ticket
        if isinstance(got, Permit):
            ticket._permit = got
        else:
            ticket._waiter = got
        return ticket


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
        # Keyed by the route itself (RouteSpec is frozen and hashable: same-named routes on two
        # listeners still get their own settings) and by its settings, which the route does not
        # carry: a reload that changes only a route's demand table builds a new gate, one that
        # changes nothing keeps the gate (and its buckets, limit and queue) as it was.
        self._admissions: dict[tuple[RouteLike, DemandSettings | None], RouteAdmission | None] = {}

    def admission(self, route: RouteLike) -> RouteAdmission | None:
        """The route's admission, built on first use; asked once per route and reload (a
        listener keeps the answer), not per request."""
        settings = self._settings_for(route)
        key = (route, settings)
        if key in self._admissions:
            return self._admissions[key]
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
            found = RouteAdmission(gate, settings.client_header)
        self._admissions[key] = found
        return found

    def retain(self, routes: Iterable[RouteLike]) -> None:
        """After a reload: forget the gates of routes (or settings) no longer in use. Requests
        still holding a ticket of a forgotten gate release it there."""
        wanted = {(route, self._settings_for(route)) for route in routes}
        kept = {key: found for key, found in self._admissions.items() if key in wanted}
        labels = {route.label for route, _ in kept}
        for (route, _), found in self._admissions.items():
            if found is not None and route.label not in labels and self.metrics is not None:
                self.metrics.forget(route.label)
        self._admissions = kept

    def gates(self) -> list[Gate]:
        """The gates built so far (for the status page)."""
        return [a.gate for a in self._admissions.values() if a is not None]

    def describe(self) -> list[dict[str, object]]:
        """One row per route with demand control: what the status page's demand panel shows.
        A limit that is not set reads None, not the internal "no limit" number."""
        rows: list[dict[str, object]] = []
        now = self.clock()
        for (route, _), admission in self._admissions.items():
            if admission is None:
                continue
            gate = admission.gate
            limiter = gate.limiter
            bounded = limiter is not None and limiter.algorithm is not None
            rows.append(
                {
                    "route": route.label,
                    "concurrency": limiter.algorithm if limiter is not None else None,
                    "limit": limiter.limit if bounded and limiter is not None else None,
                    "inflight": None if limiter is None else limiter.inflight,
                    "queued": None if limiter is None else len(limiter.queue),
                    "queue_max": None if limiter is None else limiter.queue.capacity,
                    "median_service_ms": None
                    if limiter is None
                    else round(limiter.service_times.median * 1000, 1),
                    "rate": None if gate.rate is None else _rate_text(gate.rate.rate),
                    "burst": None if gate.rate is None else gate.rate.burst,
                    "tokens": None if gate.rate is None else round(gate.rate.tokens(now), 1),
                    "client_rate": None
                    if gate.client_rate is None
                    else _rate_text(gate.client_rate.rate),
                    "clients": None if gate.client_rate is None else len(gate.client_rate),
                    "overloaded": gate.overloaded(),
                }
            )
        return rows

    def overloaded(self) -> bool:
        """For ``GET /v1/health``: True while the node sheds more than its threshold."""
        return self.overload is not None and self.overload.overloaded(self.clock())


def _rate_text(per_second: float) -> str:
    """A rate as an operator wrote it, roughly: ``500/s``, ``30/m``."""
    if per_second >= 1:
        return f"{per_second:g}/s"
    if per_second * 60 >= 1:
        return f"{per_second * 60:g}/m"
    return f"{per_second * 3600:g}/h"
