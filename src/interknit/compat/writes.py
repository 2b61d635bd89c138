"""Consul's agent writes: register, deregister, TTL check updates, maintenance.

Every write goes through the registry's own write path (``RegistryBackend``), and is answered
once it is durable. A write that is two changes of the registry's state (register, then put a
TTL check in Consul's starting state; renew a TTL, then set its status) is one operation of
the embedded registry, committed together, so no reader sees the state between them; on etcd
they are two writes, one after the other.
"""

from __future__ import annotations

import contextlib
import logging
from typing import Any

from aiohttp import web

from interknit.compat.ids import ConsulIds
from interknit.compat.names import identity
from interknit.compat.query import parse_query
from interknit.compat.register import (
    CHECK_STATUSES,
    Registration,
    fields,
    load,
    parse_registration,
)
from interknit.compat.register import fail as body_fail
from interknit.registry.api import read_body
from interknit.registry.model import CheckStatus, Event, Instance
from interknit.registry.registry import Op, Registry, RegistryBackend
from interknit.registry.state import Conflict, NotFound, RegistryError, RegistryState

log = logging.getLogger("interknit.compat")

_UPDATE_FIELDS = {"status": "Status", "output": "Output"}
_VERBS: dict[str, CheckStatus] = {"pass": "passing", "warn": "warning", "fail": "critical"}


class AgentWrites:
    def __init__(
        self,
        registry: RegistryBackend,
        ids: ConsulIds,
        datacenter: str,
        node_address: str,
        min_check_interval: float,
    ) -> None:
        self.registry = registry
        self.min_check_interval = min_check_interval
        self.ids = ids
        self.datacenter = datacenter
        self.node_address = node_address

    @property
    def state(self) -> RegistryState:
        return self.registry.state

    def _write_query(self, request: web.Request) -> None:
        # dc is checked; ns, partition and the rest are accepted and ignored, as on reads.
        parse_query(request.query.items(), datacenter=self.datacenter)

    async def _register(self, reg: Registration) -> None:
        registry = self.registry
        service, instance_id, spec = reg.service, reg.instance_id, reg.spec
        initial = reg.initial
        if isinstance(registry, Registry):

            def op(state: RegistryState, now: float) -> tuple[Any, list[Event]]:
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

            await registry.submit(op)
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
        reg = parse_registration(
            await read_body(request), self.node_address, self.min_check_interval
        )
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
        # Consul's agent holds one service per ID and would move it to the new name; an
        # interknit ID is per service, and the other may well not be Consul's to move.
        for other in self.ids.find(self.state, reg.consul_id):
            if other.key != (reg.service, reg.instance_id):
                raise Conflict(
                    f"ID: {reg.consul_id!r} is registered under the service "
                    f"{identity(other).name!r}; deregister it there first",
                    [{"field": "ID"}],
                )
        await self._register(reg)
        return web.Response(text="")

    def _by_id(self, consul_id: str) -> Instance:
        return _one(self.ids.find(self.state, consul_id, scan=True), "service", consul_id)

    async def deregister(self, request: web.Request) -> web.Response:
        self._write_query(request)
        inst = self._by_id(request.match_info["id"])
        with contextlib.suppress(NotFound):  # gone meanwhile: what was asked is done
            await self.registry.deregister(inst.service, inst.id)
        return web.Response(text="")

    async def maintenance(self, request: web.Request) -> web.Response:
        self._write_query(request)
        enable = request.query.get("enable")
        if enable not in ("true", "false"):
            raise RegistryError("enable: must be true or false", [{"field": "enable"}])
        inst = self._by_id(request.match_info["id"])
        if enable == "true":
            await self.registry.set_operator(inst.service, inst.id, "maintenance")
        elif inst.operator == "maintenance":  # a drain is interknit's to end, not this
            await self.registry.set_operator(inst.service, inst.id, "passing")
        return web.Response(text="")

    async def check_ttl(self, request: web.Request) -> web.Response:
        self._write_query(request)
        status = _VERBS[request.match_info["verb"]]
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
        inst = _one(self.ids.find_check(self.state, check_id), "check", check_id)
        check = inst.spec.check
        if check is None or check.ttl is None:
            raise Conflict(
                f"check {check_id!r} is not a TTL check: interknit runs it itself",
                {"check": check_id},
            )
        registry = self.registry
        if isinstance(registry, Registry):
            await registry.submit(_ttl_op(inst.key, status, output))
            return
        await registry.register(inst.service, inst.id, inst.spec)
        await registry.set_check_status(inst.service, inst.id, status, output)


def _one(found: list[Instance], what: str, name: str) -> Instance:
    """The one instance a Consul ID names; 404 for none, 409 when instances of several
    services share it (interknit IDs are per service, Consul's per agent)."""
    if not found:
        raise NotFound(f"unknown {what} ID {name!r}", {what: name})
    if len(found) > 1:
        services = ", ".join(sorted(repr(i.service) for i in found))
        raise Conflict(
            f"{what} ID {name!r} names instances of the services {services}; "
            "use interknit's own API for these",
            {what: name},
        )
    return found[0]


def _ttl_op(key: tuple[str, str], status: CheckStatus, output: str) -> Op:
    """Renew a TTL and set its check's status, as one write."""
    service, instance_id = key

    def op(state: RegistryState, now: float) -> tuple[Any, list[Event]]:
        current = state.get(service, instance_id)
        if current is None:
            raise NotFound(f"instance {instance_id!r} of {service!r} is gone", {"id": instance_id})
        # Re-registering the same spec renews the TTL and changes nothing else.
        events = state.register(service, instance_id, current.spec, now)
        events += state.set_check_status(service, instance_id, status, output, now)
        return None, events

    return op
