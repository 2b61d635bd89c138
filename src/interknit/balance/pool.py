"""A pool: one service's endpoints, which of them may take work now, and its balancer.

Rules of this file:

* A pool is sans-IO and knows nothing of where its endpoints come from. It is told about them
  in its own terms, ``EndpointState`` values (``update`` with a full set, ``put``/``remove``
  one at a time), or, for static servers, through ``set_health``; the proxy's
  ``proxy/pool_feed.py`` and the client's ``client/picker.py`` translate registry instances
  and events into these. Every method that depends on time takes ``now`` (wall-clock seconds,
  the registry's ``ejected_until`` clock).
* An endpoint is **usable** when its health is ``passing`` or ``warning`` and it is not ejected
  at ``now``. ``draining`` and ``maintenance`` endpoints take no new work.
* **Panic** (Envoy's panic threshold): when fewer than ``panic_threshold`` of the endpoints that
  are not in maintenance are usable, the health information is more likely wrong than half the
  fleet dead, and concentrating all traffic on the few left would finish them off. The pool
  then balances over every endpoint not in maintenance and not draining, and says so in
  ``panic``.
* One key, one ``Endpoint`` object for as long as the key stays in the pool, whatever its
  health does: the proxy's in-flight counters live on it.
* ``since`` is when an endpoint last became usable (slow start ramps from it). Endpoints usable
  in the pool's first view have been "usable forever": a restarted node has no reason to ramp.
* The balancer is handed the selected endpoints (sorted by key) only when that set, or a
  weight or ``since`` in it, changes; never per request.
"""

from __future__ import annotations

import math
import random
from collections.abc import Container, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Literal, get_args

from interknit.balance.base import Balancer, Endpoint
from interknit.balance.least_requests import LeastRequests
from interknit.balance.maglev import Maglev
from interknit.balance.random_choice import RandomChoice
from interknit.balance.ring_hash import RingHash
from interknit.balance.round_robin import RoundRobin
from interknit.balance.source_ip import SourceIp
from interknit.names import format_hostport, parse_hostport

# The registry's health words (DESIGN.md, "Vocabulary"), as the pool acts on them.
Health = Literal["passing", "warning", "critical", "draining", "maintenance"]

# Below this share of usable endpoints the pool balances over all of them (Envoy's 50%).
PANIC_THRESHOLD = 0.5
USABLE_HEALTH: frozenset[Health] = frozenset({"passing", "warning"})

# The balance policies, by the names config, routes and the client use: the one list of them.
Policy = Literal["round_robin", "least_requests", "random", "ring_hash", "maglev", "source_ip"]
POLICIES: tuple[Policy, ...] = get_args(Policy)
# The policies whose pick depends on ``hash_key``; the proxy builds a key only for these.
HASHING_POLICIES = frozenset({"ring_hash", "maglev", "source_ip"})


def make_balancer(name: str, rng: random.Random | None = None, slow_start: float = 0.0) -> Balancer:
    """A new balancer for the policy ``name``. Hashing policies ignore ``slow_start``."""
    if name == "round_robin":
        return RoundRobin(slow_start=slow_start, rng=rng if rng is not None else random.Random())
    if name == "least_requests":
        return LeastRequests(rng=rng, slow_start=slow_start)
    if name == "random":
        return RandomChoice(rng=rng, slow_start=slow_start)
    if name == "ring_hash":
        return RingHash(rng=rng)
    if name == "maglev":
        return Maglev(rng=rng)
    if name == "source_ip":
        return SourceIp(rng=rng)
    raise ValueError(f"unknown balance policy {name!r}; expected one of {', '.join(POLICIES)}")


@dataclass(frozen=True, slots=True)
class EndpointState:
    """What a pool is told about one endpoint: where it is, its weight, and its health.

    ``key`` names the endpoint for as long as it stays in the pool (``service/id`` for a
    registry instance); ``ejected_until`` is a wall-clock time, as ``now`` is.
    """

    key: str
    address: str
    port: int
    weight: int = 1
    zone: str | None = None
    meta: tuple[tuple[str, str], ...] = ()
    health: Health = "passing"
    ejected_until: float | None = None


@dataclass(slots=True, eq=False)
class _Member:
    endpoint: Endpoint
    health: Health = "passing"
    ejected_until: float | None = None
    usable: bool = False


