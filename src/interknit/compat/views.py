"""Instances as Consul and Prometheus show them (pure: instances in, JSON-ready rows out).

Health maps as docs/compat.md says: an instance's check status (passing, warning, critical)
is its ``service:ID`` check (or the CheckID it was registered with); an operator's
``draining`` or ``maintenance`` adds a critical ``_service_maintenance:ID`` check, never a
warning, since Traefik's default takes warning instances. Every instance has a service check,
even one registered without any (passing), because Fabio ignores instances without one, and
every node a passing ``serfHealth`` check, as a live Consul agent has.

The field sets follow Consul's api package (``CatalogService``, ``ServiceEntry``,
``AgentService``, ``HealthCheck``, ``Node``); durations are written as Go writes them, since
Go clients parse them back with ``time.ParseDuration``.
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Callable
from typing import Any

from interknit.compat.filters import BOOL, INT, LIST, MAP, OBJECTS, STR, Schema
from interknit.compat.godur import format_go_duration
from interknit.compat.names import Identity, identity
from interknit.registry.model import Instance

SERF_CHECK = "serfHealth"
MAINTENANCE_PREFIX = "_service_maintenance:"
_NODE_NAMESPACE = uuid.UUID("6d1c3f0e-5f43-4c4e-9a43-6b6e69746b31")  # "interknit" nodes
_LABEL_CHARS = re.compile(r"[^a-zA-Z0-9_]")
MAX_MEMO = 100_000

_WEIGHTS_SCHEMA: Schema = {"Passing": INT, "Warning": INT}
NODE_SCHEMA: Schema = {
    "ID": STR,
    "Node": STR,
    "Address": STR,
    "Datacenter": STR,
    "TaggedAddresses": MAP,
    "Meta": MAP,
}
SERVICE_SCHEMA: Schema = {
    "Kind": STR,
    "ID": STR,
    "Service": STR,
    "Tags": LIST,
    "Meta": MAP,
    "Port": INT,
    "Address": STR,
    "Weights": _WEIGHTS_SCHEMA,
    "EnableTagOverride": BOOL,
    "Datacenter": STR,
}
HEALTH_SCHEMA: Schema = {"Node": NODE_SCHEMA, "Service": SERVICE_SCHEMA, "Checks": OBJECTS}
CATALOG_SCHEMA: Schema = {
    "ID": STR,
    "Node": STR,
    "Address": STR,
    "Datacenter": STR,
    "TaggedAddresses": MAP,
    "NodeMeta": MAP,
    "ServiceKind": STR,
    "ServiceID": STR,
    "ServiceName": STR,
    "ServiceTags": LIST,
    "ServiceAddress": STR,
    "ServiceMeta": MAP,
    "ServicePort": INT,
    "ServiceWeights": _WEIGHTS_SCHEMA,
    "ServiceEnableTagOverride": BOOL,
}
CHECK_SCHEMA: Schema = {
    "Node": STR,
    "CheckID": STR,
    "Name": STR,
    "Status": STR,
    "Notes": STR,
    "Output": STR,
    "ServiceID": STR,
    "ServiceName": STR,
    "ServiceTags": LIST,
    "Type": STR,
}

_ZERO_DEFINITION = {
    "HTTP": "",
    "TCP": "",
    "Interval": "0s",
    "Timeout": "0s",
    "DeregisterCriticalServiceAfter": "0s",
}
_NOTES = {
    "maintenance": "Maintenance mode is enabled for this service (interknit: maintenance).",
    "draining": "The instance is draining: it takes no new work (interknit: draining).",
}


def _encode(value: Any) -> bytes:
    return json.dumps(value, separators=(",", ":")).encode()


class _Memo:
    __slots__ = ("catalog", "health", "identity", "node", "revision")

    def __init__(self, revision: int, ident: Identity, node: str) -> None:
        self.revision = revision
        self.identity = ident
        self.node = node
        self.health: bytes | None = None
        self.catalog: bytes | None = None


def node_id(name: str) -> str:
    """A node's ID: a UUID, as Consul's, that stays the same for the same node name."""
    return str(uuid.uuid5(_NODE_NAMESPACE, name))


def host_port(address: str, port: int) -> str:
    return f"[{address}]:{port}" if ":" in address else f"{address}:{port}"


def passing(inst: Instance) -> bool:
    """Every check passing, as Consul's ``?passing`` asks (warning is not passing)."""
    return inst.check_status == "passing" and inst.operator is None


