"""Consul's HTTP API subset and Prometheus http_sd, on the registry's listener (aiohttp).

A translation layer: every read is answered from the registry's in-memory state, every write
goes through the registry's own write path (``writes.py``), and blocking queries wait on
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
import random
import time
from collections.abc import Callable
from typing import Any

from aiohttp import web

from interknit import __version__
from interknit.compat.filters import Schema
from interknit.compat.ids import ConsulIds
from interknit.compat.names import Identity, Untranslatable, identity, service_label
from interknit.compat.query import Query, parse_query
from interknit.compat.register import CHECK_STATUSES
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
from interknit.compat.writes import AgentWrites
from interknit.registry.metrics import RegistryMetrics
from interknit.registry.model import Instance
from interknit.registry.registry import RegistryBackend, Unavailable
from interknit.registry.schema import DEFAULT_MIN_CHECK_INTERVAL
from interknit.registry.state import RegistryError, RegistryState

# What agent/self says this agent is; clients that check versions see a current Consul.
CONSUL_VERSION = "1.17.0"
MAX_CACHED = 4096
SAMPLE_EVERY = 0.5
# The blocking key of a name that can never be a service: woken only at shutdown.
_NOWHERE = "-"
_STATES = ("any", *CHECK_STATUSES)


def dumps(value: Any) -> bytes:
    return json.dumps(value, separators=(",", ":")).encode()


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
        min_check_interval: float = DEFAULT_MIN_CHECK_INTERVAL,
    ) -> None:
        self.registry = registry
        self.settings = settings
        self.api_port = api_port
        self.metrics = metrics
        self._clock = clock
        # On etcd every node sees every instance; "the agent's" services are the ones this
        # node owns, and the node an instance is on is its owner.
        self._owns: Callable[[str, str], bool] = registry.owns
        self.view = ConsulView(
            settings.datacenter,
            node_name,
            node_address,
            dict(settings.node_meta),
            # Read at each call: a resync may replace the registry's state.
            lambda i: registry.state.owner(i.service, i.id),
        )
        self.ids = ConsulIds()
        self.ids.rebuild(registry.state.all_instances())
        registry.subscribe(self.ids.apply, self._resynced)
        self.writes = AgentWrites(
            registry, self.ids, settings.datacenter, node_address, min_check_interval
        )
        self._bodies: dict[tuple[object, ...], tuple[int, bytes]] = {}
        self._queries: dict[tuple[str, int, bool, bool], Query] = {}
        self._live_at = clock()
        self._gauge = None if metrics is None else metrics.watchers.labels("consul")
        self._sampler: asyncio.Task[None] | None = None

    def _resynced(self) -> None:
        # The state was replaced wholesale (a reload may even move revisions back): nothing
        # cached by revision can be trusted.
        self._bodies.clear()
        self.ids.rebuild(self.registry.state.all_instances())

    def add_routes(self, app: web.Application) -> None:
        app.on_startup.append(self._start_sampling)
        app.on_cleanup.append(self._stop_sampling)
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
        writes = self.writes
        add_put("/v1/agent/service/register", writes.register)
        add_put("/v1/agent/service/deregister/{id:.+}", writes.deregister)
        add_put("/v1/agent/service/maintenance/{id:.+}", writes.maintenance)
        add_put("/v1/agent/check/update/{id:.+}", writes.check_update)
        add_put("/v1/agent/check/{verb:pass|warn|fail}/{id:.+}", writes.check_ttl)
        add_get("/v1/prometheus/targets", self.prometheus_targets)

    # ------------------------------------------------------------------ plumbing

    async def _start_sampling(self, app: web.Application) -> None:
        self._sampler = asyncio.create_task(self._sample(), name="compat-last-contact")

    async def _stop_sampling(self, app: web.Application) -> None:
        if self._sampler is not None:
            self._sampler.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sampler

    async def _sample(self) -> None:
        """Note when the registry was last in touch with its store, for X-Consul-LastContact
        (the backends say whether they are stale now, not since when)."""
        while True:
            if not self.registry.stale:
                self._live_at = self._clock()
            await asyncio.sleep(SAMPLE_EVERY)

    @property
    def state(self) -> RegistryState:
        return self.registry.state

    def _query(
        self,
        request: web.Request,
        schema: Schema | None = None,
        tags: bool = False,
        passing: bool = False,
    ) -> Query:
        """The request's parameters, read once per distinct query string: the watchers of a
        service all come back with the same one (the index they were given)."""
        key = (request.query_string, id(schema), tags, passing)
        query = self._queries.get(key)
        if query is None:
            query = parse_query(
                request.query.items(),
                datacenter=self.settings.datacenter,
                schema=schema,
                tags=tags,
                passing=passing,
            )
            if len(self._queries) >= MAX_CACHED:
                self._queries.clear()
            self._queries[key] = query
        return query

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
        """The body ``build`` makes (bytes, or a value to encode), once per revision."""
        hit = self._bodies.get(key)
        if hit is not None and hit[0] == revision:
            return hit[1]
        built = build()
        body = built if isinstance(built, bytes) else dumps(built)
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

        def build() -> bytes | list[dict[str, Any]]:
            found = self._service_rows(name, query)
            test = None if query.filter is None else query.filter.test
            if test is None:
                return b"[" + b",".join([self.view.catalog_row_json(i) for i, _, _ in found]) + b"]"
            rows = [self.view.catalog_row(i, ident) for i, ident, _ in found]
            return [r for r in rows if test(r)]

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

        def build() -> bytes | list[dict[str, Any]]:
            found = [
                (inst, ident, node)
                for inst, ident, node in self._service_rows(name, query)
                if not query.passing or passing(inst)
            ]
            if query.filter is None:
                return (
                    b"[" + b",".join([self.view.health_entry_json(i) for i, _, _ in found]) + b"]"
                )
            rows = [self.view.health_entry(inst, ident, node) for inst, ident, node in found]
            return [r for r in rows if query.filter.test(r)]

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
