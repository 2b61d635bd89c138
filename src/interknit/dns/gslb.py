"""Global server load balancing: which region answers ``SERVICE.global.ZONE`` for a client.

Sans-IO: the zone hands in the client's address (from EDNS Client Subnet or the packet's source),
how many healthy instances each region has now, and a uniform random number in [0, 1) for the
weighted draws. Nothing here reads a clock, a socket or a random source.

Policies:

* ``failover``: the first region of ``order`` that has at least ``min_healthy`` healthy
  instances answers for every client (active/passive sites).
* ``nearest``: the client's region (found by the longest matching CIDR of ``regions``) answers
  while it has ``min_healthy`` healthy instances; then the regions of ``fallback[region]`` in
  turn. When none of those can answer (or the client matches no CIDR), the load spreads over
  every region that can, in proportion to ``weights``.
* ``weighted``: every query draws a region in proportion to ``weights`` among the regions that
  can answer; a region that is down has its share spread over all the others.

When no region reaches ``min_healthy``, the same rules run again with a threshold of one
instance: a thin answer beats an empty one. Instances without a region never answer global
names.

Gateways. A service may declare, per region, the addresses of the load balancers (VIPs) that
front its instances there (``gateways[service][region]``). Its global name then answers with the
chosen region's gateway addresses instead of the instances', and only regions with gateways can
be chosen. A region still counts as up by the healthy instances of the service in it: a VIP is
only as alive as what stands behind it (Route 53's "evaluate target health").
"""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal

Policy = Literal["failover", "weighted", "nearest"]
POLICIES: tuple[Policy, ...] = ("failover", "weighted", "nearest")

Address = ipaddress.IPv4Address | ipaddress.IPv6Address
Network = ipaddress.IPv4Network | ipaddress.IPv6Network


@dataclass(frozen=True)
class GslbConfig:
    """``[dns.regions]`` as the zone needs it. Every field has a default."""

    regions: Mapping[str, str] = field(default_factory=dict)  # CIDR -> region
    fallback: Mapping[str, Sequence[str]] = field(default_factory=dict)  # region -> next regions
    policy: Policy = "nearest"
    min_healthy: int = 1
    weights: Mapping[str, int] = field(default_factory=dict)  # region -> share; missing = 1
    order: Sequence[str] = ()  # failover order; empty = the regions in name order
    # service -> region -> gateway (load balancer VIP) addresses
    gateways: Mapping[str, Mapping[str, Sequence[str]]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.policy not in POLICIES:
            raise ValueError(f"policy must be one of {', '.join(POLICIES)}, not {self.policy!r}")
        if self.min_healthy < 1:
            raise ValueError("min_healthy must be at least 1")
        for cidr in self.regions:
            ipaddress.ip_network(cidr, strict=False)  # raises ValueError naming the CIDR
        for region, weight in self.weights.items():
            if weight < 0:
                raise ValueError(f"weight of region {region!r} must not be negative")
        for service, regions in self.gateways.items():
            if not regions:
                raise ValueError(f"gateways of service {service!r} name no region")
            for region, addresses in regions.items():
                if not addresses:
                    raise ValueError(f"gateways of {service!r} in {region!r} list no address")
                for address in addresses:
                    ipaddress.ip_address(address)  # raises ValueError naming the address


@dataclass(frozen=True, slots=True)
class Location:
    """Where a client is: its region (``None``: unknown) and the prefix length that says so."""

    region: str | None
    prefix: int


class Gslb:
    def __init__(self, config: GslbConfig) -> None:
        self.config = config
        nets = [(ipaddress.ip_network(c, strict=False), r) for c, r in config.regions.items()]
        # Longest prefix first, so the first match is the most specific.
        self._networks: list[tuple[Network, str]] = sorted(
            nets, key=lambda item: item[0].prefixlen, reverse=True
        )

    @property
    def client_dependent(self) -> bool:
        """Whether the answer depends on who asks (and so ECS scope must say how)."""
        return self.config.policy == "nearest"

    def candidates(self, service: str, healthy: Mapping[str, int]) -> dict[str, int]:
        """The regions that may answer for ``service``, with their healthy instance counts.

        Without gateways, every region with an instance; with gateways, exactly the regions
        that have a gateway (zero when no instance of the service there is healthy).
        """
        gateways = self.config.gateways.get(service)
        if gateways is None:
            return dict(healthy)
        return {region: healthy.get(region, 0) for region in gateways}

    def gateways(self, service: str, region: str) -> Sequence[str] | None:
        """The gateway addresses ``region`` answers with, or ``None``: answer the instances."""
        regions = self.config.gateways.get(service)
        return None if regions is None else regions.get(region, ())

    def locate(self, address: Address | None) -> Location:
        if address is None:
            return Location(None, 0)
        for network, region in self._networks:
            if address.version == network.version and address in network:
                return Location(region, network.prefixlen)
        return Location(None, 0)

    def choose(self, region: str | None, healthy: Mapping[str, int], draw: float) -> str | None:
        """The region that answers, or ``None`` when no region has a healthy instance."""
        return self.pick(region, healthy, draw)[0]

    def pick(
        self, region: str | None, healthy: Mapping[str, int], draw: float
    ) -> tuple[str | None, bool]:
        """``choose``, and whether the draw decided it (so the next query may differ).

        When it did not, the answer is a function of the client's region and the health of
        the regions alone, and the zone may cache it per client region.
        """
        threshold = self.config.min_healthy
        chosen, drawn = self._choose(region, healthy, draw, threshold)
        if chosen is None and threshold > 1:
            chosen, drawn = self._choose(region, healthy, draw, 1)
        return chosen, drawn

    def _choose(
        self, region: str | None, healthy: Mapping[str, int], draw: float, threshold: int
    ) -> tuple[str | None, bool]:
        policy = self.config.policy
        if policy == "failover":
            order = self.config.order or sorted(healthy)
            for name in order:
                if healthy.get(name, 0) >= threshold:
                    return name, False
            return None, False
        if policy == "nearest" and region is not None:
            for name in (region, *self.config.fallback.get(region, ())):
                if healthy.get(name, 0) >= threshold:
                    return name, False
        up = [name for name in sorted(healthy) if healthy[name] >= threshold]
        return self._weighted(up, draw), len(up) > 1

    def _weighted(self, regions: Sequence[str], draw: float) -> str | None:
        weights = self.config.weights
        shares = [weights.get(name, 1) for name in regions]
        total = sum(shares)
        if total <= 0:
            return None
        point = draw * total
        for name, share in zip(regions, shares, strict=True):
            if point < share:
                return name
            point -= share
        # Rounding can leave ``point`` a hair past the last share.
        return next(
            name for name, share in reversed(list(zip(regions, shares, strict=True))) if share
        )
