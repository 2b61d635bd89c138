"""The registry's data: instances, their checks and health, and the events that change them.

These are plain frozen values. The registry's state machine (``state.py``) produces new ones;
every consumer (API, DNS, proxy, client) reads them and never mutates them, so a snapshot can
be shared across tasks without copying.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any, Literal

from interknit.durations import format_duration

# Re-exported: the registry's names are DNS labels, and callers long found the rules here.
from interknit.names import LABEL_RE as LABEL_RE
from interknit.names import is_hostname as is_hostname
from interknit.names import is_label as is_label

HealthStatus = Literal["passing", "warning", "critical", "draining", "maintenance"]
CheckStatus = Literal["passing", "warning", "critical"]
OperatorStatus = Literal["draining", "maintenance"]
EventType = Literal["put", "delete"]

HEALTH_STATES: tuple[HealthStatus, ...] = (
    "passing",
    "warning",
    "critical",
    "draining",
    "maintenance",
)

# The C string encoder behind json.dumps (ASCII output, as json.dumps writes by default).
_str: Callable[[str], str] = json.encoder.encode_basestring_ascii


def _opt(value: str | None) -> str:
    return "null" if value is None else _str(value)


def _check_json(check: Check | None) -> str:
    if check is None:
        return "null"
    # Kept on the check, which the API's parsing shares among the instances that spell it
    # alike: an lru_cache here hashed all eight fields on every registration.
    cached = check._json
    if cached is None:
        cached = json.dumps(check.to_json(), separators=(",", ":"))
        object.__setattr__(check, "_json", cached)
    return cached


@dataclass(frozen=True, slots=True)
class Check:
    """How an instance proves it is alive: exactly one of ``http``, ``tcp`` or ``ttl``."""

    http: str | None = None
    tcp: bool = False
    ttl: float | None = None
    interval: float = 2.0
    timeout: float = 1.0
    rise: int = 2
    fall: int = 3
    deregister_after: float | None = None
    _json: str | None = field(default=None, compare=False, repr=False)  # _check_json's

    @property
    def kind(self) -> Literal["http", "tcp", "ttl"]:
        if self.http is not None:
            return "http"
        if self.tcp:
            return "tcp"
        return "ttl"

    @property
    def active(self) -> bool:
        """True for checks that the node runs itself (HTTP, TCP) rather than waits for (TTL)."""
        return self.kind != "ttl"

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        if self.http is not None:
            out["http"] = self.http
        elif self.tcp:
            out["tcp"] = True
        elif self.ttl is not None:
            out["ttl"] = format_duration(self.ttl)
        if self.active:
            out["interval"] = format_duration(self.interval)
            out["timeout"] = format_duration(self.timeout)
            out["rise"] = self.rise
            out["fall"] = self.fall
        out["deregister_after"] = (
            None if self.deregister_after is None else format_duration(self.deregister_after)
        )
        return out

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Check:
        """Read back what ``to_json`` wrote (trusted input: the store)."""
        from interknit.durations import parse_duration

        def dur(key: str, default: float | None) -> float | None:
            raw = data.get(key)
            return default if raw is None else parse_duration(raw)

        return cls(
            http=data.get("http"),
            tcp=bool(data.get("tcp", False)),
            ttl=dur("ttl", None),
            interval=dur("interval", 2.0) or 2.0,
            timeout=dur("timeout", 1.0) or 1.0,
            rise=int(data.get("rise", 2)),
            fall=int(data.get("fall", 3)),
            deregister_after=dur("deregister_after", None),
        )


@dataclass(frozen=True, slots=True)
class InstanceSpec:
    """What a registration says about an instance; re-registering the same spec is a no-op."""

    address: str
    port: int
    zone: str | None = None
    region: str | None = None
    weight: int = 1
    tags: tuple[str, ...] = ()
    meta: tuple[tuple[str, str], ...] = ()
    check: Check | None = None

    @property
    def meta_dict(self) -> dict[str, str]:
        return dict(self.meta)

    def to_json(self) -> dict[str, Any]:
        """The registration's fields as the API writes them."""
        return {
            "address": self.address,
            "port": self.port,
            "zone": self.zone,
            "region": self.region,
            "weight": self.weight,
            "tags": list(self.tags),
            "meta": dict(self.meta),
            "check": None if self.check is None else self.check.to_json(),
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> InstanceSpec:
        """Read back what ``to_json`` wrote (trusted input: a store)."""
        check = data.get("check")
        return cls(
            address=data["address"],
            port=int(data["port"]),
            zone=data.get("zone"),
            region=data.get("region"),
            weight=int(data.get("weight", 1)),
            tags=tuple(data.get("tags", ())),
            meta=tuple(sorted(data.get("meta", {}).items())),
            check=None if check is None else Check.from_json(check),
        )


@dataclass(frozen=True, slots=True)
class Instance:
    """One running copy of a service as the registry knows it now."""

    service: str
    id: str
    spec: InstanceSpec
    check_status: CheckStatus = "passing"
    operator: OperatorStatus | None = None
    output: str = ""
    ejected_until: float | None = None
    critical_since: float | None = None
    create_revision: int = 0
    mod_revision: int = 0
    # Cached JSON forms; built once per value because lookups and watches serve them many times.
    _json: dict[str, Any] | None = field(default=None, compare=False, repr=False)
    _json_bytes: bytes | None = field(default=None, compare=False, repr=False)

    @property
    def key(self) -> tuple[str, str]:
        return (self.service, self.id)

    @property
    def address(self) -> str:
        return self.spec.address

    @property
    def port(self) -> int:
        return self.spec.port

    @property
    def weight(self) -> int:
        return self.spec.weight

    @property
    def tags(self) -> tuple[str, ...]:
        return self.spec.tags

    @property
    def zone(self) -> str | None:
        return self.spec.zone

    @property
    def region(self) -> str | None:
        return self.spec.region

    @property
    def check(self) -> Check | None:
        return self.spec.check

    @property
    def health(self) -> HealthStatus:
        """What consumers act on: an operator's word overrides the checks."""
        return self.operator if self.operator is not None else self.check_status

    @property
    def passing(self) -> bool:
        return self.health == "passing"

    def evolve(self, **changes: Any) -> Instance:
        changes.setdefault("_json", None)
        changes.setdefault("_json_bytes", None)
        return replace(self, **changes)

    def json_bytes(self) -> bytes:
        """``to_json()`` encoded, cached: the hot lookup path splices these bytes together.

        Written out by hand because every registration pays for it: the same bytes as
        ``json.dumps(self.to_json(), separators=(",", ":"))`` (a test holds them equal) in a
        third of the time.
        """
        cached = self._json_bytes
        if cached is None:
            spec = self.spec
            tags = ",".join([_str(t) for t in spec.tags])
            meta = ",".join([f"{_str(k)}:{_str(v)}" for k, v in spec.meta])
            ejected = "null" if self.ejected_until is None else json.dumps(self.ejected_until)
            cached = (
                f'{{"service":{_str(self.service)},"id":{_str(self.id)},'
                f'"address":{_str(spec.address)},"port":{spec.port:d},'
                f'"zone":{_opt(spec.zone)},"region":{_opt(spec.region)},'
                f'"weight":{spec.weight:d},"tags":[{tags}],"meta":{{{meta}}},'
                f'"check":{_check_json(spec.check)},"health":"{self.health}",'
                f'"ejected_until":{ejected},"output":{_str(self.output)},'
                f'"mod_revision":{self.mod_revision:d}}}'
            ).encode()
            object.__setattr__(self, "_json_bytes", cached)
        return cached

    def to_json(self) -> dict[str, Any]:
        """The API's instance object (DESIGN.md); cached, so callers must not mutate it."""
        cached = self._json
        if cached is None:
            cached = {
                "service": self.service,
                "id": self.id,
                **self.spec.to_json(),
                "health": self.health,
                "ejected_until": self.ejected_until,
                "output": self.output,
                "mod_revision": self.mod_revision,
            }
            object.__setattr__(self, "_json", cached)
        return cached

    def to_record(self) -> bytes:
        """Everything the store keeps about an instance: the API object and the state behind it."""
        operator = "null" if self.operator is None else f'"{self.operator}"'
        since = "null" if self.critical_since is None else json.dumps(self.critical_since)
        state = (
            f'{{"check_status":"{self.check_status}","operator":{operator},'
            f'"critical_since":{since},"create_revision":{self.create_revision:d}}}'
        )
        return b'{"instance":%s,"state":%s}' % (self.json_bytes(), state.encode())

    @classmethod
    def from_record(cls, raw: bytes | str) -> Instance:
        data = json.loads(raw)
        record, state = data["instance"], data["state"]
        spec = InstanceSpec.from_json(record)
        return cls(
            service=record["service"],
            id=record["id"],
            spec=spec,
            check_status=state.get("check_status", "passing"),
            operator=state.get("operator"),
            output=record.get("output", ""),
            ejected_until=record.get("ejected_until"),
            critical_since=state.get("critical_since"),
            create_revision=int(state.get("create_revision", 0)),
            mod_revision=int(record.get("mod_revision", 0)),
        )


# register/update: a registration; health: a check result or an operator's word; lease: a TTL
# ran out (health turns critical); eject: outlier detection; deregister: by request; expire:
# critical for longer than deregister_after.
EventReason = Literal["register", "update", "health", "lease", "eject", "deregister", "expire"]


@dataclass(frozen=True, slots=True)
class Event:
    """One change of the registry, with the revision it happened at (on the embedded store one
    more than the last; on etcd, etcd's revision, which may skip and may hold several)."""

    revision: int
    type: EventType
    reason: EventReason
    instance: Instance  # the new value for "put", the removed value for "delete"

    @property
    def service(self) -> str:
        return self.instance.service

    def to_json(self) -> dict[str, Any]:
        return {
            "revision": self.revision,
            "type": self.type,
            "reason": self.reason,
            "service": self.instance.service,
            "id": self.instance.id,
            "instance": self.instance.to_json(),
        }

    def json_bytes(self) -> bytes:
        """``to_json()`` encoded; names are DNS labels and reasons are fixed words, so they
        need no escaping, and the instance's cached bytes are reused."""
        inst = self.instance
        head = (
            f'{{"revision":{self.revision},"type":"{self.type}","reason":"{self.reason}",'
            f'"service":"{inst.service}","id":"{inst.id}","instance":'
        )
        return head.encode() + inst.json_bytes() + b"}"
