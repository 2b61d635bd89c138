"""The asyncio shell over a route's demand control: rate limits, then the ``Limiter``.

``Gate`` does the waiting the sans-IO core cannot: a queued request waits (a ``Waiter``) until a
release admits it, or a timer (its queue timeout or its deadline) refuses it, and is told by a
callback, so that the proxy waits without a task and a client that leaves can ``cancel`` its
place at once. Everything that decides lives in ``Limiter``, ``TokenBucket`` and
``OverloadMonitor``; this file only reads the clock, parks, wakes and counts. The middlewares
use it as a coroutine::

    try:
        async with gate.admit(priority, deadline, client_key) as permit:
            ...  # do the work; set permit.dropped = True if it timed out upstream
    except Rejected as refusal:
        ...  # answer refusal.status with Retry-After: refusal.retry_header

and the proxy through ``request(..., on_settled)`` (see ``demand/route.py``).
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Callable, Sequence
from types import TracebackType

from prometheus_client import CollectorRegistry

from interknit.demand.limiter import ADMIT, Limiter, Reject
from interknit.demand.metrics import DemandMetrics, RouteMetrics
from interknit.demand.overload import OverloadMonitor
from interknit.demand.queue import ADMITTED, DEFAULT, QUEUED, Entry, Priority, RejectReason
from interknit.demand.rate import KeyedRateLimiter, TokenBucket
from interknit.demand.settings import DemandSettings


class Rejected(Exception):
    """A request refused by demand control: answer ``status`` with ``Retry-After``."""

    def __init__(self, reason: RejectReason, retry_after: float) -> None:
        super().__init__(reason)
        self.reason: RejectReason = reason
        self.retry_after = retry_after

    @property
    def status(self) -> int:
        return 429 if self.reason == "rate" else 503

    @property
    def retry_header(self) -> str:
        """``Retry-After`` in whole seconds (HTTP has no fractions), at least 1."""
        return str(max(1, math.ceil(self.retry_after)))


class Permit:
    """An admitted request. Set ``dropped`` when its work was lost (timeout, upstream 503)."""

    __slots__ = ("dropped", "inflight", "start")

    def __init__(self, start: float, inflight: int) -> None:
        self.start = start
        self.inflight = inflight
        self.dropped = False


class Gate:
    """Demand control for one route (or one application)."""

    def __init__(
        self,
        limiter: Limiter | None = None,
        *,
        rate: TokenBucket | None = None,
        client_rate: KeyedRateLimiter | None = None,
        metrics: RouteMetrics | None = None,
        overload: OverloadMonitor | None = None,
        priority: Priority = DEFAULT,
        timeout: float | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.limiter = limiter
        self.rate = rate
        self.client_rate = client_rate
        self.metrics = metrics
        self.overload = overload
        # The route's defaults: priority without X-Priority, timeout without a deadline header.
        self.priority = priority
        self.timeout = timeout
        self.clock = clock

    @classmethod
    def from_settings(
        cls,
        settings: DemandSettings,
        *,
        route: str = "default",
        metrics: DemandMetrics | None = None,
        overload: OverloadMonitor | None = None,
        timeout: float | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> Gate:
        """Build a route's gate from its ``demand`` table and its ``timeout``."""
        limiter = settings.build_limiter()
        return cls(
            limiter,
            rate=settings.build_rate(),
            client_rate=settings.build_client_rate(),
            metrics=None if metrics is None else metrics.route(route, limiter),
            overload=overload,
            priority=settings.priority,
            timeout=timeout,
            clock=clock,
        )

    @classmethod
    def for_app(
        cls,
        settings: DemandSettings | None,
        *,
        route: str = "app",
        registry: CollectorRegistry | None = None,
        overload: OverloadMonitor | None = None,
        timeout: float | None = None,
    ) -> Gate:
        """The gate the application middlewares build when they are not handed one: adaptive
        concurrency unless ``settings`` say otherwise, and an overload monitor for /health."""
        return cls.from_settings(
            settings or DemandSettings(concurrency="adaptive"),
            route=route,
            metrics=None if registry is None else DemandMetrics(registry),
            overload=overload or OverloadMonitor(),
            timeout=timeout,
        )

    # Admission ------------------------------------------------------------------------------

    def admit(
        self,
        priority: Priority | None = None,
        deadline: float | None = None,
        client_key: str | None = None,
    ) -> Admission:
        """``async with gate.admit(...) as permit``: acquire, then release on exit."""
        return Admission(self, priority, deadline, client_key)

    def request(
        self,
        priority: Priority | None,
        deadline: float | None,
        client_key: str | None,
        on_settled: Callable[[Permit | Rejected], None],
    ) -> Permit | Waiter:
        """Admit at once (a ``Permit``), refuse at once (raises ``Rejected``), or queue: the
        returned ``Waiter`` calls ``on_settled`` with a ``Permit`` or a ``Rejected`` from a
        later turn of the loop, unless it is cancelled first. Pair every Permit with
        ``release``."""
        now = self.clock()
        # The client's bucket first: one greedy client must not drain the route's bucket with
        # requests that its own limit refuses anyway.
        client_rate = self.client_rate
        if client_rate is not None and client_key is not None:
            wait = client_rate.take(client_key, now)
            if wait > 0.0:
                raise self._refuse(now, "rate", wait)
        if self.rate is not None:
            wait = self.rate.take(now)
            if wait > 0.0:
                if client_rate is not None and client_key is not None:
                    client_rate.refund(client_key)
                raise self._refuse(now, "rate", wait)
        limiter = self.limiter
        if limiter is None:
            if deadline is not None and deadline <= now:
                raise self._refuse(now, "deadline", 1.0)
            self._admitted(now)
            return Permit(now, 0)

        decision = limiter.try_acquire(
            now, self.priority if priority is None else priority, deadline
        )
        if decision is ADMIT:
            self._admitted(now)
            return Permit(now, limiter.inflight)
        if limiter.swept:
            self._wake(limiter.take_swept())
        if isinstance(decision, Reject):
            raise self._refuse(now, decision.reason, decision.retry_after)
        assert isinstance(decision, Entry)
        return Waiter(self, limiter, decision, now, on_settled)

    async def acquire(
        self,
        priority: Priority | None = None,
        deadline: float | None = None,
        client_key: str | None = None,
    ) -> Permit:
        """``request`` for a coroutine: wait for admission; raise ``Rejected``."""
        settled: asyncio.Future[Permit | Rejected] = asyncio.get_running_loop().create_future()

        def on_settled(result: Permit | Rejected) -> None:
            if not settled.done():
                settled.set_result(result)

        got = self.request(priority, deadline, client_key, on_settled)
        if isinstance(got, Permit):
            return got
        try:
            result = await settled
        except asyncio.CancelledError:
            # The caller went away while queued (or just after being admitted): free the place.
            got.cancel()
            raise
        if isinstance(result, Rejected):
            raise result
        return result

    def _on_timer(self, limiter: Limiter, entry: Entry) -> None:
        now = self.clock()
        settled = limiter.expire(now)
        if entry.status == QUEUED:
            # Timers may fire a hair early against an injected or coarse clock; the timer was
            # set for this entry's limit, so it is due either way.
            late = entry.deadline is not None and entry.deadline <= now + 1e-3
            limiter.cancel(entry, now, "deadline" if late else "queue_timeout")
            self._wake((entry,))
        self._wake(settled)

    def release(self, permit: Permit, dropped: bool = False) -> None:
        """The admitted request has finished; admit whoever is next."""
        limiter = self.limiter
        if limiter is None:
            return
        now = self.clock()
        settled = limiter.release(
            now, now - permit.start, dropped or permit.dropped, permit.inflight
        )
        if settled:
            self._wake(settled)

    def shed(self, reason: RejectReason) -> None:
        """Count a refusal decided elsewhere (e.g. ``connections`` at the listener)."""
        self._count_refusal(self.clock(), reason)

    def overloaded(self) -> bool:
        return self.overload is not None and self.overload.overloaded(self.clock())

    # Bookkeeping ----------------------------------------------------------------------------

    @staticmethod
    def _wake(entries: Sequence[Entry]) -> None:
        for entry in entries:
            waiter = entry.waiter
            if waiter is not None:
                waiter.settle()

    def _admitted(self, now: float) -> None:
        if self.metrics is not None:
            self.metrics.admitted.inc()
        if self.overload is not None:
            self.overload.record(now, False)

    def _count_refusal(self, now: float, reason: RejectReason) -> None:
        if self.metrics is not None:
            self.metrics.shed(reason)
        # Rate limits are policy about callers, not a sign that this node lacks capacity.
        if self.overload is not None and reason != "rate":
            self.overload.record(now, True)

    def _refuse(self, now: float, reason: RejectReason, retry_after: float) -> Rejected:
        self._count_refusal(now, reason)
        return Rejected(reason, retry_after)


