"""The bounded admission queue: FIFO while it drains, adaptive LIFO with CoDel when it does not.

Theory of operation (Facebook's "Fail at Scale": controlled delay plus adaptive LIFO). A queue
that empties now and then is absorbing a burst: serve it first come, first served, and let an
entry wait up to ``timeout``. A queue that has not been empty for ``interval`` is a standing
queue: the oldest entries are the least likely to still be wanted, so serve the newest first
(LIFO) and let entries wait only ``target`` before they are shed. Once the queue empties again,
it returns to FIFO.

Entries live in one lane per priority (critical, default, sheddable); a higher lane is always
served first. Everything here is sans-IO: ``now`` is passed in, and expired entries are handed
back to the caller (in an ``out`` list) to be refused.
"""

from __future__ import annotations

from collections import deque
from typing import Any, Literal

Priority = int
CRITICAL: Priority = 0
DEFAULT: Priority = 1
SHEDDABLE: Priority = 2
PRIORITY_NAMES: tuple[str, ...] = ("critical", "default", "sheddable")
PriorityName = Literal["critical", "default", "sheddable"]

RejectReason = Literal["queue_full", "queue_timeout", "deadline", "rate", "priority", "connections"]
REJECT_REASONS: tuple[RejectReason, ...] = (
    "queue_full",
    "queue_timeout",
    "deadline",
    "rate",
    "priority",
    "connections",
)

QUEUED = 0
ADMITTED = 1
REJECTED = 2


def parse_priority(value: str | bytes | None) -> Priority | None:
    """The priority named by an ``X-Priority`` value, or None when absent or unknown."""
    if value is None:
        return None
    if isinstance(value, bytes):
        value = value.decode("latin-1")
    name = value.strip().lower()
    for index, known in enumerate(PRIORITY_NAMES):
        if name == known:
            return index
    return None


class Entry:
    """One request waiting for admission. The asyncio shell parks its future in ``waiter``."""

    __slots__ = ("deadline", "enqueued_at", "inflight", "priority", "reason", "status", "waiter")

    def __init__(self, priority: Priority, deadline: float | None, now: float) -> None:
        self.priority = priority
        self.deadline = deadline
        self.enqueued_at = now
        self.status = QUEUED
        self.reason: RejectReason | None = None
        # In-flight count at admission, for the limit's sample when the request finishes.
        self.inflight = 0
        self.waiter: Any = None

    def __repr__(self) -> str:
        state = ("queued", "admitted", "rejected")[self.status]
        return f"<Entry {PRIORITY_NAMES[self.priority]} {state} {self.reason or ''}>"


class AdaptiveQueue:
    """A bounded queue of ``Entry`` in priority lanes, FIFO or LIFO by how congested it is."""

    timeout = 0.1
    target = 0.005
    interval = 0.1

    def __init__(
        self,
        capacity: int,
        timeout: float | None = None,
        *,
        target: float | None = None,
        interval: float | None = None,
    ) -> None:
        if capacity < 0:
            raise ValueError("queue capacity must not be negative")
        self.capacity = capacity
        if timeout is not None:
            self.timeout = timeout
        if target is not None:
            self.target = target
        if interval is not None:
            self.interval = interval
        self._lanes: tuple[deque[Entry], deque[Entry], deque[Entry]] = (deque(), deque(), deque())
        self._size = 0
        # When the queue was last seen empty: the start of the current busy period.
        self._last_empty = 0.0

    def __len__(self) -> int:
        return self._size

    def congested(self, now: float) -> bool:
        """True while a standing queue has lasted longer than ``interval`` (serve LIFO)."""
        return self._size > 0 and now - self._last_empty >= self.interval

    def max_wait(self, now: float) -> float:
        """How long an entry may wait in the queue's present mode."""
        if self.congested(now):
            return min(self.target, self.timeout)
        return self.timeout

    def count_at_or_above(self, priority: Priority) -> int:
        """Entries that would be served before a new entry of ``priority`` in FIFO mode."""
        lanes = self._lanes
        if priority == CRITICAL:
            return len(lanes[0])
        if priority == DEFAULT:
            return len(lanes[0]) + len(lanes[1])
        return self._size

    def push(self, entry: Entry, now: float) -> bool:
        """Queue ``entry``; False when the queue is full."""
        if self._size >= self.capacity:
            return False
        if self._size == 0:
            self._last_empty = now
        self._lanes[entry.priority].append(entry)
        self._size += 1
        return True

    def pop(self, now: float, out: list[Entry], critical_only: bool = False) -> Entry | None:
        """The next entry to admit, or None. Entries found expired on the way go to ``out``
        (status REJECTED with their reason), so the caller can refuse them."""
        lifo = self.congested(now)
        max_wait = min(self.target, self.timeout) if lifo else self.timeout
        lanes = self._lanes if not critical_only else self._lanes[:1]
        for lane in lanes:
            self._expire_lane(lane, now, max_wait, out)
            while lane:
                entry = lane.pop() if lifo else lane.popleft()
                self._size -= 1
                if entry.deadline is not None and entry.deadline <= now:
                    self._shed(entry, "deadline", out)
                    continue
                self._note_empty(now)
                return entry
        self._note_empty(now)
        return None

    def expire(self, now: float, out: list[Entry]) -> None:
        """Move every entry past its wait or its deadline to ``out``."""
        if self._size == 0:
            return
        max_wait = self.max_wait(now)
        for lane in self._lanes:
            self._expire_lane(lane, now, max_wait, out)
            if any(e.deadline is not None and e.deadline <= now for e in lane):
                keep = [e for e in lane if e.deadline is None or e.deadline > now]
                for e in lane:
                    if e.deadline is not None and e.deadline <= now:
                        self._size -= 1
                        self._shed(e, "deadline", out)
                lane.clear()
                lane.extend(keep)
        self._note_empty(now)

    def remove(self, entry: Entry, now: float) -> bool:
        """Take out an entry whose caller went away; False if it is not queued."""
        try:
            self._lanes[entry.priority].remove(entry)
        except ValueError:
            return False
        self._size -= 1
        self._note_empty(now)
        return True

    def next_expiry(self, now: float) -> float | None:
        """The earliest time an entry would expire in the present mode (for a timer)."""
        if self._size == 0:
            return None
        max_wait = self.max_wait(now)
        soonest: float | None = None
        for lane in self._lanes:
            if lane:
                at = lane[0].enqueued_at + max_wait
                soonest = at if soonest is None or at < soonest else soonest
            for e in lane:
                if e.deadline is not None and (soonest is None or e.deadline < soonest):
                    soonest = e.deadline
        return soonest

    def _expire_lane(
        self, lane: deque[Entry], now: float, max_wait: float, out: list[Entry]
    ) -> None:
        # Entries are in arrival order, so the ones that waited too long are all at the left.
        horizon = now - max_wait
        while lane and lane[0].enqueued_at <= horizon:
            entry = lane.popleft()
            self._size -= 1
            self._shed(entry, "queue_timeout", out)

    def _shed(self, entry: Entry, reason: RejectReason, out: list[Entry]) -> None:
        entry.status = REJECTED
        entry.reason = reason
        out.append(entry)

    def _note_empty(self, now: float) -> None:
        if self._size == 0:
            self._last_empty = now
