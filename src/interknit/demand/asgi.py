"""Demand control for any ASGI application (Starlette, FastAPI): ``AdmissionMiddleware``.

Each HTTP request is admitted through a ``Gate`` (rate limits, concurrency limit and queue,
priorities, deadlines) before it reaches the application; refused requests get 503 (429 for rate
limits) with ``Retry-After``. The deadline and priority are left in ``scope["state"]`` (read as
``request.state.deadline`` in Starlette) so the application can pass the remaining time on. The
middleware also answers the load-aware health endpoint: 503 while the node sheds too much.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from prometheus_client import CollectorRegistry

from interknit.demand.asyncio_gate import Gate, Rejected
from interknit.demand.deadline import GRPC_TIMEOUT, X_REQUEST_TIMEOUT
from interknit.demand.http import X_PRIORITY, health, read_demand, refusal
from interknit.demand.overload import OverloadMonitor
from interknit.demand.settings import DemandSettings

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

_REQUEST_TIMEOUT = X_REQUEST_TIMEOUT.encode()
_GRPC_TIMEOUT = GRPC_TIMEOUT.encode()
_PRIORITY = X_PRIORITY.encode()
# Statuses by which an application says it could not do the work (counted as dropped).
_LOST = (503, 504)


class AdmissionMiddleware:
    """Wrap an ASGI app with demand control and a load-aware health endpoint."""

    def __init__(
        self,
        app: ASGIApp,
        *,
        gate: Gate | None = None,
        settings: DemandSettings | None = None,
        timeout: float | None = None,
        registry: CollectorRegistry | None = None,
        overload: OverloadMonitor | None = None,
        health_path: str | None = "/health",
        route: str = "app",
    ) -> None:
        self.app = app
        if gate is None:
            gate = Gate.for_app(
                settings, route=route, registry=registry, overload=overload, timeout=timeout
            )
        self.gate = gate
        self.health_path = health_path
        header = settings.client_header if settings is not None else None
        self._client_header = None if header is None else header.encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        gate = self.gate
        if scope["path"] == self.health_path:
            status, body = health(gate.overloaded())
            await _respond(send, status, [(b"content-type", b"application/json")], body)
            return

        request_timeout = grpc_timeout = priority_value = client_key = None
        client_header = self._client_header
        for name, value in scope["headers"]:
            if name == _REQUEST_TIMEOUT:
                request_timeout = value
            elif name == _GRPC_TIMEOUT:
                grpc_timeout = value
            elif name == _PRIORITY:
                priority_value = value
            elif name == client_header:
                client_key = value.decode("latin-1")
        if client_key is None and gate.client_rate is not None and client_header is None:
            client = scope.get("client")
            client_key = client[0] if client else None
        priority, deadline = read_demand(
            gate, gate.clock(), request_timeout, grpc_timeout, priority_value
        )
        try:
            permit = await gate.acquire(priority, deadline, client_key)
        except Rejected as rejected:
            status, headers, body = refusal(rejected)
            raw = [(k.encode(), v.encode()) for k, v in headers]
            await _respond(send, status, raw, body)
            return

        state = scope.setdefault("state", {})
        state["deadline"] = deadline
        state["priority"] = priority

        async def watch(message: Message) -> None:
            if message["type"] == "http.response.start" and message["status"] in _LOST:
                permit.dropped = True
            await send(message)

        try:
            await self.app(scope, receive, watch)
        except BaseException:
            permit.dropped = True
            raise
        finally:
            gate.release(permit)


async def _respond(
    send: Send, status: int, headers: list[tuple[bytes, bytes]], body: bytes
) -> None:
    if not any(k == b"content-length" for k, _ in headers):
        headers = [*headers, (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})
