"""What the HTTP faces of demand control share: reading a request's demand headers and
writing a refusal. Used by the ASGI and aiohttp middlewares (and usable by the proxy)."""

from __future__ import annotations

import json

from interknit.demand.asyncio_gate import Gate, Rejected
from interknit.demand.deadline import request_deadline
from interknit.demand.queue import Priority, parse_priority

X_PRIORITY = "x-priority"

_MESSAGES = {
    "queue_full": "too many requests are waiting",
    "queue_timeout": "waited too long for capacity",
    "deadline": "the request's deadline cannot be met",
    "rate": "rate limit exceeded",
    "priority": "shedding low-priority requests under load",
    "connections": "too many connections",
}


def read_demand(
    gate: Gate,
    now: float,
    request_timeout: str | bytes | None,
    grpc_timeout: str | bytes | None,
    priority: str | bytes | None,
) -> tuple[Priority, float | None]:
    """A request's priority (header, else the route's) and absolute deadline (headers, else
    the route's timeout). Unreadable headers are ignored."""
    level = parse_priority(priority)
    deadline = request_deadline(now, request_timeout, grpc_timeout, gate.timeout)
    return (gate.priority if level is None else level), deadline


def refusal(rejected: Rejected) -> tuple[int, list[tuple[str, str]], bytes]:
    """Status, headers and JSON body (the API's error shape) for a refused request."""
    body = json.dumps(
        {
            "error": _MESSAGES.get(rejected.reason, "overloaded"),
            "detail": {"reason": rejected.reason, "retry_after": rejected.retry_after},
        }
    ).encode()
    headers = [
        ("retry-after", rejected.retry_header),
        ("content-type", "application/json"),
        ("content-length", str(len(body))),
    ]
    return rejected.status, headers, body


def health(overloaded: bool) -> tuple[int, bytes]:
    """Status and JSON body of the load-aware health endpoint."""
    if overloaded:
        return 503, b'{"status": "overloaded"}'
    return 200, b'{"status": "ok"}'
