"""Demand control for aiohttp applications: ``admission_middleware``.

The same gate as the ASGI middleware and the proxy: requests are admitted (or refused with 503,
429 for rate limits, and ``Retry-After``) before the handler runs, and the load-aware health
endpoint answers 503 while the node sheds too much. The request's deadline and priority are
left in ``request[DEADLINE]`` and ``request[PRIORITY]`` (typed request keys).
"""

from __future__ import annotations

from aiohttp import web
from aiohttp.typedefs import Handler, Middleware
from prometheus_client import CollectorRegistry

from interknit.demand.asyncio_gate import Gate, Rejected
from interknit.demand.deadline import GRPC_TIMEOUT, X_REQUEST_TIMEOUT
from interknit.demand.http import X_PRIORITY, health, read_demand, refusal
from interknit.demand.overload import OverloadMonitor
from interknit.demand.settings import DemandSettings

_LOST = (503, 504)

# The absolute deadline on the gate's clock (None without one), and the priority (0 critical).
DEADLINE: web.RequestKey[float | None] = web.RequestKey("interknit_deadline")
PRIORITY: web.RequestKey[int] = web.RequestKey("interknit_priority")


def admission_middleware(
    *,
    gate: Gate | None = None,
    settings: DemandSettings | None = None,
    timeout: float | None = None,
    registry: CollectorRegistry | None = None,
    overload: OverloadMonitor | None = None,
    health_path: str | None = "/health",
    route: str = "app",
) -> Middleware:
    """An aiohttp middleware; ``web.Application(middlewares=[admission_middleware(...)])``.

    The gate is reachable as the middleware's ``gate`` attribute.
    """
    if gate is None:
        gate = Gate.for_app(
            settings, route=route, registry=registry, overload=overload, timeout=timeout
        )
    the_gate = gate
    client_header = settings.client_header if settings is not None else None

    @web.middleware
    async def admission(request: web.Request, handler: Handler) -> web.StreamResponse:
        if request.path == health_path:
            status, body = health(the_gate.overloaded())
            return web.Response(status=status, body=body, content_type="application/json")
        headers = request.headers
        priority, deadline = read_demand(
            the_gate,
            the_gate.clock(),
            headers.get(X_REQUEST_TIMEOUT),
            headers.get(GRPC_TIMEOUT),
            headers.get(X_PRIORITY),
        )
        client_key: str | None = None
        if the_gate.client_rate is not None:
            client_key = headers.get(client_header) if client_header else request.remote
        try:
            permit = await the_gate.acquire(priority, deadline, client_key)
        except Rejected as rejected:
            status, extra, body = refusal(rejected)
            return web.Response(status=status, body=body, headers=dict(extra))
        request[DEADLINE] = deadline
        request[PRIORITY] = priority
        try:
            response = await handler(request)
        except web.HTTPException as exc:
            permit.dropped = exc.status in _LOST
            raise
        except BaseException:
            permit.dropped = True
            raise
        else:
            permit.dropped = response.status in _LOST
        finally:
            the_gate.release(permit)
        return response

    admission.gate = the_gate  # type: ignore[attr-defined]
    return admission