def aggregated(inst: Instance) -> str:
    """The status Consul clients compute from the checks (api's AggregatedStatus)."""
    return "maintenance" if inst.operator is not None else inst.check_status


class ConsulView:
    """What one node answers: its datacenter, its name and address, and who owns what."""

    def __init__(
        self,
        datacenter: str,
        node_name: str,
        node_address: str,
        node_meta: dict[str, str] | None = None,
        owner: Callable[[Instance], str | None] | None = None,
    ) -> None:
        self.datacenter = datacenter
        self.node_name = node_name
        self.node_address = node_address
        self.node_meta = {"consul-network-segment": "", **(node_meta or {})}
        self._owner = owner
        self.local_node = self._node(node_name, node_address)
        self._memo: dict[tuple[str, str], _Memo] = {}

    # ------------------------------------------------------------------ nodes

    def _node(self, name: str, address: str) -> dict[str, Any]:
        return {
            "ID": node_id(name),
            "Node": name,
            "Address": address,
            "Datacenter": self.datacenter,
            "TaggedAddresses": {"lan": address, "wan": address},
            "Meta": self.node_meta,
            "CreateIndex": 1,
            "ModifyIndex": 1,
        }

    def node_name_of(self, inst: Instance) -> str:
        owner = None if self._owner is None else self._owner(inst)
        return owner or self.node_name

    def node_of(self, inst: Instance) -> dict[str, Any]:
        """The node an instance is on: this one, or on etcd the node that owns it (whose
        address interknit does not know: the instance's own stands in)."""
        name = self.node_name_of(inst)
        if name == self.node_name:
            return self.local_node
        return self._node(name, inst.address)

    def nodes(self, instances: list[Instance]) -> list[dict[str, Any]]:
        out = {self.node_name: self.local_node}
        for inst in instances:
            name = self.node_name_of(inst)
            if name not in out:
                out[name] = self.node_of(inst)
        return [out[name] for name in sorted(out)]

    def node_check(self, name: str) -> dict[str, Any]:
        return {
            "Node": name,
            "CheckID": SERF_CHECK,
            "Name": "Serf Health Status",
            "Status": "passing",
            "Notes": "",
            "Output": "Agent alive and reachable",
            "ServiceID": "",
            "ServiceName": "",
            "ServiceTags": [],
            "Type": "",
            "Definition": _ZERO_DEFINITION,
            "CreateIndex": 1,
            "ModifyIndex": 1,
        }

    # ------------------------------------------------------------------ services

    def _memo_of(self, inst: Instance) -> _Memo:
        """What is worked out once per instance value: its identity, node and encoded rows.
        Every change of an instance gives it a new ``mod_revision``, which keys the memo."""
        memo = self._memo.get(inst.key)
        if memo is None or memo.revision != inst.mod_revision:
            if len(self._memo) >= MAX_MEMO:
                self._memo.clear()
            memo = _Memo(inst.mod_revision, identity(inst), self.node_name_of(inst))
            self._memo[inst.key] = memo
        return memo

    def ordered(self, instances: list[Instance]) -> list[tuple[Instance, Identity, str]]:
        """Instances with their Consul identity and node, in Consul's order (node, then ID):
        catalog and health answers list them alike."""
        rows = []
        for inst in instances:
            memo = self._memo_of(inst)
            rows.append((inst, memo.identity, memo.node))
        rows.sort(key=lambda r: (r[2], r[1].id))
        return rows

    def health_entry_json(self, inst: Instance) -> bytes:
        """``health_entry`` encoded, once per instance value: a thousand watchers woken by a
        change of one instance of a large service re-encode that instance alone."""
        memo = self._memo_of(inst)
        if memo.health is None:
            memo.health = _encode(self.health_entry(inst, memo.identity, memo.node))
        return memo.health

    def catalog_row_json(self, inst: Instance) -> bytes:
        memo = self._memo_of(inst)
        if memo.catalog is None:
            memo.catalog = _encode(self.catalog_row(inst, memo.identity))
        return memo.catalog

    def agent_service(self, inst: Instance, ident: Identity) -> dict[str, Any]:
        spec = inst.spec
        return {
            "ID": ident.id,
            "Service": ident.name,
            "Tags": list(spec.tags),
            "Meta": ident.meta,
            "Port": spec.port,
            "Address": spec.address,
            "Weights": {"Passing": spec.weight, "Warning": ident.warning_weight},
            "EnableTagOverride": False,
            "CreateIndex": inst.create_revision,
            "ModifyIndex": inst.mod_revision,
            "Datacenter": self.datacenter,
        }

    def checks(self, inst: Instance, ident: Identity, node: str) -> list[dict[str, Any]]:
        """The node's serfHealth, the service check, and the maintenance check if any."""
        return [self.node_check(node), *self.service_checks(inst, ident, node)]

    def service_checks(self, inst: Instance, ident: Identity, node: str) -> list[dict[str, Any]]:
        spec = inst.spec
        check = spec.check
        definition = dict(_ZERO_DEFINITION)
        kind = ""
        if check is not None:
            kind = check.kind
            if check.http is not None:
                definition["HTTP"] = f"http://{host_port(spec.address, spec.port)}{check.http}"
            elif check.tcp:
                definition["TCP"] = host_port(spec.address, spec.port)
            if check.active:
                definition["Interval"] = format_go_duration(check.interval)
                definition["Timeout"] = format_go_duration(check.timeout)
            elif check.ttl is not None:
                definition["Interval"] = format_go_duration(check.ttl)  # Consul shows the TTL
            if check.deregister_after is not None:
                after = format_go_duration(check.deregister_after)
                definition["DeregisterCriticalServiceAfter"] = after
        tags = list(spec.tags)
        out = [
            {
                "Node": node,
                "CheckID": ident.check_id,
                "Name": ident.check_name,
                "Status": inst.check_status,
                "Notes": "",
                "Output": inst.output,
                "ServiceID": ident.id,
                "ServiceName": ident.name,
                "ServiceTags": tags,
                "Type": kind,
                "Definition": definition,
                "CreateIndex": inst.create_revision,
                "ModifyIndex": inst.mod_revision,
            }
        ]
        if inst.operator is not None:
            out.append(
                {
                    "Node": node,
                    "CheckID": MAINTENANCE_PREFIX + ident.id,
                    "Name": "Service Maintenance Mode",
                    "Status": "critical",
                    "Notes": _NOTES[inst.operator],
                    "Output": "",
                    "ServiceID": ident.id,
                    "ServiceName": ident.name,
                    "ServiceTags": tags,
                    "Type": "maintenance",
                    "Definition": _ZERO_DEFINITION,
                    "CreateIndex": inst.mod_revision,
                    "ModifyIndex": inst.mod_revision,
                }
            )
        return out

    def health_entry(self, inst: Instance, ident: Identity, node: str) -> dict[str, Any]:
        return {
            "Node": self.node_of(inst),
            "Service": self.agent_service(inst, ident),
            "Checks": self.checks(inst, ident, node),
        }

    def catalog_row(self, inst: Instance, ident: Identity) -> dict[str, Any]:
        node = self.node_of(inst)
        spec = inst.spec
        return {
            "ID": node["ID"],
            "Node": node["Node"],
            "Address": node["Address"],
            "Datacenter": self.datacenter,
            "TaggedAddresses": node["TaggedAddresses"],
            "NodeMeta": node["Meta"],
            "ServiceKind": "",
            "ServiceID": ident.id,
            "ServiceName": ident.name,
            "ServiceTags": list(spec.tags),
            "ServiceAddress": spec.address,
            "ServiceWeights": {"Passing": spec.weight, "Warning": ident.warning_weight},
            "ServiceMeta": ident.meta,
            "ServicePort": spec.port,
            "ServiceEnableTagOverride": False,
            "CreateIndex": inst.create_revision,
            "ModifyIndex": inst.mod_revision,
        }

    # ------------------------------------------------------------------ Prometheus

    def target_group(self, inst: Instance) -> dict[str, Any]:
        """One http_sd target group: the instance's address and its labels."""
        spec = inst.spec
        labels = {
            "__meta_interknit_service": inst.service,
            "__meta_interknit_id": inst.id,
            # Surrounded by commas, as Prometheus' Consul discovery writes them, so that a
            # relabelling regex need not care where in the list a tag is.
            "__meta_interknit_tags": "," + ",".join(spec.tags) + ",",
            "__meta_interknit_zone": spec.zone or "",
            "__meta_interknit_region": spec.region or "",
            "__meta_interknit_health": inst.health,
            "__meta_interknit_node": self.node_name_of(inst),
        }
        for key, value in spec.meta:
            labels["__meta_interknit_meta_" + _LABEL_CHARS.sub("_", key)] = value
        return {"targets": [host_port(spec.address, spec.port)], "labels": labels}
