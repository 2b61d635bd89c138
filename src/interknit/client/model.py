"""The values the discovery client hands out: instances parsed from the API, and lookups.

Instances are the registry's own ``interknit.registry.model.Instance`` values, read back from
the API's JSON, so that a client-side ``Pool`` balances over exactly what the proxy's pools do.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from interknit.registry.model import (
    Check,
    CheckStatus,
    HealthStatus,
    Instance,
    InstanceSpec,
    OperatorStatus,
)

_OPERATOR: frozenset[str] = frozenset({"draining", "maintenance"})

__all__ = ["Check", "HealthStatus", "Instance", "Lookup", "Query", "parse_instance", "url"]


def parse_instance(data: Mapping[str, Any]) -> Instance:
    """An ``Instance`` from the API's instance object (docs/registry.md); KeyError/ValueError
    when a required field is missing or malformed."""
    check = data.get("check")
    meta = data.get("meta") or {}
    spec = InstanceSpec(
        address=str(data["address"]),
        port=int(data["port"]),
        zone=data.get("zone"),
        region=data.get("region"),
        weight=int(data.get("weight", 1)),
        tags=tuple(str(t) for t in data.get("tags") or ()),
        meta=tuple(sorted((str(k), str(v)) for k, v in meta.items())),
        check=None if check is None else Check.from_json(check),
    )
    health = str(data.get("health", "passing"))
    operator: OperatorStatus | None = None
    check_status: CheckStatus = "passing"
    if health == "draining":
        operator = "draining"
    elif health == "maintenance":
        operator = "maintenance"
    elif health == "warning":
        check_status = "warning"
    elif health == "critical":
        check_status = "critical"
    elif health != "passing":
        raise ValueError(f"unknown health {health!r}")
    ejected = data.get("ejected_until")
    return Instance(
        service=str(data["service"]),
        id=str(data["id"]),
        spec=spec,
        check_status=check_status,
        operator=operator,
        output=str(data.get("output") or ""),
        ejected_until=None if ejected is None else float(ejected),
        mod_revision=int(data.get("mod_revision", 0)),
    )


def parse_instances(items: Sequence[Mapping[str, Any]]) -> tuple[Instance, ...]:
    return tuple(parse_instance(item) for item in items)


def url(instance: Instance, path: str = "/", scheme: str = "http") -> str:
    """``http://address:port/path`` for an instance, with IPv6 addresses in brackets."""
    host = instance.address
    if ":" in host and not host.startswith("["):
        host = f"[{host}]"
    if not path.startswith("/"):
        path = "/" + path
    return f"{scheme}://{host}:{instance.port}{path}"


@dataclass(frozen=True, slots=True)
class Query:
    """One cached question: a service's instances, maybe only passing ones, maybe by tag."""

    service: str
    healthy: bool = True
    tag: str | None = None

    def params(self) -> dict[str, str]:
        params: dict[str, str] = {}
        if self.healthy:
            params["healthy"] = "1"
        if self.tag is not None:
            params["tag"] = self.tag
        return params

    def matches(self, instance: Instance) -> bool:
        """The same filter the API applies, for answers built from a watch stream."""
        if self.healthy and not instance.passing:
            return False
        return self.tag is None or self.tag in instance.tags


@dataclass(frozen=True, slots=True)
class Lookup:
    """One answer about a service.

    ``stale`` is true when no registry node confirmed this answer within the cache TTL (every
    node is down or unreachable, and this is the cached copy), or when the node that answered
    said its own copy is stale (its store is unreachable). ``age`` is how many seconds ago a
    node last confirmed it; 0 while a background blocking query is connected and would have
    been told of any change. ``node`` is the registry node that answered last.
    """

    service: str
    instances: tuple[Instance, ...]
    revision: int
    stale: bool
    age: float
    node: str | None = None

    def __iter__(self) -> Iterator[Instance]:
        return iter(self.instances)

    @property
    def passing(self) -> tuple[Instance, ...]:
        return tuple(i for i in self.instances if i.passing)

    def addresses(self) -> list[tuple[str, int]]:
        return [(i.address, i.port) for i in self.instances]
