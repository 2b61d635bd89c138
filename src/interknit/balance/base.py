"""What every balancer sees and offers: endpoints in, one endpoint out.

A balancer is sans-IO: it holds no sockets and reads no clock; ``now`` is passed in. The proxy
(and the discovery client) keep one balancer per pool, hand it the pool's usable endpoints
whenever they change, and ask it for an endpoint per request or connection.
"""

from __future__ import annotations

from collections.abc import Container, Sequence
from dataclasses import dataclass, field
from typing import Protocol


@dataclass(slots=True, eq=False)
class Endpoint:
    """An instance as a pool sees it. Identity is the object; ``key`` is stable across updates."""

    key: str  # "service/id" for registry instances, "host:port" for static servers
    address: str
    port: int
    weight: int = 1
    zone: str | None = None
    # Outstanding requests (HTTP) or open connections (TCP), kept by the caller through
    # ``started``/``finished`` so that least_requests can read it.
    inflight: int = 0
    # When the endpoint (re)joined the pool as passing, for slow start.
    since: float = 0.0
    meta: dict[str, str] = field(default_factory=dict)

    def started(self) -> None:
        self.inflight += 1

    def finished(self) -> None:
        if self.inflight > 0:
            self.inflight -= 1


class Balancer(Protocol):
    """One balancing policy over one pool's usable endpoints."""

    def set_endpoints(self, endpoints: Sequence[Endpoint], now: float) -> None:
        """Replace the endpoint set (called when the pool changes, not per request)."""
        ...

    def pick(
        self, hash_key: bytes | None, now: float, exclude: Container[Endpoint] = ()
    ) -> Endpoint | None:
        """The endpoint for one request; ``hash_key`` feeds hashing policies, ``exclude``
        names endpoints already tried (retries go elsewhere). ``None`` when nothing is left."""
        ...


# A ramping endpoint never drops below this share of its weight, so it still sees some traffic
# (and so some proof that it works) from its first second on; Envoy's min_weight_percent is 10%.
SLOW_START_FLOOR = 0.1


def effective_weight(
    endpoint: Endpoint, now: float, slow_start: float, floor: float = SLOW_START_FLOOR
) -> float:
    """``endpoint.weight`` scaled by how far it is through its slow start at ``now``.

    The ramp is linear from ``floor`` to 1 over ``slow_start`` seconds after ``since``; with
    ``slow_start <= 0`` (the default everywhere) the weight is used as it is.
    """
    weight = float(max(endpoint.weight, 0))
    if slow_start <= 0.0 or weight == 0.0:
        return weight
    age = now - endpoint.since
    if age >= slow_start:
        return weight
    return weight * max(floor, age / slow_start)
