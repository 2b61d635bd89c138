"""Demand control: refuse work at the edge before response time provokes retries.

Sans-IO cores (``limits``, ``queue``, ``limiter``, ``rate``, ``deadline``, ``overload``) decide;
``asyncio_gate.Gate`` waits and wakes; ``asgi`` and ``aiohttp`` put the same gate in front of
applications. The middlewares are imported from their own modules so that importing this
package does not pull in a web framework.
"""

from interknit.demand.asyncio_gate import Gate, Permit, Rejected
from interknit.demand.deadline import (
    ServiceTimes,
    format_remaining,
    parse_grpc_timeout,
    parse_request_timeout,
    request_deadline,
)
from interknit.demand.limiter import ADMIT, Limiter, Reject
from interknit.demand.limits import AimdLimit, FixedLimit, GradientLimit, Limit
from interknit.demand.metrics import DemandMetrics, RouteMetrics
from interknit.demand.overload import OverloadMonitor
from interknit.demand.queue import (
    CRITICAL,
    DEFAULT,
    SHEDDABLE,
    AdaptiveQueue,
    Entry,
    parse_priority,
)
from interknit.demand.rate import KeyedRateLimiter, TokenBucket, parse_rate
from interknit.demand.route import DemandAdmissions, RouteAdmission, Ticket
from interknit.demand.settings import DemandSettings

__all__ = [
    "ADMIT",
    "CRITICAL",
    "DEFAULT",
    "SHEDDABLE",
    "AdaptiveQueue",
    "AimdLimit",
    "DemandAdmissions",
    "DemandMetrics",
    "DemandSettings",
    "Entry",
    "FixedLimit",
    "Gate",
    "GradientLimit",
    "KeyedRateLimiter",
    "Limit",
    "Limiter",
    "OverloadMonitor",
    "Permit",
    "Reject",
    "Rejected",
    "RouteAdmission",
    "RouteMetrics",
    "ServiceTimes",
    "Ticket",
    "TokenBucket",
    "format_remaining",
    "parse_grpc_timeout",
    "parse_priority",
    "parse_rate",
    "parse_request_timeout",
    "request_deadline",
]