class Waiter:
    """A request queued by ``Gate.request``, until a release admits it or its timer (queue
    timeout or deadline) refuses it; ``cancel`` when its caller leaves."""

    __slots__ = ("_callback", "_delivered", "_gate", "_limiter", "_timer", "cancelled", "entry")

    def __init__(
        self,
        gate: Gate,
        limiter: Limiter,
        entry: Entry,
        now: float,
        on_settled: Callable[[Permit | Rejected], None],
    ) -> None:
        self._gate = gate
        self._limiter = limiter
        self.entry = entry
        self._callback = on_settled
        self._delivered = False
        self.cancelled = False
        entry.waiter = self
        if gate.metrics is not None:
            gate.metrics.queued.inc()
        expires = now + limiter.queue.timeout
        if entry.deadline is not None and entry.deadline < expires:
            expires = entry.deadline
        loop = asyncio.get_running_loop()
        self._timer: asyncio.TimerHandle | None = loop.call_later(
            max(0.0, expires - now), gate._on_timer, limiter, entry
        )

    def settle(self) -> None:
        """The entry was admitted or refused: tell the caller, from the next turn, so that a
        release never runs another request's work inside its own."""
        if self._delivered or self.cancelled:
            return
        self._delivered = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        gate = self._gate
        entry = self.entry
        done = gate.clock()
        if gate.metrics is not None:
            gate.metrics.wait.observe(done - entry.enqueued_at)
        result: Permit | Rejected
        if entry.status == ADMITTED:
            gate._admitted(done)
            result = Permit(done, entry.inflight)
        else:
            result = gate._refuse(
                done, entry.reason or "queue_timeout", self._limiter.retry_after()
            )
        asyncio.get_running_loop().call_soon(self._deliver, result)

    def _deliver(self, result: Permit | Rejected) -> None:
        if not self.cancelled:
            self._callback(result)

    def cancel(self) -> None:
        """The caller left: free its queue place, or the slot it was admitted to meanwhile."""
        if self.cancelled:
            return
        self.cancelled = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        gate = self._gate
        gate._wake(self._limiter.cancel(self.entry, gate.clock()))


class Admission:
    """The async context manager behind ``Gate.admit``."""

    __slots__ = ("_client_key", "_deadline", "_gate", "_priority", "permit")

    def __init__(
        self, gate: Gate, priority: Priority | None, deadline: float | None, client_key: str | None
    ) -> None:
        self._gate = gate
        self._priority = priority
        self._deadline = deadline
        self._client_key = client_key
        self.permit: Permit | None = None

    async def __aenter__(self) -> Permit:
        self.permit = await self._gate.acquire(self._priority, self._deadline, self._client_key)
        return self.permit

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        permit = self.permit
        if permit is not None:
            self.permit = None
            lost = exc_type is not None and issubclass(
                exc_type, TimeoutError | asyncio.CancelledError
            )
            self._gate.release(permit, dropped=lost)
