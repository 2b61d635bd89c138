"""Passive health: eject endpoints that keep failing real traffic (Envoy's outlier detection).

Rules of this file:

* It is sans-IO: the load balancer feeds it the outcome of each request or connection it
  forwards (``on_result``), with ``now``; it holds no sockets and reads no clock.
* It only counts *gateway* failures: the caller decides what ``ok=False`` means (a refused or
  reset connection, a 502, 503 or 504), so one detector serves HTTP and TCP pools alike.

Theory of operation. Each member keeps a count of consecutive failures; a success resets it.
When the count reaches ``consecutive_failures`` the member is ejected for
``base_ejection_time`` times the number of times it has been ejected (its multiplier), never
longer than ``max_ejection_time``, so an endpoint that keeps failing stays out for longer and
longer. An ejection is refused while it would take more than ``max_ejection_percent`` of the
pool out at once: passive detection must never empty a pool on its own (a pool of one is never
ejected; active checks still protect it). A refused ejection is retried on the next failure.
An ejected member returns by itself when its time is up (``expire``). Once back, its
multiplier decays by one for each full ``interval`` it spends in the pool, as Envoy's does, so
an endpoint that failed once long ago starts again from ``base_ejection_time``.
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Hashable, Iterable
from dataclasses import dataclass
from typing import Generic, TypeVar

K = TypeVar("K", bound=Hashable)


@dataclass(slots=True)
class _Member:
    failures: int = 0
    ejections: int = 0  # the ejection-time multiplier
    ejected_until: float | None = None
    # Start of the current decay period: when it returned, or when the multiplier last decayed.
    decay_from: float = 0.0


class OutlierDetector(Generic[K]):
    """Consecutive-gateway-failure ejection over one pool's members."""

    def __init__(
        self,
        consecutive_failures: int = 5,
        base_ejection_time: float = 30.0,
        max_ejection_percent: float = 50,
        max_ejection_time: float = 300.0,
        interval: float = 10.0,
    ) -> None:
        if consecutive_failures < 1:
            raise ValueError("consecutive_failures must be at least 1")
        if base_ejection_time <= 0 or max_ejection_time <= 0 or interval <= 0:
            raise ValueError("ejection times and interval must be positive")
        if not 0 <= max_ejection_percent <= 100:
            raise ValueError("max_ejection_percent must be between 0 and 100")
        self.consecutive_failures = consecutive_failures
        self.base_ejection_time = base_ejection_time
        self.max_ejection_percent = max_ejection_percent
        self.max_ejection_time = max_ejection_time
        self.interval = interval
        self._members: dict[K, _Member] = {}
        # (ejected_until, seq, key); an entry is live while it matches the member's time.
        self._expiries: list[tuple[float, int, K]] = []
        self._seq = 0
        # Members returned by a write before the caller's next ``expire``; it still reports them.
        self._returned: list[K] = []

    # ------------------------------------------------------------------ pool

    def set_members(self, keys: Iterable[K]) -> None:
        """The pool's members now; newcomers start clean, leavers are forgotten."""
        keep = set(keys)
        for key in list(self._members):
            if key not in keep:
                del self._members[key]
        for key in keep:
            if key not in self._members:
                self._members[key] = _Member()

    def members(self) -> list[K]:
        return list(self._members)

    def __contains__(self, key: object) -> bool:
        return key in self._members

    # ------------------------------------------------------------------ reads

    def ejected(self, key: K, now: float) -> bool:
        member = self._members.get(key)
        return (
            member is not None and member.ejected_until is not None and member.ejected_until > now
        )

    def ejected_until(self, key: K) -> float | None:
        member = self._members.get(key)
        return None if member is None else member.ejected_until

    def ejection_count(self, key: K, now: float) -> int:
        """Recent ejections (after decay); the next one lasts one base time longer."""
        self._settle(now)
        member = self._members.get(key)
        if member is None:
            return 0
        self._decay(member, now)
        return member.ejections

    def ejected_count(self, now: float) -> int:
        return sum(
            1
            for m in self._members.values()
            if m.ejected_until is not None and m.ejected_until > now
        )

    def next_expiry(self) -> float | None:
        """When ``expire`` next has something to return, so a shell can sleep until then."""
        while self._expiries:
            until, _, key = self._expiries[0]
            member = self._members.get(key)
            if member is not None and member.ejected_until == until:
                return until
            heapq.heappop(self._expiries)
        return None

    # ------------------------------------------------------------------ writes

    def on_result(self, key: K, ok: bool, now: float) -> float | None:
        """Feed one outcome; return the ``ejected_until`` of a new ejection, else ``None``.

        Outcomes for unknown members and for members already ejected (requests that were in
        flight when it happened) are ignored.
        """
        self._settle(now)
        member = self._members.get(key)
        if member is None or member.ejected_until is not None:
            return None
        if ok:
            member.failures = 0
            return None
        member.failures += 1
        if member.failures < self.consecutive_failures:
            return None
        # Cap: after this ejection at most max_ejection_percent of the pool is out.
        if (self.ejected_count(now) + 1) * 100 > self.max_ejection_percent * len(self._members):
            return None
        self._decay(member, now)
        member.ejections += 1
        member.failures = 0
        until = now + min(self.base_ejection_time * member.ejections, self.max_ejection_time)
        member.ejected_until = until
        self._seq += 1
        heapq.heappush(self._expiries, (until, self._seq, key))
        return until

    def expire(self, now: float) -> list[K]:
        """Return to the pool every member whose ejection is over; the keys returned."""
        self._settle(now)
        back, self._returned = self._returned, []
        return [key for key in back if key in self._members]

    # ------------------------------------------------------------------ internals

    def _settle(self, now: float) -> None:
        """Bring every member whose ejection is over back, before anything reads the pool."""
        while self._expiries and self._expiries[0][0] <= now:
            until, _, key = heapq.heappop(self._expiries)
            member = self._members.get(key)
            if member is None or member.ejected_until != until:
                continue
            member.ejected_until = None
            member.failures = 0
            member.decay_from = until
            self._returned.append(key)

    def _decay(self, member: _Member, now: float) -> None:
        if member.ejections == 0 or member.ejected_until is not None:
            return
        periods = math.floor((now - member.decay_from) / self.interval)
        if periods > 0:
            member.ejections = max(0, member.ejections - periods)
            member.decay_from += periods * self.interval
