"""Client-side balancing: the proxy's pools and balancers over a cached answer (sans-IO).

One ``Pool`` per (query, policy), rebuilt only when the cached instance tuple changes (the
cache keeps the same tuple for unchanged answers), so a pick costs what a proxy pick costs.
Picking goes through ``Pool``, so draining endpoints take no new work, ejected ones are skipped
and the panic threshold applies exactly as in the proxy (docs/balance.md).
"""

from __future__ import annotations

import random
from collections.abc import Container

from interknit.balance import Endpoint, Pool, make_balancer
from interknit.client.model import Instance, Lookup, Query
from interknit.endpoints import endpoint_state


class Picker:
    def __init__(self, rng: random.Random | None = None) -> None:
        self._rng = rng
        # (query, policy) -> (pool, the instances it was built from, key -> instance)
        self._pools: dict[
            tuple[Query, str], tuple[Pool, tuple[Instance, ...] | None, dict[str, Instance]]
        ] = {}

    def pool(self, query: Query, policy: str, lookup: Lookup, now: float) -> Pool:
        return self._current(query, policy, lookup, now)[0]

    def pick(
        self,
        query: Query,
        policy: str,
        lookup: Lookup,
        now: float,
        key: bytes | None = None,
        exclude: Container[str] = (),
    ) -> Instance | None:
        """An instance for one call, or None when the pool has nothing usable. ``exclude``
        holds instance ids already tried by this call (retries go elsewhere)."""
        pool, _, by_key = self._current(query, policy, lookup, now)
        skip: list[Endpoint] = []
        if exclude:
            skip = [ep for ep in pool.endpoints if ep.key.split("/", 1)[1] in exclude]
        endpoint = pool.pick(key, now, skip)
        return None if endpoint is None else by_key.get(endpoint.key)

    def forget(self, query: Query) -> None:
        for k in [k for k in self._pools if k[0] == query]:
            del self._pools[k]

    def _current(
        self, query: Query, policy: str, lookup: Lookup, now: float
    ) -> tuple[Pool, tuple[Instance, ...] | None, dict[str, Instance]]:
        slot = (query, policy)
        current = self._pools.get(slot)
        if current is None:
            pool = Pool(query.service, make_balancer(policy, rng=self._rng))
            current = (pool, None, {})
        if current[1] is not lookup.instances:
            pool = current[0]
            states = [endpoint_state(i) for i in lookup.instances]
            pool.update(states, now)
            by_key = {state.key: i for state, i in zip(states, lookup.instances, strict=True)}
            current = (pool, lookup.instances, by_key)
            self._pools[slot] = current
        return current
