"""Builders shared by the DNS tests: registry instances and dnspython round trips."""

from __future__ import annotations

from typing import Any

import dns.message
import dns.rdatatype
import dns.rrset

from interknit.dns.zone import Zone
from interknit.registry.model import Event, EventReason, Instance, InstanceSpec

ZONE = "ik.internal."


def inst(
    service: str,
    id: str,
    address: str,
    port: int = 8080,
    *,
    tags: tuple[str, ...] = (),
    weight: int = 1,
    region: str | None = None,
    meta: dict[str, str] | None = None,
    check_status: Any = "passing",
    operator: Any = None,
) -> Instance:
    spec = InstanceSpec(
        address=address,
        port=port,
        region=region,
        weight=weight,
        tags=tags,
        meta=tuple(sorted((meta or {}).items())),
    )
    return Instance(service, id, spec, check_status=check_status, operator=operator)


def put(revision: int, instance: Instance, reason: EventReason = "register") -> Event:
    return Event(revision, "put", reason, instance)


def delete(revision: int, instance: Instance) -> Event:
    return Event(revision, "delete", "deregister", instance)


def ask(
    zone: Zone,
    name: str,
    rdtype: str = "A",
    *,
    now: float = 0.0,
    client: str = "192.0.2.1",
    tcp: bool = False,
    **make: Any,
) -> dns.message.Message:
    query = dns.message.make_query(name, rdtype, **make)
    reply = zone.answer(query.to_wire(), client, now, tcp=tcp)
    assert reply is not None
    response = dns.message.from_wire(reply.wire)
    assert response.id == query.id
    return response


def rrset(msg: dns.message.Message, rdtype: str) -> dns.rrset.RRset | None:
    kind = dns.rdatatype.from_text(rdtype)
    return next((r for r in msg.answer if r.rdtype == kind), None)


def addresses(msg: dns.message.Message, rdtype: str = "A") -> list[str]:
    found = rrset(msg, rdtype)
    return [] if found is None else [r.address for r in found]
