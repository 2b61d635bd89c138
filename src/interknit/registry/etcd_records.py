"""How the registry lies in etcd: the key layout and the JSON records under it.

Layout under a prefix (default ``/interknit/``)::

    instances/{service}/{id}   the registration: the spec and the owning node's name;
                               attached to the owning node's lease (ephemeral)
    health/{service}/{id}      check status, operator status, output, critical_since,
                               ejected_until; same lease. Kept apart so that a health change
                               does not rewrite the registration.
    ttl/{service}/{id}         empty; exists only for TTL-checked instances, attached to a lease
                               of its own with the check's TTL. A heartbeat renews that lease;
                               when the lease runs out etcd deletes the key, and the owning node
                               marks the instance critical.
    nodes/{name}               one per running node, attached to the node's lease.

Plain data and pure functions: no IO here.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Literal

from interknit.registry.model import (
    CheckStatus,
    EventReason,
    Instance,
    InstanceSpec,
    OperatorStatus,
)

DEFAULT_PREFIX = "/interknit/"
KeyKind = Literal["instances", "health", "ttl", "nodes"]
_KINDS: tuple[KeyKind, ...] = ("instances", "health", "ttl", "nodes")
NEVER_CHECKED = "no check has run yet"


class Layout:
    def __init__(self, prefix: str = DEFAULT_PREFIX) -> None:
        if not prefix.endswith("/"):
            prefix += "/"
        self.prefix = prefix
        self.prefix_bytes = prefix.encode()

    def instance(self, service: str, instance_id: str) -> bytes:
        return f"{self.prefix}instances/{service}/{instance_id}".encode()

    def health(self, service: str, instance_id: str) -> bytes:
        return f"{self.prefix}health/{service}/{instance_id}".encode()

    def ttl(self, service: str, instance_id: str) -> bytes:
        return f"{self.prefix}ttl/{service}/{instance_id}".encode()

    def node(self, name: str) -> bytes:
        return f"{self.prefix}nodes/{name}".encode()

    def parse(self, key: bytes) -> tuple[KeyKind, str, str] | None:
        """(kind, service, id) for instance keys; (``nodes``, name, "") for node keys; None for
        anything else under the prefix (left alone, for forward compatibility)."""
        if not key.startswith(self.prefix_bytes):
            return None
        parts = key[len(self.prefix_bytes) :].decode(errors="replace").split("/")
        kind = parts[0]
        if kind == "nodes" and len(parts) == 2:
            return "nodes", parts[1], ""
        if kind in _KINDS and len(parts) == 3 and kind != "nodes":
            return kind, parts[1], parts[2]
        return None


# ---------------------------------------------------------------------- records


@dataclass(frozen=True, slots=True)
class Registration:
    spec: InstanceSpec
    owner: str

    def encode(self) -> bytes:
        body = {"spec": self.spec.to_json(), "owner": self.owner}
        return json.dumps(body, separators=(",", ":")).encode()

    @classmethod
    def decode(cls, raw: bytes) -> Registration:
        data = json.loads(raw)
        return cls(spec=InstanceSpec.from_json(data["spec"]), owner=str(data.get("owner", "")))


@dataclass(frozen=True, slots=True)
class Health:
    check_status: CheckStatus = "passing"
    operator: OperatorStatus | None = None
    output: str = ""
    critical_since: float | None = None
    ejected_until: float | None = None
    # Why it was last written, so every node reports the same event reason.
    reason: EventReason = "health"

    def encode(self) -> bytes:
        body = {
            "check_status": self.check_status,
            "operator": self.operator,
            "output": self.output,
            "critical_since": self.critical_since,
            "ejected_until": self.ejected_until,
            "reason": self.reason,
        }
        return json.dumps(body, separators=(",", ":")).encode()

    @classmethod
    def decode(cls, raw: bytes) -> Health:
        data = json.loads(raw)
        return cls(
            check_status=data.get("check_status", "passing"),
            operator=data.get("operator"),
            output=data.get("output", ""),
            critical_since=data.get("critical_since"),
            ejected_until=data.get("ejected_until"),
            reason=data.get("reason", "health"),
        )

    @classmethod
    def initial(cls, spec: InstanceSpec, now: float) -> Health:
        """As the embedded state starts one: a TTL instance (or an unchecked one) passing, an
        actively checked one critical until its first successful check."""
        if spec.check is not None and spec.check.active:
            return cls("critical", output=NEVER_CHECKED, critical_since=now, reason="register")
        return cls("passing", reason="register")


def build_instance(
    service: str,
    instance_id: str,
    registration: Registration,
    health: Health | None,
    create_revision: int,
    mod_revision: int,
) -> Instance:
    h = health if health is not None else Health.initial(registration.spec, 0.0)
    return Instance(
        service=service,
        id=instance_id,
        spec=registration.spec,
        check_status=h.check_status,
        operator=h.operator,
        output=h.output,
        ejected_until=h.ejected_until,
        critical_since=h.critical_since,
        create_revision=create_revision,
        mod_revision=mod_revision,
    )


@dataclass(frozen=True, slots=True)
class NodeRecord:
    name: str
    lease: int
    started: float

    def encode(self) -> bytes:
        body = {"name": self.name, "lease": self.lease, "started": self.started}
        return json.dumps(body, separators=(",", ":")).encode()
