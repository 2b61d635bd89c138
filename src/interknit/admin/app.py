"""The node's aiohttp application: middlewares (errors, tokens, metrics), status page, health
and metrics, around the registry API."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from importlib import resources
from typing import Any

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry
from prometheus_client.exposition import generate_latest

from interknit.logs import LogThrottle
from interknit.registry.api import WATCHES_KEY, RegistryApi, dumps, error_response
from interknit.registry.http_metrics import HttpMetrics
from interknit.registry.state import RegistryError
from interknit.registry.tokens import Tokens

log = logging.getLogger("interknit.registry")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
# Panels: name -> a function returning JSON-able data for the status page.
Panels = dict[str, Callable[[], Any]]


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
    failures = LogThrottle()

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
            return error_response(exc.status, exc.message, exc.detail, exc.outcome)
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
        except Exception:
            # A bug, not the client's fault; still the API's JSON error, never aiohttp's page.
            status = 500
            if failures.allow(time.monotonic()) is not None:
                log.exception(
                    "API request %s %s failed",
                    request.method,
                    request.path,
                    extra={"event": "registry.internal_error", "endpoint": endpoint},
                )
            return error_response(500, "internal error")
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