class Pool:
    def __init__(
        self,
        name: str,
        balancer: Balancer,
        panic_threshold: float = PANIC_THRESHOLD,
    ) -> None:
        if not 0.0 <= panic_threshold <= 1.0:
            raise ValueError("panic_threshold must be between 0 and 1")
        # Global: what the pool is.
        self.name = name
        self.balancer = balancer
        self.panic_threshold = panic_threshold
        # Membership, by endpoint key.
        self._members: dict[str, _Member] = {}
        # Derived by _evaluate: what the balancer sees, and when that must be recomputed.
        self._evaluated = False
        self._selected: list[Endpoint] = []
        self._usable_count = 0
        self._total = 0
        self._panic = False
        self._signature: tuple[tuple[int, int, float], ...] | None = None
        self._next_expiry = math.inf

    @classmethod
    def for_servers(
        cls,
        servers: Iterable[str],
        balancer: Balancer,
        now: float,
        name: str = "static",
        panic_threshold: float = PANIC_THRESHOLD,
    ) -> Pool:
        """A pool of static ``host:port`` servers, all passing until told otherwise."""
        pool = cls(name, balancer, panic_threshold)
        for server in servers:
            host, port = parse_hostport(server)
            key = format_hostport(host, port)
            if key in pool._members:
                raise ValueError(f"{server!r} is listed twice")
            pool._members[key] = _Member(Endpoint(key=key, address=host, port=port))
        pool._evaluate(now)
        return pool

    # Reading.

    @property
    def endpoints(self) -> list[Endpoint]:
        """Every endpoint the pool knows, whatever its health, sorted by key."""
        return [self._members[key].endpoint for key in sorted(self._members)]

    @property
    def selected(self) -> Sequence[Endpoint]:
        """What the balancer balances over: the usable endpoints, or more in panic."""
        return self._selected

    @property
    def panic(self) -> bool:
        return self._panic

    @property
    def usable_count(self) -> int:
        return self._usable_count

    @property
    def total(self) -> int:
        """Endpoints not in maintenance: the denominator of the panic threshold."""
        return self._total

    def get(self, key: str) -> Endpoint | None:
        member = self._members.get(key)
        return None if member is None else member.endpoint

    def health(self, key: str) -> Health | None:
        member = self._members.get(key)
        return None if member is None else member.health

    def is_usable(self, endpoint: Endpoint) -> bool:
        member = self._members.get(endpoint.key)
        return member is not None and member.endpoint is endpoint and member.usable

    def describe(self) -> dict[str, Any]:
        """A JSON-ready view of the pool for the status page and the admin API."""
        selected = {id(ep) for ep in self._selected}
        rows = []
        for key in sorted(self._members):
            member = self._members[key]
            ep = member.endpoint
            rows.append(
                {
                    "key": key,
                    "address": ep.address,
                    "port": ep.port,
                    "weight": ep.weight,
                    "health": member.health,
                    "ejected_until": member.ejected_until,
                    "usable": member.usable,
                    "selected": id(ep) in selected,
                    "inflight": ep.inflight,
                }
            )
        return {
            "name": self.name,
            "panic": self._panic,
            "usable": self._usable_count,
            "total": self._total,
            "endpoints": rows,
        }

    # Changing.

    def update(self, states: Iterable[EndpointState], now: float) -> None:
        """Replace the membership with ``states`` (the service's full current set)."""
        seen: set[str] = set()
        for state in states:
            seen.add(state.key)
            self._put(state)
        for key in [key for key in self._members if key not in seen]:
            del self._members[key]
        self._evaluate(now)

    def put(self, state: EndpointState, now: float) -> None:
        """Add one endpoint or take its changes.

        Load the initial set with ``update``: endpoints usable in the pool's first view skip
        slow start, and with endpoints put one at a time only the first would.
        """
        self._put(state)
        self._evaluate(now)

    def remove(self, key: str, now: float) -> None:
        """Take one endpoint out of the pool; an unknown key is no change."""
        if self._members.pop(key, None) is not None:
            self._evaluate(now)

    def set_health(
        self,
        key: str,
        now: float,
        health: Health | None = None,
        ejected_until: float | None = None,
    ) -> None:
        """Set an endpoint's health and ejection directly (static servers, passive checks).

        ``health=None`` leaves the health as it is; ``ejected_until`` is always replaced.
        """
        member = self._members.get(key)
        if member is None:
            raise KeyError(key)
        if health is not None:
            member.health = health
        member.ejected_until = ejected_until
        self._evaluate(now)

    def refresh(self, now: float) -> None:
        """Re-evaluate once an ejection has run out; cheap when nothing is due."""
        if now >= self._next_expiry:
            self._evaluate(now)

    def pick(
        self, hash_key: bytes | None, now: float, exclude: Container[Endpoint] = ()
    ) -> Endpoint | None:
        if now >= self._next_expiry:
            self._evaluate(now)
        return self.balancer.pick(hash_key, now, exclude)

    # Internals.

    def _put(self, state: EndpointState) -> None:
        member = self._members.get(state.key)
        if member is None:
            endpoint = Endpoint(key=state.key, address=state.address, port=state.port)
            member = self._members[state.key] = _Member(endpoint)
        endpoint = member.endpoint
        endpoint.address = state.address
        endpoint.port = state.port
        endpoint.weight = state.weight
        endpoint.zone = state.zone
        endpoint.meta = dict(state.meta)
        member.health = state.health
        member.ejected_until = state.ejected_until

    def _evaluate(self, now: float) -> None:
        usable: list[Endpoint] = []
        fallback: list[Endpoint] = []
        total = 0
        next_expiry = math.inf
        for key in sorted(self._members):
            member = self._members[key]
            endpoint = member.endpoint
            until = member.ejected_until
            ejected = False
            if until is not None and until > now:
                ejected = True
                next_expiry = min(next_expiry, until)
            ok = member.health in USABLE_HEALTH and not ejected
            if ok and not member.usable:
                endpoint.since = now if self._evaluated else -math.inf
            member.usable = ok
            if member.health == "maintenance":
                continue
            total += 1
            if ok:
                usable.append(endpoint)
            if member.health != "draining":
                fallback.append(endpoint)
        self._evaluated = True
        self._total = total
        self._usable_count = len(usable)
        self._next_expiry = next_expiry
        self._panic = total > 0 and len(usable) < self.panic_threshold * total
        self._selected = fallback if self._panic else usable
        signature = tuple((id(ep), ep.weight, ep.since) for ep in self._selected)
        if signature != self._signature:
            self._signature = signature
            self.balancer.set_endpoints(self._selected, now)
