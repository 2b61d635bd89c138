"""The per-route admission decision: admit now, queue, or refuse with a reason.

Rules (everything that decides admission lives here; the asyncio shell only waits and wakes):

- At most ``limit`` requests are in flight, where ``limit`` comes from a ``Limit`` algorithm.
  A share of it (``reserve``, default 10%) is kept for critical requests: other priorities may
  only fill ``limit - reserved``.
- A request that cannot start waits in the ``AdaptiveQueue``, which serves critical before
  default before sheddable, FIFO while the queue drains and LIFO with a short CoDel timeout when
  it stands.
- Sheddable requests are refused first: they may not wait at all once the queue stands or is
  half full (reason ``priority``).
- A request whose deadline cannot be met (expected wait + recent median service time > time
  left) is refused at once (reason ``deadline``) instead of starting work its caller abandons.
- A full queue refuses (``queue_full``); an entry that waits too long is refused
  (``queue_timeout``); an entry whose deadline passes while queued is refused (``deadline``).

Each refusal carries ``retry_after``: the time the queue would take to drain at the recent
service rate, which clients use to spread their retries.

The limiter is sans-IO: ``now`` is passed in. Methods that can settle queued entries (admit or
refuse them) return those entries; the caller wakes whoever waits on them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from interknit.demand.deadline import ServiceTimes
from interknit.demand.limits import Limit
from interknit.demand.queue import (
    ADMITTED,
    CRITICAL,
    QUEUED,
    REJECTED,
    SHEDDABLE,
    AdaptiveQueue,
    Entry,
    Priority,
    RejectReason,
)

__all__ = ["ADMIT", "Admit", "Decision", "Limiter", "Reject"]

_NOTHING: tuple[Entry, ...] = ()
# Retry-After is advice; past a minute it only keeps clients away from a recovered pool.
_MAX_RETRY_AFTER = 60.0


class Admit:
    """The request may start now. There is one instance, ``ADMIT``."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "ADMIT"


ADMIT = Admit()


@dataclass(frozen=True, slots=True)
class Reject:
    """The request is refused: answer 503 (429 for ``rate``) with ``Retry-After``."""

    reason: RejectReason
    retry_after: float

    @property
    def status(self) -> int:
        return 429 if self.reason == "rate" else 503


Decision = Admit | Entry | Reject


