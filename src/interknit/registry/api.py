"""The registry's HTTP API (DESIGN.md, "HTTP API"), on aiohttp.

Lookups are served from memory; the JSON of a service's instance list is cached per
(service, filter) and rebuilt only when that service's revision moves, so a hot lookup costs a
dictionary read and a write to the socket.
"""

from __future__ import annotations

import asyncio
import json
import random
from typing import Any

from aiohttp import web

from interknit.durations import parse_duration
from interknit.registry.metrics import RegistryMetrics
from interknit.registry.model import Instance, InstanceSpec
from interknit.registry.registry import RegistryBackend
from interknit.registry.schema import (
    DEFAULT_MIN_CHECK_INTERVAL,
    MAX_BODY,
    HealthBody,
    check_interval,
    check_name,
    parse_body,
    register_spec,
)
from interknit.registry.state import NotFound, RegistryError

MAX_WAIT = 300.0
DEFAULT_WAIT = 300.0
KEEPALIVE_EVERY = 15.0
WATCHES_KEY = web.AppKey("watches", set[asyncio.Task[Any]])


def dumps(value: Any) -> bytes:
    return json.dumps(value, separators=(",", ":")).encode()


def revision_headers(registry: RegistryBackend) -> dict[str, str]:
    headers = {"X-Interknit-Revision": str(registry.state.revision)}
    if registry.stale:
        headers["X-Interknit-Stale"] = "1"
    return headers


def json_response(registry: RegistryBackend, body: bytes, status: int = 200) -> web.Response:
    return web.Response(
        body=body,
        status=status,
        content_type="application/json",
        headers=revision_headers(registry),
    )


def error_response(
    status: int, message: str, detail: Any = None, outcome: str | None = None
) -> web.Response:
    return web.Response(
        body=error_body(message, detail, outcome),
        status=status,
        content_type="application/json",
    )


async def read_body(request: web.Request) -> bytes:
    """The request's body, refusing more than MAX_BODY bytes before reading them."""
    length = request.content_length
    if length is not None and length > MAX_BODY:
        raise web.HTTPRequestEntityTooLarge(max_size=MAX_BODY, actual_size=length)
    # The application's client_max_size (MAX_BODY) bounds a chunked body as it is read.
    return await request.read()


def deregistered_body(service: str, instance_id: str, revision: int) -> bytes:
    return dumps({"service": service, "id": instance_id, "revision": revision})


def error_body(message: str, detail: Any = None, outcome: str | None = None) -> bytes:
    """The API's error; a write the store could not take (503) says what became of it."""
    if outcome is None:
        return dumps({"error": message, "detail": detail})
    return dumps({"error": message, "detail": detail, "outcome": outcome})


def registry_error_body(exc: RegistryError) -> bytes:
    return error_body(exc.message, exc.detail, exc.outcome)


def _flag(request: web.Request, name: str) -> bool:
    value = request.query.get(name)
    if value is None:
        return False
    if value in ("", "1", "true", "yes"):
        return True
    if value in ("0", "false", "no"):
        return False
    raise RegistryError(f"{name}: must be 1 or 0", [{"field": name}])


def revision_number(name: str, value: str) -> int:
    """A revision as a client writes it: ASCII digits only (``str.isdigit`` also takes
    superscripts and other scripts' digits, which ``int`` then refuses or reads)."""
    if not value.isascii() or not value.isdigit() or len(value) > 19:
        raise RegistryError(f"{name}: must be a non-negative integer", [{"field": name}])
    return int(value)


def _int_param(request: web.Request, name: str) -> int | None:
    value = request.query.get(name)
    return None if value is None else revision_number(name, value)


def _wait_param(request: web.Request) -> float:
    raw = request.query.get("wait")
    if raw is None:
        wait = DEFAULT_WAIT
    else:
        try:
            wait = parse_duration(raw)
        except ValueError as exc:
            raise RegistryError(f"wait: {exc}", [{"field": "wait"}]) from None
    wait = min(wait, MAX_WAIT)
    # A little jitter, as Consul does, so that many clients that started together do not all
    # come back in the same instant.
    return wait + random.uniform(0, wait / 16)


