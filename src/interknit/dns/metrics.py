"""The DNS server's Prometheus metrics.

Label children are looked up once and kept in dicts, so counting a query costs a dict lookup
and an increment rather than a ``labels()`` call per packet.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter

from interknit.dns.wire import RCODE_NAMES, qtype_name
from interknit.dns.zone import Reply


class DnsMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.queries = Counter(
            "interknit_dns_queries",
            "DNS queries answered, by query type and response code.",
            ["qtype", "rcode", "transport"],
            registry=registry,
        )
        self.answers = Counter(
            "interknit_dns_answers",
            "Positive DNS answers, by service.",
            ["service"],
            registry=registry,
        )
        self.truncated = Counter(
            "interknit_dns_truncated",
            "UDP replies sent empty with TC set because the answer did not fit (or RRL slipped).",
            registry=registry,
        )
        self.rate_limited = Counter(
            "interknit_dns_rate_limited",
            "UDP queries held back by response rate limiting, by action (drop or slip).",
            ["action"],
            registry=registry,
        )
        self.dropped = Counter(
            "interknit_dns_dropped",
            "Packets dropped without a reply (not a query, or no readable header).",
            registry=registry,
        )
        self._queries: dict[tuple[int, int, str], Counter] = {}
        self._answers: dict[str, Counter] = {}
        for action in ("drop", "slip"):
            self.rate_limited.labels(action)

    def observe(self, reply: Reply, transport: str) -> None:
        # Types past 255 share one key: a client must not be able to grow this dict at will.
        key = (min(reply.qtype, 256), reply.rcode, transport)
        child = self._queries.get(key)
        if child is None:
            rcode = RCODE_NAMES.get(reply.rcode, str(reply.rcode))
            child = self._queries[key] = self.queries.labels(
                qtype_name(reply.qtype), rcode, transport
            )
        child.inc()
        if reply.truncated:
            self.truncated.inc()
        elif reply.service is not None:
            answers = self._answers.get(reply.service)
            if answers is None:
                # Services come and go; the number of label sets is bounded by the registry's.
                answers = self._answers[reply.service] = self.answers.labels(reply.service)
            answers.inc()
