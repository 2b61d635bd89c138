"""The VIPs' records in the registry, and the transactions that change them.

Everything goes through the registry's public interface: members and claims are instances,
visible to the API, the status page and DNS like any other; writes are ``transact`` (etcd)
or ``register``/``deregister`` (the embedded store, where one node holds everything).

* Members: service ``{service}`` (``vip`` by default), one instance per node, id = node name,
  address:port = where its adverts go, weight, and ``meta.lease`` = its lease id (for peers to
  revoke). Its create revision is the node's epoch.
* Claims: service ``{service}-addresses``, one instance per VIP (id from the address, such as
  ``10-0-0-10``), address = the VIP, ``meta.holder`` and ``meta.epoch`` = who holds it (empty
  when released), tag ``held`` or ``released``. A claim is under no lease: it stays until the
  next claim or handover changes it, each pinned to its last revision.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from typing import Protocol

from interknit.registry.model import CheckStatus, Instance, InstanceSpec
from interknit.registry.registry import RegistryBackend, Unavailable
from interknit.registry.state import RegistryError
from interknit.registry.txn import Expect, Put, Transactional
from interknit.vip.machine import Claim, ClaimVip, Handover, Member


class NoAnswer(Exception):
    """The store did not answer: the request may or may not have been applied."""


def vip_id(vip: str) -> str:
    """A DNS-label instance id for an address: ``10.0.0.10`` -> ``10-0-0-10``,
    ``fd00::10`` -> ``fd00--10``."""
    label = ipaddress.ip_address(vip).compressed.replace(".", "-").replace(":", "-")
    if label.startswith("-"):
        label = "0" + label
    if label.endswith("-"):
        label += "0"
    return label


def member_spec(address: str, port: int, weight: int, lease: int) -> InstanceSpec:
    return InstanceSpec(address=address, port=port, weight=weight, meta=(("lease", str(lease)),))


def claim_spec(vip: str, port: int, holder: str, epoch: int) -> InstanceSpec:
    return InstanceSpec(
        address=vip,
        port=port,
        tags=("held",) if holder else ("released",),
        meta=(("epoch", str(epoch)), ("holder", holder)),
    )


def read_members(instances: Iterable[Instance]) -> list[Member]:
    out = []
    for inst in instances:
        meta = inst.spec.meta_dict
        try:
            lease = int(meta.get("lease", "0"))
        except ValueError:
            continue
        out.append(
            Member(
                inst.id,
                inst.create_revision,
                lease,
                inst.address,
                inst.port,
                inst.weight,
                inst.passing,
            )
        )
    return out


def read_claims(instances: Iterable[Instance]) -> list[Claim]:
    out = []
    for inst in instances:
        meta = inst.spec.meta_dict
        try:
            vip = str(ipaddress.ip_address(inst.address))
            epoch = int(meta.get("epoch", "0"))
        except ValueError:
            continue
        out.append(Claim(vip, meta.get("holder", ""), epoch, inst.mod_revision))
    return out


class VipStore(Protocol):
    solo: bool

    async def join(self, spec: InstanceSpec) -> tuple[int, int]: ...

    async def confirm(self, epoch: int) -> bool: ...

    async def keepalive(self) -> float: ...

    async def claim(self, e: ClaimVip) -> int | None: ...

    async def handover(self, e: Handover) -> int | None: ...

    async def evict(self, member: Member) -> None: ...

    async def set_live(self, live: bool, reason: str) -> None: ...

    async def leave(self, epoch: int) -> None: ...


def _unavailable(exc: Exception) -> NoAnswer:
    return NoAnswer(str(exc))


class EtcdVipStore:
    """Members under leases of their own; claims and handovers as compare-and-swap."""

    solo = False

    def __init__(
        self, registry: Transactional, backend: RegistryBackend, name: str, service: str,
        port: int, lease_ttl: float,
    ) -> None:  # fmt: skip
        self.registry = registry
        self.backend = backend
        self.name = name
        self.members = service
        self.claims = f"{service}-addresses"
        self.port = port
        self.lease_ttl = lease_ttl
        self.lease = 0

    async def join(self, spec: InstanceSpec) -> tuple[int, int]:
        """Create our member under a new lease: (epoch, lease)."""
        try:
            lease = await self.registry.grant_lease(self.lease_ttl)
            spec = member_spec(spec.address, spec.port, spec.weight, lease)
            for _ in range(2):
                outcome = await self.registry.transact(
                    [Expect(self.members, self.name, created=0)],
                    [Put(self.members, self.name, spec, lease)],
                )
                if outcome.succeeded:
                    self.lease = lease
                    return outcome.revision, lease
                # A member of our name is there: this node's previous life (a crash, a restart
                # within its lease). Let it go; its addresses went with that process.
                old = self.backend.state.get(self.members, self.name)
                if old is not None:
                    previous = read_members([old])
                    if previous and previous[0].lease:
                        await self.registry.revoke_lease(previous[0].lease)
            await self.registry.revoke_lease(lease)
        except (Unavailable, RegistryError) as exc:
            raise _unavailable(exc) from None
        raise NoAnswer("a member of this node's name is still in the store")

    async def confirm(self, epoch: int) -> bool:
        try:
            outcome = await self.registry.transact(
                [Expect(self.members, self.name, created=epoch)], []
            )
        except (Unavailable, RegistryError) as exc:
            raise _unavailable(exc) from None
        return outcome.succeeded

    async def keepalive(self) -> float:
        if not self.lease:
            return 0.0
        try:
            return await self.registry.keep_lease(self.lease)
        except (Unavailable, RegistryError) as exc:
            raise _unavailable(exc) from None

    async def claim(self, e: ClaimVip) -> int | None:
        expect = [
            Expect(self.claims, vip_id(e.vip), modified=e.version),
            Expect(self.members, self.name, created=e.epoch),
        ]
        if e.gone is not None:
            expect.append(Expect(self.members, e.gone[0], not_created=e.gone[1]))
        put = Put(self.claims, vip_id(e.vip), claim_spec(e.vip, self.port, self.name, e.epoch))
        return await self._txn(expect, put)

    async def handover(self, e: Handover) -> int | None:
        expect = [
            Expect(self.claims, vip_id(e.vip), modified=e.version),
            Expect(self.members, self.name, created=e.epoch),
        ]
        holder, epoch = "", 0
        if e.to is not None:
            expect.append(Expect(self.members, e.to.name, created=e.to.epoch))
            holder, epoch = e.to.name, e.to.epoch
        put = Put(self.claims, vip_id(e.vip), claim_spec(e.vip, self.port, holder, epoch))
        return await self._txn(expect, put)

    async def _txn(self, expect: list[Expect], put: Put) -> int | None:
        try:
            outcome = await self.registry.transact(expect, [put])
        except (Unavailable, RegistryError) as exc:
            raise _unavailable(exc) from None
        return outcome.revision if outcome.succeeded else None

    async def evict(self, member: Member) -> None:
        try:
            await self.registry.revoke_lease(member.lease)
        except (Unavailable, RegistryError) as exc:
            raise _unavailable(exc) from None

    async def set_live(self, live: bool, reason: str) -> None:
        status: CheckStatus = "passing" if live else "critical"
        try:
            await self.backend.set_check_status(self.members, self.name, status, reason)
        except (Unavailable, RegistryError) as exc:
            raise _unavailable(exc) from None

    async def leave(self, epoch: int) -> None:
        if self.lease:
            try:
                await self.registry.revoke_lease(self.lease)
            except (Unavailable, RegistryError) as exc:
                raise _unavailable(exc) from None
            self.lease = 0


class SoloVipStore:
    """The embedded store: this node is the only one; the records are kept for the API, the
    status page and DNS to show, and nothing needs comparing."""

    solo = True

    def __init__(self, backend: RegistryBackend, name: str, service: str, port: int) -> None:
        self.backend = backend
        self.name = name
        self.members = service
        self.claims = f"{service}-addresses"
        self.port = port

    async def _register(self, service: str, instance_id: str, spec: InstanceSpec) -> Instance:
        try:
            inst, _ = await self.backend.register(service, instance_id, spec)
        except (Unavailable, RegistryError) as exc:
            raise _unavailable(exc) from None
        return inst

    async def join(self, spec: InstanceSpec) -> tuple[int, int]:
        inst = await self._register(self.members, self.name, member_spec(
            spec.address, spec.port, spec.weight, 0
        ))  # fmt: skip
        await self.set_live(True, "")
        return inst.create_revision, 0

    async def confirm(self, epoch: int) -> bool:
        return True

    async def keepalive(self) -> float:
        return 0.0

    async def claim(self, e: ClaimVip) -> int | None:
        spec = claim_spec(e.vip, self.port, self.name, e.epoch)
        return (await self._register(self.claims, vip_id(e.vip), spec)).mod_revision

    async def handover(self, e: Handover) -> int | None:
        # Stopping (or the track failing): the address is free; its record goes.
        try:
            return await self.backend.deregister(self.claims, vip_id(e.vip))
        except (Unavailable, RegistryError) as exc:
            raise _unavailable(exc) from None

    async def evict(self, member: Member) -> None:
        return None

    async def set_live(self, live: bool, reason: str) -> None:
        status: CheckStatus = "passing" if live else "critical"
        try:
            await self.backend.set_check_status(self.members, self.name, status, reason)
        except (Unavailable, RegistryError) as exc:
            raise _unavailable(exc) from None

    async def leave(self, epoch: int) -> None:
        try:
            await self.backend.deregister(self.members, self.name)
        except (Unavailable, RegistryError) as exc:
            raise _unavailable(exc) from None
