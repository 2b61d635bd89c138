"""The VIP component's Prometheus metrics. Everything here is rare (a move, an announcement
burst), so ordinary prometheus-client objects are fine."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge


class VipMetrics:
    def __init__(self, registry: CollectorRegistry, vips: list[str]) -> None:
        self.owned = Gauge(
            "interknit_vip_owned",
            "1 while this node has the virtual IP on its interface, else 0.",
            ["address"],
            registry=registry,
        )
        self.moves = Counter(
            "interknit_vip_moves",
            "Virtual IPs this node took on (acquired) or gave up (released, by reason: "
            "moved, fenced, stopping).",
            ["direction", "reason"],
            registry=registry,
        )
        self.announcements = Counter(
            "interknit_vip_announcements",
            "Gratuitous ARPs (ipv4) and unsolicited neighbour advertisements (ipv6) sent, by why "
            "(acquired, recovery, conflict).",
            ["family", "reason"],
            registry=registry,
        )
        self.evictions = Counter(
            "interknit_vip_evictions",
            "Leases of peers this node revoked after not hearing them (or hearing them fenced).",
            registry=registry,
        )
        self.fenced = Gauge(
            "interknit_vip_fenced",
            "1 while this node is a member that cannot confirm its membership in time (it holds "
            "no VIP then).",
            registry=registry,
        )
        self.members = Gauge(
            "interknit_vip_members",
            "VIP nodes in the pool as this node sees them, live (may be given VIPs) or not.",
            ["live"],
            registry=registry,
        )
        for vip in vips:
            self.owned.labels(vip).set(0)
        for direction, reason in (("acquired", "claimed"), ("released", "moved")):
            self.moves.labels(direction, reason)
        for family in ("ipv4", "ipv6"):
            self.announcements.labels(family, "acquired")
