"""The discovery client's cache of answers (sans-IO: it reads no clock; ``now`` is passed in).

Rules of this file:

* An entry is **fresh** while a registry node confirmed it at most ``ttl`` seconds ago, or
  while it is **live**: a background blocking query is connected to a node that would answer
  the moment the service changes. A fresh entry is answered without asking anyone.
* Any answer from a node (changed or not) **confirms** the entry: its age restarts at 0.
* When no node can answer, the entry is still served, marked ``stale``, for up to
  ``max_stale`` seconds after its last confirmation; after that it is as good as absent, and
  the caller raises ``DiscoveryUnavailable``.
* An entry nobody asked for in ``idle_after`` seconds is no longer worth refreshing in the
  background (``idle``); it stays as a fallback until ``max_stale``, then ``prune`` drops it.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from interknit.client.model import Instance, Lookup, Query

CACHE_TTL = 5.0
MAX_STALE = 3600.0
IDLE_AFTER = 300.0


@dataclass(slots=True)
class Entry:
    instances: tuple[Instance, ...]
    revision: int
    confirmed_at: float
    used_at: float
    node: str | None
    # The answering node said its own copy is stale (its store is unreachable).
    node_stale: bool = False
    live: bool = False


class Cache:
    def __init__(
        self, ttl: float = CACHE_TTL, max_stale: float = MAX_STALE, idle_after: float = IDLE_AFTER
    ) -> None:
        if ttl < 0 or max_stale < 0:
            raise ValueError("ttl and max_stale must not be negative")
        self.ttl = ttl
        self.max_stale = max(max_stale, ttl)
        self.idle_after = idle_after
        self._entries: dict[Query, Entry] = {}

    def __contains__(self, query: Query) -> bool:
        return query in self._entries

    def __len__(self) -> int:
        return len(self._entries)

    def entry(self, query: Query) -> Entry | None:
        return self._entries.get(query)

    def is_fresh(self, query: Query, now: float) -> bool:
        entry = self._entries.get(query)
        return entry is not None and (entry.live or now - entry.confirmed_at <= self.ttl)

    def fresh(self, query: Query, now: float) -> Lookup | None:
        """The cached answer if it is fresh (and counts as a use), else None."""
        entry = self._entries.get(query)
        if entry is None or not (entry.live or now - entry.confirmed_at <= self.ttl):
            return None
        entry.used_at = now
        return self._lookup(query, entry, now, stale=entry.node_stale)

    def fallback(self, query: Query, now: float, subsets: bool = False) -> Lookup | None:
        """The cached answer, marked stale unless still fresh, if it is within ``max_stale``;
        None when there is none or it is too old to serve.

        Without an entry of its own, a query is answered from a cached answer that holds all
        of its instances (``healthy=False`` holds ``healthy=True``; no tag holds every tag),
        filtered. With ``subsets``, one that holds only some of them will do too (a pick after
        the registry went down may balance over the passing instances it saw).
        """
        best: tuple[Query, Entry] | None = None
        for candidate in self._candidates(query, subsets):
            entry = self._entries.get(candidate)
            if entry is None:
                continue
            age = now - entry.confirmed_at
            if not (entry.live or age <= self.ttl) and age > self.max_stale:
                continue
            if best is None or entry.confirmed_at > best[1].confirmed_at:
                best = (candidate, entry)
            if candidate == query:
                break
        if best is None:
            return None
        source, entry = best
        entry.used_at = now
        fresh = entry.live or now - entry.confirmed_at <= self.ttl
        lookup = self._lookup(query, entry, now, stale=entry.node_stale or not fresh)
        if source == query:
            return lookup
        # Answered from another query's entry: never fresh for this one.
        kept = tuple(i for i in entry.instances if query.matches(i))
        return replace(lookup, instances=kept, stale=True)

    @staticmethod
    def _candidates(query: Query, subsets: bool) -> list[Query]:
        service, healthy, tag = query.service, query.healthy, query.tag
        out = [query]
        wider = [Query(service, False, tag)] if healthy else []
        if tag is not None:
            wider += [Query(service, healthy, None), Query(service, False, None)]
        out += [q for q in wider if q not in out]
        if subsets and not healthy:
            out.append(Query(service, True, tag))
        return out

    def store(
        self,
        query: Query,
        instances: tuple[Instance, ...],
        revision: int,
        now: float,
        node: str | None = None,
        node_stale: bool = False,
        used: bool = True,
    ) -> Lookup:
        """Record a node's answer; an unchanged answer keeps the old tuple (so pools built on
        it need no rebuild) and only restarts the age."""
        entry = self._entries.get(query)
        if entry is None:
            entry = self._entries[query] = Entry(instances, revision, now, now, node, node_stale)
        else:
            if instances != entry.instances:
                entry.instances = instances
            entry.revision = revision
            entry.confirmed_at = now
            entry.node = node
            entry.node_stale = node_stale
            if used:
                entry.used_at = now
        return self._lookup(query, entry, now, stale=node_stale)

    def set_live(self, query: Query, live: bool) -> None:
        """Mark that a blocking query for ``query`` is (or is no longer) connected. Losing it
        does not count as a confirmation: the age runs on from the last answer."""
        entry = self._entries.get(query)
        if entry is not None:
            entry.live = live

    def idle(self, query: Query, now: float) -> bool:
        entry = self._entries.get(query)
        return entry is None or now - entry.used_at > self.idle_after

    def prune(self, now: float) -> list[Query]:
        """Drop entries that are idle and too old to serve; returns what was dropped."""
        gone = [
            q
            for q, e in self._entries.items()
            if now - e.used_at > self.idle_after and now - e.confirmed_at > self.max_stale
        ]
        for query in gone:
            del self._entries[query]
        return gone

    def _lookup(self, query: Query, entry: Entry, now: float, stale: bool) -> Lookup:
        age = 0.0 if entry.live else max(0.0, now - entry.confirmed_at)
        return Lookup(query.service, entry.instances, entry.revision, stale, age, entry.node)
