"""Consul's HTTP API subset and Prometheus http_sd, on the registry's listener (aiohttp).

A translation layer: every read is answered from the registry's in-memory state, every write
goes through the registry's own write path (``RegistryBackend``), and blocking queries wait on
the registry's per-service change notification, exactly as interknit's own blocking lookups
do, so a blocked Consul watcher costs one future and one timer. Bodies are cached per
(endpoint, query shape) and rebuilt only when the revision they were built at moves, so two
thousand watchers woken by one change share one JSON encoding.

X-Consul-Index is the registry's revision: for one service, the last revision that touched it
(which rises when its last instance is deleted, since the registry keeps that number); for
lists of everything, the registry's revision. It is never 0 (Consul clients treat 0 as "no
index"): before anything has happened it is 1.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import random
import time
from collections.abc import Callable
from typing import Any

from aiohttp import web

from interknit import __version__
from interknit.compat.ids import ConsulIds
from interknit.compat.names import Identity, Untranslatable, identity, service_label
from interknit.compat.query import Query, parse_query
from interknit.compat.register import (
    CHECK_STATUSES,
    Registration,
    fields,
    load,
    parse_registration,
)
from interknit.compat.register import fail as body_fail
from interknit.compat.settings import CompatSection
from interknit.compat.views import (
    CATALOG_SCHEMA,
    CHECK_SCHEMA,
    HEALTH_SCHEMA,
    NODE_SCHEMA,
    SERVICE_SCHEMA,
    ConsulView,
    node_id,
    passing,
)
from interknit.registry.api import read_body
from interknit.registry.metrics import RegistryMetrics
from interknit.registry.model import CheckStatus, Event, Instance
from interknit.registry.registry import Registry, RegistryBackend, Unavailable
from interknit.registry.state import Conflict, NotFound, RegistryError, RegistryState

log = logging.getLogger("interknit.compat")

# What agent/self says this agent is; clients that check versions see a current Consul.
CONSUL_VERSION = "1.17.0"
MAX_CACHED = 4096
# The blocking key of a name that can never be a service: woken only at shutdown.
_NOWHERE = "-"
_STATES = ("any", *CHECK_STATUSES)
_UPDATE_FIELDS = {"status": "Status", "output": "Output"}

Op = Callable[[float], tuple[Any, list[Event]]]


def dumps(value: Any) -> bytes:
    return json.dumps(value, separators=(",", ":")).encode()


def _settle(fut: asyncio.Future[None], error: BaseException | None) -> None:
    if fut.done():
        return
    if error is None:
        fut.set_result(None)
    else:
        fut.set_exception(error)


class ConsulApi:
    def __init__(
        self,
        registry: RegistryBackend,
        settings: CompatSection,
        *,
        node_name: str,
        node_address: str,
        api_port: int,
        metrics: RegistryMetrics | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.registry = registry
        self.settings = settings
        self.api_port = api_port
        self.metrics = metrics
        self._clock = clock
        # On etcd every node sees every instance; "the agent's" services are the ones this
        # node owns, and the node an instance is on is its owner.
        owner_of = getattr(registry.state, "owner", None)
        owner = (lambda i: owner_of(i.service, i.id)) if callable(owner_of) else None
        owns = getattr(registry, "owns", None)
        self._owns: Callable[[str, str], bool] = owns if callable(owns) else lambda s, i: True
        self.view = ConsulView(
            settings.datacenter, node_name, node_address, dict(settings.node_meta), owner
        )
        self.ids = ConsulIds()
        self.ids.rebuild(registry.state.all_instances())
        registry.subscribe(self.ids.apply, self._resynced)
        self._bodies: dict[tuple[object, ...], tuple[int, bytes]] = {}
        self._live_at = clock()
        self._gauge = None if metrics is None else metrics.watchers.labels("consul")

    def _resynced(self) -> None:
        # The state was replaced wholesale (a reload may even move revisions back): nothing
        # cached by revision can be trusted.
        self._bodies.clear()
        self.ids.rebuild(self.registry.state.all_instances())

    def add_routes(self, app: web.Application) -> None:
        add_get, add_put = app.router.add_get, app.router.add_put
        add_get("/v1/agent/self", self.agent_self)
        add_get("/v1/agent/services", self.agent_services)
        add_get("/v1/status/leader", self.status_leader)
        add_get("/v1/status/peers", self.status_peers)
        add_get("/v1/catalog/datacenters", self.catalog_datacenters)
        add_get("/v1/catalog/services", self.catalog_services)
        add_get("/v1/catalog/service/{name}", self.catalog_service)
        add_get("/v1/catalog/nodes", self.catalog_nodes)
        add_get("/v1/health/service/{name}", self.health_service)
        add_get("/v1/health/state/{state}", self.health_state)
        add_put("/v1/agent/service/register", self.register)
        add_put("/v1/agent/service/deregister/{id:.+}", self.deregister)
        add_put("/v1/agent/service/maintenance/{id:.+}", self.maintenance)
        add_put("/v1/agent/check/update/{id:.+}", self.check_update)
        add_put("/v1/agent/check/{verb:pass|warn|fail}/{id:.+}", self.check_ttl)
        add_get("/v1/prometheus/targets", self.prometheus_targets)

    # ------------------------------------------------------------------ plumbing

    @property
    def state(self) -> RegistryState:
        return self.registry.state

    def _query(self, request: web.Request, **options: Any) -> Query:
        return parse_query(request.query.items(), datacenter=self.settings.datacenter, **options)

    def _index(self, service: str | None) -> int:
        state = self.state
        revision = state.revision if service is None else state.service_revision(service)
        return max(1, revision)

    async def _block(self, service: str | None, query: Query) -> None:
        """Consul's blocking query: wait while the index has not passed ``query.index``, at
        most ``wait`` plus up to wait/16 of jitter (so that watchers that started together do
        not all come back together)."""
        if query.consistent and self.registry.stale:
            raise Unavailable(
                "consistent: the registry cannot reach its store now; ask with ?stale for "
                "the node's last known state"
            )
        if query.index == 0 or self.registry.changed_since(service, query.index):
            return
        wait = query.wait + random.uniform(0, query.wait / 16)
        if self._gauge is not None:
            self._gauge.inc()
        try:
            await self.registry.wait_for_change(service, query.index, wait)
        finally:
            if self._gauge is not None:
                self._gauge.dec()

    def _headers(self, index: int, query: Query) -> dict[str, str]:
        now = self._clock()
        stale = self.registry.stale
        if not stale:
            self._live_at = now
        since = 0 if not stale else int((now - self._live_at) * 1000)
        if query.stale or stale:
            consistency = "stale"
        elif query.consistent:
            consistency = "consistent"
        else:
            consistency = "leader"
        headers = {
            "X-Consul-Index": str(index),
            "X-Consul-KnownLeader": "false" if stale else "true",
            "X-Consul-LastContact": str(since),
            "X-Consul-Effective-Consistency": consistency,
        }
        if query.cached:
            headers["X-Cache"] = "HIT"
            headers["Age"] = str(since // 1000)
        return headers

    def _respond(self, body: bytes, index: int, query: Query) -> web.Response:
        return web.Response(
            body=body, content_type="application/json", headers=self._headers(index, query)
        )

    def _cached(self, key: tuple[object, ...], revision: int, build: Callable[[], Any]) -> bytes:
        hit = self._bodies.get(key)
        if hit is not None and hit[0] == revision:
            return hit[1]
        body = dumps(build())
        if len(self._bodies) >= MAX_CACHED:
            self._bodies.clear()
        self._bodies[key] = (revision, body)
        return body

    def _node_meta_ok(self, inst: Instance, query: Query) -> bool:
        if not query.node_meta:
            return True
        meta = self.view.node_of(inst)["Meta"]
        return all(meta.get(key) == value for key, value in query.node_meta)

    @staticmethod
    def _tags_ok(inst: Instance, query: Query) -> bool:
        # Consul matches tags without regard to case, and every tag asked for must be there.
        if not query.tags:
            return True
        have = {t.lower() for t in inst.spec.tags}
        return all(t.lower() in have for t in query.tags)

    def _service(self, name: str) -> str | None:
        """The label of a service name, or None for a name no service can have."""
        try:
            return service_label(name)
        except Untranslatable:
            return None

    def _service_rows(self, name: str, query: Query) -> list[tuple[Instance, Identity, str]]:
        """The instances of a Consul service that the query's tags and node meta allow, in
        Consul's order; a name is matched without regard to case, as Consul's catalog does."""
        label = self._service(name)
        if label is None:
            return []
        wanted = name.lower()
        rows = self.view.ordered(self.state.instances(label))
        return [
            (inst, ident, node)
            for inst, ident, node in rows
            if ident.name.lower() == wanted
            and self._tags_ok(inst, query)
            and self._node_meta_ok(inst, query)
        ]

    # ------------------------------------------------------------------ agent and status

    async def agent_self(self, request: web.Request) -> web.Response:
        query = self._query(request)
        view = self.view
        config = {
            "Datacenter": view.datacenter,
            "PrimaryDatacenter": view.datacenter,
            "NodeName": view.node_name,
            "NodeID": node_id(view.node_name),
            "Server": True,
            "Revision": "interknit",
            "Version": CONSUL_VERSION,
            "Interknit": __version__,
        }
        member = {
            "Name": view.node_name,
            "Addr": view.node_address,
            "Port": self.api_port,
            "Tags": {"dc": view.datacenter, "id": config["NodeID"], "role": "consul"},
            "Status": 1,
        }
        body = {"Config": config, "Member": member, "Meta": view.node_meta, "Stats": {}}
        return self._respond(dumps(body), self._index(None), query)

    def _leader(self) -> str:
        if self.registry.stale:
            return ""
        address = self.view.node_address
        host = f"[{address}]" if ":" in address else address
        return f"{host}:{self.api_port}"

    async def status_leader(self, request: web.Request) -> web.Response:
        query = self._query(request)
        return self._respond(dumps(self._leader()), self._index(None), query)

    async def status_peers(self, request: web.Request) -> web.Response:
        query = self._query(request)
        leader = self._leader()
        return self._respond(dumps([leader] if leader else []), self._index(None), query)

    async def agent_services(self, request: web.Request) -> web.Response:
        query = self._query(request, schema=SERVICE_SCHEMA)
        await self._block(None, query)
        state = self.state

        def build() -> dict[str, Any]:
            out: dict[str, Any] = {}
            for inst in state.all_instances():
                if not self._owns(inst.service, inst.id):
                    continue
                ident = identity(inst)
                row = self.view.agent_service(inst, ident)
                if query.filter is None or query.filter.test(row):
                    out[ident.id] = row
            return out

        body = self._cached(("agent/services", query.shape), state.revision, build)
        return self._respond(body, self._index(None), query)

    # ------------------------------------------------------------------ catalog

    async def catalog_datacenters(self, request: web.Request) -> web.Response:
        query = self._query(request)
        return self._respond(dumps([self.view.datacenter]), self._index(None), query)

    async def catalog_services(self, request: web.Request) -> web.Response:
        query = self._query(request, schema=CATALOG_SCHEMA)
        await self._block(None, query)
        state = self.state

        def build() -> dict[str, list[str]]:
            tags: dict[str, set[str]] = {}
            for inst in state.all_instances():
                if not self._node_meta_ok(inst, query):
                    continue
                ident = identity(inst)
                if query.filter is not None and not query.filter.test(
                    self.view.catalog_row(inst, ident)
                ):
                    continue
                tags.setdefault(ident.name, set()).update(inst.spec.tags)
            return {name: sorted(tags[name]) for name in sorted(tags)}

        body = self._cached(("catalog/services", query.shape), state.revision, build)
        return self._respond(body, self._index(None), query)

    async def catalog_service(self, request: web.Request) -> web.Response:
        name = request.match_info["name"]
        query = self._query(request, schema=CATALOG_SCHEMA, tags=True)
        label = self._service(name)
        await self._block(label or _NOWHERE, query)

        def build() -> list[dict[str, Any]]:
            rows = [
                self.view.catalog_row(i, ident) for i, ident, _ in self._service_rows(name, query)
            ]
            if query.filter is not None:
                rows = [r for r in rows if query.filter.test(r)]
            return rows

        index = self._index(label) if label is not None else 1
        body = self._cached(("catalog/service", name, query.shape), index, build)
        return self._respond(body, index, query)

    async def catalog_nodes(self, request: web.Request) -> web.Response:
        query = self._query(request, schema=NODE_SCHEMA)
        await self._block(None, query)
        state = self.state

        def build() -> list[dict[str, Any]]:
            nodes = self.view.nodes(list(state.all_instances()))
            if query.node_meta:
                nodes = [n for n in nodes if all(n["Meta"].get(k) == v for k, v in query.node_meta)]
            if query.filter is not None:
                nodes = [n for n in nodes if query.filter.test(n)]
            return nodes

        body = self._cached(("catalog/nodes", query.shape), state.revision, build)
        return self._respond(body, self._index(None), query)

    # ------------------------------------------------------------------ health

    async def health_service(self, request: web.Request) -> web.Response:
        name = request.match_info["name"]
        query = self._query(request, schema=HEALTH_SCHEMA, tags=True, passing=True)
        label = self._service(name)
        await self._block(label or _NOWHERE, query)

        def build() -> list[dict[str, Any]]:
            rows = []
            for inst, ident, node in self._service_rows(name, query):
                if query.passing and not passing(inst):
                    continue
                row = self.view.health_entry(inst, ident, node)
                if query.filter is None or query.filter.test(row):
                    rows.append(row)
            return rows

        index = self._index(label) if label is not None else 1
        body = self._cached(("health/service", name, query.shape), index, build)
        return self._respond(body, index, query)

    async def health_state(self, request: web.Request) -> web.Response:
        wanted = request.match_info["state"]
        if wanted not in _STATES:
            raise RegistryError(
                "state: must be any, passing, warning or critical", [{"field": "state"}]
            )
        query = self._query(request, schema=CHECK_SCHEMA, tags=True)
        await self._block(None, query)
        state = self.state

        def build() -> list[dict[str, Any]]:
            instances = list(state.all_instances())
            checks: list[dict[str, Any]] = []
            if not query.tags:  # node checks have no tags: a tag filter leaves them out
                for row in self.view.nodes(instances):
                    if all(row["Meta"].get(k) == v for k, v in query.node_meta):
                        checks.append(self.view.node_check(row["Node"]))
            for inst, ident, node in self.view.ordered(instances):
                if self._tags_ok(inst, query) and self._node_meta_ok(inst, query):
                    checks.extend(self.view.service_checks(inst, ident, node))
            if wanted != "any":
                checks = [c for c in checks if c["Status"] == wanted]
            if query.filter is not None:
                checks = [c for c in checks if query.filter.test(c)]
            checks.sort(key=lambda c: (c["Node"], c["CheckID"]))
            return checks

        body = self._cached(("health/state", wanted, query.shape), state.revision, build)
        return self._respond(body, self._index(None), query)

    # ------------------------------------------------------------------ Prometheus

    async def prometheus_targets(self, request: web.Request) -> web.Response:
        """Prometheus' http_sd: every instance (or those of ``?service=``, repeatable; only
        passing ones with ``?passing``), one target group each, the whole list every time."""
        services = tuple(sorted(set(request.query.getall("service", []))))
        only_passing = "passing" in request.query
        state = self.state

        def build() -> list[dict[str, Any]]:
            groups = []
            names = services or state.service_names()
            for name in names:
                for inst in state.instances(name):
                    if only_passing and not passing(inst):
                        continue
                    groups.append(self.view.target_group(inst))
            return groups

        body = self._cached(("prometheus", services, only_passing), state.revision, build)
        return web.Response(body=body, content_type="application/json")

    # ------------------------------------------------------------------ writes

    def _write_query(self, request: web.Request) -> Query:
        # dc is checked; ns, partition and the rest are accepted and ignored, as on reads.
        return self._query(request)

    async def _submit(self, registry: Registry, op: Op) -> None:
        """Run ``op`` through the embedded registry's own write path: one commit for all the
        events it makes, so no reader sees the state between them."""
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        _, queued = registry.write(op, lambda error: _settle(fut, error))
        if queued:
            await fut

    async def _register(self, reg: Registration) -> None:
        registry = self.registry
        service, instance_id, spec = reg.service, reg.instance_id, reg.spec
        initial = reg.initial
        if isinstance(registry, Registry):
            state = registry.state

            def op(now: float) -> tuple[Any, list[Event]]:
                before = state.get(service, instance_id)
                events = state.register(service, instance_id, spec, now)
                # A new TTL check (not an unchanged one re-registered) starts as Consul's do.
                if (
                    initial is not None
                    and events
                    and (before is None or before.spec.check != spec.check)
                ):
                    events += state.set_check_status(service, instance_id, initial, "", now)
                return None, events

            await self._submit(registry, op)
            return
        # On etcd the two writes go one after the other: between them, for an instant, a
        # new TTL instance reads as passing (docs/compat.md).
        before = registry.state.get(service, instance_id)
        await registry.register(service, instance_id, spec)
        if initial is not None and (before is None or before.spec.check != spec.check):
            await registry.set_check_status(service, instance_id, initial, "")

    def _check_free(self, reg: Registration) -> None:
        """One Consul name per service label, and one Consul ID per instance label."""
        for inst in self.state.instances(reg.service):
            ident = identity(inst)
            if inst.id == reg.instance_id and ident.id != reg.consul_id:
                raise Conflict(
                    f"ID: {reg.consul_id!r} would be kept as {reg.instance_id!r}, which "
                    f"instance {ident.id!r} of {ident.name!r} already is",
                    [{"field": "ID"}],
                )
            if inst.id != reg.instance_id and ident.name != reg.consul_name:
                raise Conflict(
                    f"Name: {reg.consul_name!r} would be kept as {reg.service!r}, which "
                    f"already holds the service {ident.name!r}",
                    [{"field": "Name"}],
                )

    async def register(self, request: web.Request) -> web.Response:
        self._write_query(request)
        reg = parse_registration(await read_body(request), self.view.node_address)
        self._check_free(reg)
        if reg.dropped_checks:
            log.warning(
                "registration kept one check of several",
                extra={
                    "event": "compat.checks_dropped",
                    "service": reg.service,
                    "instance": reg.instance_id,
                    "dropped": list(reg.dropped_checks),
                },
            )
        # Consul's agent holds one service per ID: the same ID under another name moves.
        moved = [
            i
            for i in self.ids.find(self.state, reg.consul_id)
            if i.key != (reg.service, reg.instance_id)
        ]
        await self._register(reg)
        for inst in moved:
            with contextlib.suppress(NotFound):
                await self.registry.deregister(inst.service, inst.id)
        return web.Response(text="")

    def _by_id(self, consul_id: str) -> list[Instance]:
        found = self.ids.find(self.state, consul_id, scan=True)
        if not found:
            raise NotFound(f"unknown service ID {consul_id!r}", {"id": consul_id})
        return found

    async def deregister(self, request: web.Request) -> web.Response:
        self._write_query(request)
        for inst in self._by_id(request.match_info["id"]):
            with contextlib.suppress(NotFound):
                await self.registry.deregister(inst.service, inst.id)
        return web.Response(text="")

    async def maintenance(self, request: web.Request) -> web.Response:
        self._write_query(request)
        enable = request.query.get("enable")
        if enable not in ("true", "false"):
            raise RegistryError("enable: must be true or false", [{"field": "enable"}])
        for inst in self._by_id(request.match_info["id"]):
            if enable == "true":
                await self.registry.set_operator(inst.service, inst.id, "maintenance")
            elif inst.operator == "maintenance":
                await self.registry.set_operator(inst.service, inst.id, "passing")
        return web.Response(text="")

    async def check_ttl(self, request: web.Request) -> web.Response:
        self._write_query(request)
        status: CheckStatus = {"pass": "passing", "warn": "warning", "fail": "critical"}[  # type: ignore[assignment]
            request.match_info["verb"]
        ]
        note = request.query.get("note", "")[:4096]
        await self._ttl(request.match_info["id"], status, note)
        return web.Response(text="")

    async def check_update(self, request: web.Request) -> web.Response:
        self._write_query(request)
        body = fields(load(await read_body(request)), "", _UPDATE_FIELDS)
        status = body.get("Status")
        if status not in CHECK_STATUSES:
            body_fail("Status", "must be passing, warning or critical")
        output = body.get("Output") or ""
        if not isinstance(output, str):
            body_fail("Output", "must be a string")
        await self._ttl(request.match_info["id"], status, output[:4096])
        return web.Response(text="")

    async def _ttl(self, check_id: str, status: CheckStatus, output: str) -> None:
        """Set a TTL check's status and restart its TTL, as Consul's pass/warn/fail do."""
        found = self.ids.find_check(self.state, check_id)
        if not found:
            raise NotFound(f"unknown check ID {check_id!r}", {"check": check_id})
        for inst in found:
            check = inst.spec.check
            if check is None or check.ttl is None:
                raise Conflict(
                    f"check {check_id!r} is not a TTL check: interknit runs it itself",
                    {"check": check_id},
                )
        registry = self.registry
        for inst in found:
            service, instance_id = inst.key
            if isinstance(registry, Registry):
                await self._submit(registry, _ttl_op(registry.state, inst.key, status, output))
                continue
            current = registry.state.get(service, instance_id)
            if current is not None:
                await registry.register(service, instance_id, current.spec)
                await registry.set_check_status(service, instance_id, status, output)


def _ttl_op(state: RegistryState, key: tuple[str, str], status: CheckStatus, output: str) -> Op:
    """Renew a TTL and set its check's status, as one write."""
    service, instance_id = key

    def op(now: float) -> tuple[Any, list[Event]]:
        current = state.get(service, instance_id)
        if current is None:
            raise NotFound(f"instance {instance_id!r} of {service!r} is gone", {"id": instance_id})
        # Re-registering the same spec renews the TTL and changes nothing else.
        events = state.register(service, instance_id, current.spec, now)
        events += state.set_check_status(service, instance_id, status, output, now)
        return None, events

    return op
