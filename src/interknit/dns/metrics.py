"""The DNS server's Prometheus metrics.

Counting a query is on the UDP hot path, where a prometheus-client ``Counter.inc`` (a lock, a
method call per child) costs more than building the answer from cache. So the per-query counts
are plain integers in dicts, turned into counter families only when ``/metrics`` is scraped
(a custom collector). The rare events (rate limiting, drops) use ordinary counters.
"""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import CollectorRegistry, Counter
from prometheus_client.core import CounterMetricFamily, Metric
from prometheus_client.registry import Collector

from interknit.dns.wire import RCODE_NAMES, qtype_name
from interknit.dns.zone import Reply


class DnsMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        # (qtype, rcode, transport) -> queries; types past 255 share one key, so a client
        # cannot grow the dict at will.
        self.queries: dict[tuple[int, int, str], int] = {}
        # Services come and go; the number of keys is bounded by the registry's services.
        self.answers: dict[str, int] = {}
        self.truncated = 0
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
        self.tcp_refused = Counter(
            "interknit_dns_tcp_refused",
            "TCP connections closed at once: the client already held max_tcp_per_client, "
            "or the server max_tcp_connections.",
            ["reason"],
            registry=registry,
        )
        for action in ("drop", "slip"):
            self.rate_limited.labels(action)
        for reason in ("per-client", "total"):
            self.tcp_refused.labels(reason)
        registry.register(_Collector(self))

    def observe(self, reply: Reply, transport: str) -> None:
        key = (
            reply.udp_key
            if transport == "udp"
            else (reply.qtype if reply.qtype < 256 else 256, reply.rcode, transport)
        )
        queries = self.queries
        queries[key] = queries.get(key, 0) + 1
        if reply.truncated:
            self.truncated += 1
        else:
            service = reply.service
            if service is not None:
                answers = self.answers
                answers[service] = answers.get(service, 0) + 1

    def query_count(self, qtype: str, rcode: str, transport: str) -> int:
        """Queries counted under these label values (what ``/metrics`` shows)."""
        total = 0
        for (t, r, tr), n in list(self.queries.items()):
            if (qtype_name(t), RCODE_NAMES.get(r, str(r)), tr) == (qtype, rcode, transport):
                total += n
        return total


class _Collector(Collector):
    def __init__(self, metrics: DnsMetrics) -> None:
        self.metrics = metrics

    def collect(self) -> Iterator[Metric]:
        m = self.metrics
        queries = CounterMetricFamily(
            "interknit_dns_queries",
            "DNS queries answered, by query type and response code.",
            labels=["qtype", "rcode", "transport"],
        )
        # Several raw types map to the label "other": sum them into one series.
        summed: dict[tuple[str, str, str], int] = {}
        for (qtype, rcode, transport), n in list(m.queries.items()):
            labels = (qtype_name(qtype), RCODE_NAMES.get(rcode, str(rcode)), transport)
            summed[labels] = summed.get(labels, 0) + n
        for labels, n in summed.items():
            queries.add_metric(list(labels), n)
        yield queries
        answers = CounterMetricFamily(
            "interknit_dns_answers", "Positive DNS answers, by service.", labels=["service"]
        )
        for service, n in list(m.answers.items()):
            answers.add_metric([service], n)
        yield answers
        yield CounterMetricFamily(
            "interknit_dns_truncated",
            "UDP replies sent empty with TC set because the answer did not fit (or RRL slipped).",
            value=m.truncated,
        )