class Limiter:
    """Admission for one route: a concurrency limit, a bounded queue, priorities, deadlines."""

    def __init__(
        self,
        limit: Limit | None,
        *,
        queue: int = 64,
        queue_timeout: float = 0.1,
        reserve: float = 0.1,
        codel_target: float = 0.005,
        codel_interval: float = 0.1,
        service_times: ServiceTimes | None = None,
    ) -> None:
        if not 0.0 <= reserve < 1.0:
            raise ValueError("reserve must be in [0, 1)")
        self._limit_algo = limit
        self.queue = AdaptiveQueue(
            queue, queue_timeout, target=codel_target, interval=codel_interval
        )
        self.reserve = reserve
        self.service_times = service_times if service_times is not None else ServiceTimes()
        self.inflight = 0
        # Filled by try_acquire, emptied by take_swept (try_acquire returns its own decision).
        self.swept: list[Entry] = []
        self._limit = 0
        self._ceiling = 0
        self._set_limit(limit.limit if limit is not None else 1 << 62)

    # Limits ---------------------------------------------------------------------------------

    @property
    def limit(self) -> int:
        return self._limit

    @property
    def algorithm(self) -> str | None:
        """The limit's kind (``fixed``, ``aimd``, ``gradient``); None: no concurrency limit,
        only the queue's and deadlines' rules (``limit`` is then a number no route reaches)."""
        algo = self._limit_algo
        if algo is None:
            return None
        return type(algo).__name__.removesuffix("Limit").lower()

    def _set_limit(self, limit: int) -> None:
        self._limit = max(1, limit)
        reserved = int(self._limit * self.reserve)
        # Never reserve every slot: non-critical traffic must still be able to make progress.
        self._ceiling = max(1, self._limit - reserved)

    def retry_after(self) -> float:
        """Seconds until the queue is likely drained at the recent service rate."""
        median = self.service_times.median
        drain = (len(self.queue) + 1) * median / self._limit + median
        return min(_MAX_RETRY_AFTER, max(drain, self.queue.timeout))

    # Admission ------------------------------------------------------------------------------

    def try_acquire(
        self, now: float, priority: Priority, deadline: float | None = None
    ) -> Decision:
        """``ADMIT`` (the caller must later ``release``), a queued ``Entry`` to wait on, or a
        ``Reject``."""
        median = self.service_times.median
        if deadline is not None and deadline - now <= median:
            # Zero time left, or not even an idle pool would finish in time.
            return Reject("deadline", self.retry_after())
        ceiling = self._limit if priority == CRITICAL else self._ceiling
        if self.inflight < ceiling:
            self.inflight += 1
            return ADMIT

        queue = self.queue
        if queue and queue.capacity and len(queue) * 2 >= queue.capacity:
            # Shed stale entries before judging a busy queue full; their waiters are woken by
            # the caller through ``take_swept``.
            queue.expire(now, self.swept)
        if (
            priority == SHEDDABLE
            and queue.capacity > 0
            and (queue.congested(now) or len(queue) * 2 >= queue.capacity)
        ):
            return Reject("priority", self.retry_after())
        if len(queue) >= queue.capacity:
            return Reject("queue_full", self.retry_after())
        if deadline is not None and median > 0.0:
            ahead = 0 if queue.congested(now) else queue.count_at_or_above(priority)
            expected_wait = (ahead + 1) * median / self._limit
            if now + expected_wait + median > deadline:
                return Reject("deadline", self.retry_after())
        entry = Entry(priority, deadline, now)
        queue.push(entry, now)
        return entry

    def take_swept(self) -> list[Entry]:
        """Entries that ``try_acquire`` refused as expired while making room; wake them."""
        swept = self.swept
        self.swept = []
        return swept

    def release(
        self, now: float, rtt: float, dropped: bool = False, inflight: int | None = None
    ) -> Sequence[Entry]:
        """A request admitted earlier has finished after ``rtt`` seconds in service.

        ``inflight`` is the in-flight count when it started (``Entry.inflight``, or the
        limiter's ``inflight`` right after ``ADMIT``); it defaults to the count now. Returns the
        queued entries this settled: admitted ones (now counted in flight) and expired ones.
        """
        started_with = self.inflight if inflight is None else inflight
        if self.inflight > 0:
            self.inflight -= 1
        if not dropped:
            self.service_times.add(rtt)
        algo = self._limit_algo
        if algo is not None:
            new = algo.on_sample(rtt, started_with, dropped)
            if new != self._limit:
                self._set_limit(new)
        if not self.queue:
            return _NOTHING
        return self._drain(now)

    def forfeit(self, now: float) -> Sequence[Entry]:
        """Give back a slot without a sample (the request never reached the pool)."""
        if self.inflight > 0:
            self.inflight -= 1
        if not self.queue:
            return _NOTHING
        return self._drain(now)

    def cancel(
        self, entry: Entry, now: float, reason: RejectReason = "queue_timeout"
    ) -> Sequence[Entry]:
        """The waiter of ``entry`` gives up (its timer fired, or its client left).

        A still-queued entry is refused with ``reason``; an entry admitted in the meantime gives
        its slot back. Returns the other entries this settled.
        """
        if entry.status == QUEUED:
            self.queue.remove(entry, now)
            entry.status = REJECTED
            entry.reason = reason
            return _NOTHING
        if entry.status == ADMITTED:
            entry.status = REJECTED
            entry.reason = reason
            return self.forfeit(now)
        return _NOTHING

    def expire(self, now: float) -> Sequence[Entry]:
        """Refuse queued entries past their wait or deadline (for the shell's timer)."""
        if not self.queue:
            return _NOTHING
        out: list[Entry] = []
        self.queue.expire(now, out)
        return out

    def _drain(self, now: float) -> list[Entry]:
        settled: list[Entry] = []
        queue = self.queue
        while self.inflight < self._limit and queue:
            entry = queue.pop(now, settled, critical_only=self.inflight >= self._ceiling)
            if entry is None:
                break
            self.inflight += 1
            entry.inflight = self.inflight
            entry.status = ADMITTED
            settled.append(entry)
        if queue:
            queue.expire(now, settled)
        return settled
