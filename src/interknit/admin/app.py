"""The node's aiohttp application: middlewares (errors, tokens, metrics), status page, health
and metrics, around the registry API."""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import time
from collections.abc import Awaitable, Callable
from importlib import resources
from typing import Any

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry
from prometheus_client.exposition import generate_latest

from interknit.plainmetrics import Collector, Family, Histogram, Value
from interknit.registry.api import WATCHES_KEY, RegistryApi, dumps, error_response
from interknit.registry.state import RegistryError

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
# Panels: name -> a function returning JSON-able data for the status page.
Panels = dict[str, Callable[[], Any]]
READ_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
OPEN_PATHS = frozenset({"/", "/v1/health", "/favicon.ico"})


class Tokens:
    """Bearer tokens: writes need a write token once any is configured; reads need a read (or
    write) token once any read token is configured."""

    def __init__(self, read: list[str], write: list[str]) -> None:
        self.read = [t.encode() for t in read]
        self.write = [t.encode() for t in write]

    @staticmethod
    def _known(token: bytes, tokens: list[bytes]) -> bool:
        # Compare against every token, so the time taken does not tell which one nearly matched.
        found = False
        for candidate in tokens:
            found |= hmac.compare_digest(token, candidate)
        return found

    @property
    def enabled(self) -> bool:
        return bool(self.read or self.write)

    def check(self, request: web.Request) -> web.Response | None:
        authorization = request.headers.get("Authorization", "")
        if not authorization:
            # Consul's clients send the same tokens as X-Consul-Token or ?token=.
            token = request.headers.get("X-Consul-Token") or request.query.get("token")
            if token:
                authorization = f"Bearer {token}"
        denied = self.deny(request.path, request.method, authorization)
        return None if denied is None else error_response(*denied)

    def deny(self, path: str, method: str, authorization: str) -> tuple[int, str] | None:
        """The status and message that refuse this request, or None to let it through."""
        if path in OPEN_PATHS:
            return None
        header = authorization
        token = header[7:].strip().encode() if header[:7].lower() == "bearer " else b""
        if method in READ_METHODS:
            if not self.read or self._known(token, self.read) or self._known(token, self.write):
                return None
            if not token:
                return 401, "a read token is required (Authorization: Bearer)"
            return 401, "the token is not valid"
        if not self.write:
            return None
        if self._known(token, self.write):
            return None
        if token and self._known(token, self.read):
            return 403, "a read token cannot write; use a write token"
        if not token:
            return 401, "a write token is required (Authorization: Bearer)"
        return 401, "the token is not valid"


class HttpMetrics:
    """API request counts and latencies, as plain numbers folded into families at scrape time
    (prometheus-client's children cost a lock and a few calls per request)."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.requests = Family(
            "counter",
            "interknit_http_requests",
            "API requests by endpoint, method and status code.",
            ["endpoint", "method", "code"],
        )
        self.latency = Family(
            "histogram",
            "interknit_http_request_duration_seconds",
            "API request latency by endpoint (blocking queries and watches excluded).",
            ["endpoint"],
            buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0),
        )
        registry.register(Collector([self.requests, self.latency]))
        # Each (endpoint, method, status)'s two children, found with one lookup per request.
        self._children: dict[tuple[str, str, int], tuple[Value, Histogram]] = {}

    def observe(self, endpoint: str, method: str, status: int, seconds: float | None) -> None:
        """Count one request; ``seconds`` None leaves the latency out (it waited on purpose)."""
        key = (endpoint, method, status)
        children = self._children.get(key)
        if children is None:
            children = (
                self.requests.labels(endpoint, method, str(status)),
                self.latency.labels(endpoint),
            )
            self._children[key] = children
        children[0].inc()
        if seconds is not None:
            children[1].observe(seconds)


def _endpoint(request: web.Request) -> str:
    route = request.match_info.route
    resource = route.resource
    return resource.canonical if resource is not None else "unmatched"


def build_app(
    api: RegistryApi,
    metrics_registry: CollectorRegistry,
    tokens: Tokens,
    node_info: Callable[[], dict[str, Any]],
    panels: Panels,
    ready: Callable[[], tuple[bool, str]],
    http_metrics: HttpMetrics | None = None,
) -> web.Application:
    """The node's application; ``http_metrics`` is shared with the API's fast path, if any."""
    if http_metrics is None:
        http_metrics = HttpMetrics(metrics_registry)
    counted = http_metrics

    @web.middleware
    async def errors(request: web.Request, handler: Handler) -> web.StreamResponse:
        started = time.perf_counter()
        endpoint = _endpoint(request)
        status = 500
        try:
            denied = tokens.check(request) if tokens.enabled else None
            if denied is not None:
                status = denied.status
                return denied
            response = await handler(request)
            status = response.status
            return response
        except RegistryError as exc:
            status = exc.status
            return error_response(exc.status, exc.message, exc.detail)
        except web.HTTPRequestEntityTooLarge:
            status = 413
            return error_response(413, "body: larger than 64 KiB")
        except web.HTTPException as exc:
            status = exc.status
            if exc.status < 400:
                raise
            message = exc.reason
            if exc.status == 405:
                message = f"method {request.method} is not allowed on {request.path}"
            elif exc.status == 404:
                message = f"no such endpoint: {request.path}"
            return error_response(exc.status, message)
        finally:
            waited = endpoint == "/v1/watch" or (
                bool(request.query_string) and "index" in request.query
            )
            seconds = None if waited else time.perf_counter() - started
            counted.observe(endpoint, request.method, status, seconds)

    app = web.Application(middlewares=[errors], client_max_size=64 * 1024)
    app[WATCHES_KEY] = set()
    api.add_routes(app)

    async def health(request: web.Request) -> web.Response:
        ok, reason = ready()
        body = {"status": "ready" if ok else reason, "node": node_info()}
        return web.Response(
            body=dumps(body), status=200 if ok else 503, content_type="application/json"
        )

    async def metrics(request: web.Request) -> web.Response:
        body = generate_latest(metrics_registry)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    page = resources.files("interknit.admin").joinpath("static/index.html").read_bytes()

    async def status_page(request: web.Request) -> web.Response:
        return web.Response(body=page, content_type="text/html", charset="utf-8")

    async def status(request: web.Request) -> web.Response:
        data = {"node": node_info(), "panels": {name: fn() for name, fn in panels.items()}}
        return web.Response(body=dumps(data), content_type="application/json")

    app.router.add_get("/", status_page)
    app.router.add_get("/v1/health", health)
    app.router.add_get("/v1/status", status)
    app.router.add_get("/metrics", metrics)

    async def close_watches(app: web.Application) -> None:
        # Watches never end by themselves; a graceful stop ends them so it does not wait.
        watches: set[asyncio.Task[Any]] = app[WATCHES_KEY]
        for task in list(watches):
            task.cancel()
        api.registry.wake_all()
        with contextlib.suppress(Exception):
            await asyncio.sleep(0)

    app.on_shutdown.append(close_watches)
    return app