class RegistryApi:
    def __init__(
        self,
        registry: RegistryBackend,
        metrics: RegistryMetrics | None = None,
        min_check_interval: float = DEFAULT_MIN_CHECK_INTERVAL,
    ) -> None:
        self.registry = registry
        self.metrics = metrics
        self.min_check_interval = min_check_interval
        self._cache: dict[tuple[str, bool, str | None], tuple[int, bytes]] = {}

    def add_routes(self, app: web.Application) -> None:
        base = "/v1/services/{service}/instances/{id}"
        app.router.add_get("/v1/services", self.list_services)
        app.router.add_get("/v1/services/{service}", self.list_instances)
        app.router.add_put(base, self.register)
        app.router.add_delete(base, self.deregister)
        app.router.add_get(base, self.get_instance)
        app.router.add_put(base + "/heartbeat", self.heartbeat)
        app.router.add_put(base + "/health", self.set_health)
        app.router.add_get("/v1/watch", self.watch)

    # ------------------------------------------------------------------ reads

    async def list_services(self, request: web.Request) -> web.Response:
        state = self.registry.state
        services = {
            name: {"instances": s.instances, "passing": s.passing}
            for name, s in state.services().items()
        }
        body = {"revision": state.revision, "stale": self.registry.stale, "services": services}
        return json_response(self.registry, dumps(body))

    async def list_instances(self, request: web.Request) -> web.Response:
        service = check_name("service", request.match_info["service"])
        healthy = _flag(request, "healthy")
        tag = request.query.get("tag")
        if tag is not None:
            check_name("tag", tag)
        index = _int_param(request, "index")
        registry = self.registry
        if index is not None:
            wait = _wait_param(request)
            if self.metrics is not None:
                gauge = self.metrics.watchers.labels("blocking")
                gauge.inc()
                try:
                    await registry.wait_for_change(service, index, wait)
                finally:
                    gauge.dec()
            else:
                await registry.wait_for_change(service, index, wait)
        return json_response(registry, self.lookup_body(service, healthy, tag, index is None))

    def lookup_body(
        self, service: str, healthy: bool, tag: str | None, must_exist: bool = True
    ) -> bytes:
        """A service's instances as the lookup answers them (NotFound for an unknown service
        unless a blocking query waits for it to appear)."""
        registry = self.registry
        state = registry.state
        if must_exist and not state.has_service(service):
            raise NotFound(f"service {service!r} is not registered", {"service": service})
        items = self._instances_json(service, healthy, tag)
        stale = b"true" if registry.stale else b"false"
        return b'{"revision":%d,"stale":%s,"instances":%s}' % (state.revision, stale, items)

    def _instances_json(self, service: str, healthy: bool, tag: str | None) -> bytes:
        state = self.registry.state
        rev = state.service_revision(service)
        key = (service, healthy, tag)
        cached = self._cache.get(key)
        if cached is not None and cached[0] == rev:
            return cached[1]
        instances = state.instances(service)
        if healthy:
            instances = [i for i in instances if i.passing]
        if tag is not None:
            instances = [i for i in instances if tag in i.tags]
        items = b"[" + b",".join([i.json_bytes() for i in instances]) + b"]"
        if len(self._cache) > 10_000:
            self._cache.clear()
        self._cache[key] = (rev, items)
        return items

    async def get_instance(self, request: web.Request) -> web.Response:
        inst = self._require(request)
        return json_response(self.registry, self.instance_body(inst))

    def _require(self, request: web.Request) -> Instance:
        service = check_name("service", request.match_info["service"])
        instance_id = check_name("id", request.match_info["id"])
        inst = self.registry.state.get(service, instance_id)
        if inst is None:
            raise NotFound(
                f"instance {instance_id!r} of service {service!r} is not registered",
                {"service": service, "id": instance_id},
            )
        return inst

    def instance_body(self, inst: Instance, revision: int | None = None) -> bytes:
        """The instance object with the registry's revision after the request."""
        rev = self.registry.state.revision if revision is None else revision
        return b'{"revision":%d,%s' % (rev, inst.json_bytes()[1:])

    # ------------------------------------------------------------------ writes

    async def register(self, request: web.Request) -> web.Response:
        service = check_name("service", request.match_info["service"])
        instance_id = check_name("id", request.match_info["id"])
        spec = self.registration(await read_body(request))
        inst, revision = await self.registry.register(service, instance_id, spec)
        return json_response(self.registry, self.instance_body(inst, revision))

    def registration(self, body: bytes) -> InstanceSpec:
        """A registration body as the spec to register, by the API's rules and the node's."""
        spec = register_spec(body)
        check_interval(spec.check, self.min_check_interval)
        return spec

    async def deregister(self, request: web.Request) -> web.Response:
        service = check_name("service", request.match_info["service"])
        instance_id = check_name("id", request.match_info["id"])
        revision = await self.registry.deregister(service, instance_id)
        return json_response(self.registry, deregistered_body(service, instance_id, revision))

    async def heartbeat(self, request: web.Request) -> web.Response:
        service = check_name("service", request.match_info["service"])
        instance_id = check_name("id", request.match_info["id"])
        inst, revision = await self.registry.heartbeat(service, instance_id)
        return json_response(self.registry, self.instance_body(inst, revision))

    async def set_health(self, request: web.Request) -> web.Response:
        service = check_name("service", request.match_info["service"])
        instance_id = check_name("id", request.match_info["id"])
        body: HealthBody = parse_body(HealthBody, await read_body(request))
        inst, revision = await self.registry.set_operator(service, instance_id, body.status)
        return json_response(self.registry, self.instance_body(inst, revision))

    # ------------------------------------------------------------------ watch (SSE)

    async def watch(self, request: web.Request) -> web.StreamResponse:
        registry = self.registry
        service = request.query.get("service")
        if service is not None:
            check_name("service", service)
        since = _int_param(request, "since")
        last_id = request.headers.get("Last-Event-ID")
        if since is None and last_id:
            # What an EventSource sends back is an id this stream gave it: a revision.
            since = revision_number("Last-Event-ID", last_id.strip())
        response = web.StreamResponse(
            headers={
                "Content-Type": "text/event-stream",
                "Cache-Control": "no-cache",
                **revision_headers(registry),
            }
        )
        await response.prepare(request)
        watches = request.app[WATCHES_KEY]
        task = asyncio.current_task()
        assert task is not None
        watches.add(task)
        gauge = self.metrics.watchers.labels("watch") if self.metrics is not None else None
        if gauge is not None:
            gauge.inc()
        try:
            if since is None:
                since = await self._send_resync(response, service)
            while True:
                got = registry.state.events_since(since, service)
                if got is None:
                    since = await self._send_resync(response, service)
                    continue
                events, upto = got
                if events:
                    parts = []
                    for event in events:
                        parts.append(
                            b"id: %d\nevent: %s\ndata: " % (event.revision, event.type.encode())
                        )
                        parts.append(event.json_bytes())
                        parts.append(b"\n\n")
                    await response.write(b"".join(parts))
                since = upto
                if not await registry.wait_for_change(service, since, KEEPALIVE_EVERY):
                    await response.write(b": keepalive\n\n")
        except (ConnectionResetError, asyncio.CancelledError):
            pass
        finally:
            watches.discard(task)
            if gauge is not None:
                gauge.dec()
        return response

    async def _send_resync(self, response: web.StreamResponse, service: str | None) -> int:
        state = self.registry.state
        if service is None:
            instances = list(state.all_instances())
        else:
            instances = state.instances(service)
        items = b",".join([i.json_bytes() for i in instances])
        stale = b"true" if self.registry.stale else b"false"
        payload = (
            b'id: %d\nevent: resync\ndata: {"revision":%d,"stale":%s,"instances":[%s]}\n\n'
            % (
                state.revision,
                state.revision,
                stale,
                items,
            )
        )
        await response.write(payload)
        return state.revision
