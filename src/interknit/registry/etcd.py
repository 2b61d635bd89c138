"""The etcd registry backend: many nodes, one truth.

``EtcdRegistry`` has the public surface of the embedded ``Registry`` (``state``, ``stale``,
``start``, ``close``, ``subscribe``, the write coroutines, ``changed_since``,
``wait_for_change``), so the API, DNS and proxy cannot tell the two apart.

Theory of operation.

* Reads. Every node keeps the whole registry in a local ``EtcdState``, fed by one watch on the
  prefix. Lookups never touch etcd. The registry revision is etcd's revision (see
  ``etcd_state.py``).
* Writes are etcd transactions that compare what the local copy saw (create and mod revisions
  of the instance's keys) and write only if nothing moved; when something did, the transaction's
  failure branch reads the keys back and the write is planned again (compare-and-swap). A write
  is acknowledged once etcd committed it (a quorum has it) *and* this node's watch delivered it,
  so a client reads its own write from the node it wrote through.
* Ownership. Each node holds a lease (``node_ttl``) and renews it; instances registered through
  a node are attached to that lease, as ZooKeeper's ephemeral nodes are to a session: a node
  that dies takes its instances with it after the lease runs out. The lease id is kept in
  ``data_dir/etcd-lease.json``, so a node restarted within the TTL re-attaches and keeps them.
  A node whose lease ran out while it was cut off (but which is alive) re-registers what it
  lost when it gets a new lease, as Consul's anti-entropy does.
* TTL checks use etcd leases too: a TTL instance has a ``ttl/`` key on a lease of its own with
  the check's TTL (whole seconds, at least etcd's minimum), and a heartbeat through any node
  renews that lease: no write, no revision, no event. When the lease runs out etcd deletes the
  key, and the owning node marks the instance critical. ``deregister_after`` is the owning
  node's timer (critical_since + deregister_after), so it runs where the instance's health is
  decided. Active checks (HTTP, TCP) should run on the owning node only: see ``owns``.
* Staying available. When the watch is down (etcd unreachable, or the member lost its leader)
  the node keeps serving its last copy and ``stale`` is True; writes fail at once with
  ``Unavailable`` (503, nothing changed). The watch resumes at the last applied revision + 1,
  or re-lists when etcd compacted that revision or cancelled the watch for any other reason
  (etcd issue 8668), so nothing acknowledged is lost and no restart is needed.
* A write etcd did not confirm. A transaction that timed out, or whose member lost its leader
  while it waited, may have been applied, and may still be (a member that got it can propose
  it late): "nothing changed" cannot be promised. The node reads the instance's keys back
  (a linearizable read): if etcd holds what the write would have left, the write is answered
  as done; otherwise ``OutcomeUnknown`` (503, ``"outcome": "unknown"``). Writes are
  compare-and-swap, so sending the same registration, heartbeat or health change again is
  safe and converges; a TTL lease granted for such a write is not revoked (if the write was
  applied, revoking it would take the instance's TTL key with it): it runs out by itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import os
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from aetcd import rpc

from interknit.logs import iso_time
from interknit.registry.etcd_client import (
    KV,
    EtcdClient,
    EtcdError,
    EtcdTls,
    EtcdUnavailable,
    cmp_create,
    cmp_mod,
    cmp_not_create,
    op_delete,
    op_get,
    op_put,
)
from interknit.registry.etcd_records import (
    DEFAULT_PREFIX,
    NEVER_CHECKED,
    Health,
    Layout,
    NodeRecord,
    Registration,
    build_instance,
)
from interknit.registry.etcd_state import Change, Entry, EtcdState
from interknit.registry.fanout import Fanout, Listener, ResyncListener
from interknit.registry.metrics import RegistryMetrics
from interknit.registry.model import CheckStatus, Event, Instance, InstanceSpec
from interknit.registry.registry import OutcomeUnknown, Unavailable
from interknit.registry.state import DEFAULT_HISTORY, Conflict, NotFound, RegistryError
from interknit.registry.txn import Delete, Expect, Op, TxnOutcome

log = logging.getLogger("interknit.registry.etcd")

Key = tuple[str, str]
LEASE_FILE = "etcd-lease.json"
MAX_CAS_ATTEMPTS = 8
# How long an acknowledged write waits for this node's watch to deliver it.
APPLY_WAIT = 2.0
_OPERATOR = {"draining": "draining", "maintenance": "maintenance", "passing": None}
_DELETE = rpc.Event.DELETE


@dataclass(frozen=True, slots=True)
class _Step:
    """One planned transaction and the instance it should leave (None: a removal)."""

    compares: list[Any]
    ops: list[Any]
    predicted: Instance | None


def lease_seconds(ttl: float) -> int:
    """etcd leases count whole seconds; never shorter than asked."""
    return max(1, math.ceil(ttl))


class EtcdRegistry:
    def __init__(
        self,
        endpoints: Sequence[str],
        *,
        node_name: str,
        data_dir: str | os.PathLike[str],
        prefix: str = DEFAULT_PREFIX,
        node_ttl: float = 10.0,
        request_timeout: float = 2.0,
        start_timeout: float = 5.0,
        history_size: int = DEFAULT_HISTORY,
        clock: Callable[[], float] = time.time,
        metrics: RegistryMetrics | None = None,
        tls: EtcdTls | None = None,
    ) -> None:
        self.node_name = node_name
        self.layout = Layout(prefix)
        self.state = EtcdState(self.layout, history_size)
        self.node_ttl = lease_seconds(node_ttl)
        self.start_timeout = start_timeout
        self._client = EtcdClient(endpoints, timeout=request_timeout, tls=tls)
        self._lease_path = Path(data_dir) / LEASE_FILE
        self._clock = clock
        self._metrics = metrics
        self.lease_id = 0
        # Watch status: live once a watch stream is established; the reason when it is not.
        self._live = False
        self.stale_reason = "etcd has not been reached yet"
        # Every etcd change up to this revision has been applied to the local copy.
        self._applied = 0
        self._revision_waiters: list[tuple[int, asyncio.Future[None]]] = []
        self._fanout = Fanout(metrics)
        self._tasks: list[asyncio.Task[None]] = []
        self._closed = False
        self._lease_lost = asyncio.Event()
        self._synced = asyncio.Event()
        # Owner work: instances of ours to look at (TTL lost, expiry due), and expiry times.
        self._owner_wake = asyncio.Event()
        self._dirty: set[Key] = set()
        self._due: dict[Key, float] = {}
        # Our instances deleted with our lost lease, to register again under the new one.
        self._orphans: dict[Key, Entry] = {}
        self._stream: Any = None
        self._locks: dict[Key, tuple[asyncio.Lock, int]] = {}
        # Every lease this node has held as its node lease: only instances under one of them
        # are this node's to register again after a lease is lost (not those under a lease a
        # consumer took with grant_lease, nor those under none).
        self._node_leases: set[int] = set()

    # ------------------------------------------------------------------ status

    @property
    def stale(self) -> bool:
        """True while the local copy may be behind etcd (the watch is down)."""
        return not self._live

    def owns(self, service: str, instance_id: str) -> bool:
        """True if this node owns the instance: its active checks run here and nowhere else."""
        return self.state.owner(service, instance_id) == self.node_name

    def cluster(self) -> dict[str, Any]:
        """The nodes sharing this registry (each holds a ``nodes/`` key under its lease) and
        the etcd members this node talks to, for the status page."""
        nodes = []
        for name, kv in sorted(self.state.nodes.items()):
            try:
                started = float(json.loads(kv.value).get("started"))
            except (ValueError, TypeError, AttributeError):
                started = None
            nodes.append(
                {
                    "node": name,
                    "this_node": name == self.node_name,
                    "started": None if started is None else iso_time(started),
                    "lease": f"{kv.lease:x}",
                    "instances": sum(
                        1 for e in self.state.entries.values() if e.owner == name and e.reg
                    ),
                }
            )
        return {
            "backend": "etcd",
            "etcd": list(self._client.targets),
            "talking_to": self._client.target,
            "stale": self.stale,
            "stale_reason": self.stale_reason if self.stale else None,
            "nodes": nodes,
        }

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        """Take (or take back) this node's lease and load the registry; if etcd cannot be
        reached within ``start_timeout`` the node starts stale and keeps trying."""
        self._tasks = [
            asyncio.create_task(self._lease_loop(), name="etcd-lease"),
            asyncio.create_task(self._watch_loop(), name="etcd-watch"),
            asyncio.create_task(self._owner_loop(), name="etcd-owner"),
        ]
        try:
            async with asyncio.timeout(self.start_timeout):
                await self._synced.wait()
        except TimeoutError:
            log.error(
                "etcd not reachable at start; serving stale until it is",
                extra={"event": "etcd.unreachable", "endpoints": self._client.targets},
            )

    async def close(self, *, revoke: bool = False) -> None:
        """Stop. The node's lease is left to run (a quick restart keeps its instances) unless
        ``revoke``: then its instances go at once."""
        if self._closed:
            return
        self._closed = True
        tasks = list(self._tasks)
        # End the gRPC stream first: a task cancelled while gRPC reads its stream may not
        # finish until the call itself is cancelled.
        if self._stream is not None:
            self._stream.cancel()
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks, timeout=2.0)
        if revoke and self.lease_id:
            with contextlib.suppress(EtcdUnavailable, EtcdError):
                await self._client.revoke(self.lease_id)
            with contextlib.suppress(OSError):
                self._lease_path.unlink()
        self._fanout.wake_waiters()
        for _, fut in self._revision_waiters:
            if not fut.done():
                fut.set_result(None)
        await self._client.close()

    def subscribe(self, listener: Listener, on_resync: ResyncListener | None = None) -> None:
        self._fanout.subscribe(listener, on_resync)

    # ------------------------------------------------------------------ writes

    async def register(
        self, service: str, instance_id: str, spec: InstanceSpec
    ) -> tuple[Instance, int]:
        self._check_writable()
        current = self.state.entry(service, instance_id)
        registered = current.registration if current is not None else None
        if registered is not None and registered.spec == spec:
            if spec.check is not None and spec.check.ttl is not None:
                await self._renew(service, instance_id)
            return self._current(service, instance_id)
        ttl_lease = 0
        if spec.check is not None and spec.check.ttl is not None:
            ttl_lease = await self._grant(lease_seconds(spec.check.ttl))
        now = self._clock()
        lease = self.lease_id
        keys = self._keys(service, instance_id)

        def plan(cur: Entry | None) -> _Step | None:
            reg = cur.registration if cur is not None else None
            if reg is not None and reg.spec == spec:
                return None
            if cur is not None and cur.health_record is not None and reg is not None:
                same_check = reg.spec.check == spec.check
                health = cur.health_record if same_check else Health.initial(spec, now)
            else:
                health = Health.initial(spec, now)
            registration = Registration(spec, self.node_name)
            compares = [
                cmp_create(keys[0], _create(cur, "reg")),
                cmp_mod(keys[0], _mod(cur, "reg")),
                cmp_mod(keys[1], _mod(cur, "health")),
            ]
            ops = [
                op_put(keys[0], registration.encode(), lease),
                op_put(keys[1], health.encode(), lease),
            ]
            if ttl_lease:
                ops.append(op_put(keys[2], b"", ttl_lease))
            elif cur is not None and cur.ttl is not None:
                ops.append(op_delete(keys[2]))
            create = _create(cur, "reg") or 0
            predicted = build_instance(service, instance_id, registration, health, create, 0)
            return _Step(compares, ops, predicted)

        old_ttl = current.ttl.lease if current is not None and current.ttl is not None else 0
        try:
            result = await self._transact(service, instance_id, plan)
        except OutcomeUnknown:
            raise  # the TTL key may hold ttl_lease now: left to run out, not revoked
        except BaseException:
            if ttl_lease:
                self._background_revoke(ttl_lease)
            raise
        if result is None:
            if ttl_lease:
                self._background_revoke(ttl_lease)
        elif old_ttl and old_ttl != ttl_lease:
            self._background_revoke(old_ttl)
        return self._current(service, instance_id, result)

    async def deregister(self, service: str, instance_id: str) -> int:
        self._check_writable()
        keys = self._keys(service, instance_id)
        entry = self.state.entry(service, instance_id)
        old_ttl = entry.ttl.lease if entry is not None and entry.ttl is not None else 0

        def plan(cur: Entry | None) -> _Step | None:
            if cur is None or cur.reg is None:
                raise self._not_found(service, instance_id)
            compares = [cmp_create(keys[0], cur.reg.create_revision)]
            return _Step(compares, [op_delete(k) for k in keys], None)

        result = await self._transact(service, instance_id, plan)
        if old_ttl:
            self._background_revoke(old_ttl)
        return self.state.revision if result is None else max(self.state.revision, result[0])

    async def heartbeat(self, service: str, instance_id: str) -> tuple[Instance, int]:
        self._check_writable()
        inst = await self._require(service, instance_id)
        check = inst.spec.check
        if check is None or check.ttl is None:
            raise Conflict(
                f"instance {service}/{instance_id} has no ttl check to renew",
                {"field": "check"},
            )
        result = await self._renew(service, instance_id)
        return self._current(service, instance_id, result)

    async def set_operator(
        self, service: str, instance_id: str, status: str
    ) -> tuple[Instance, int]:
        self._check_writable()
        await self._require(service, instance_id)
        if status not in _OPERATOR:
            raise RegistryError(
                "status: must be one of draining, maintenance, passing", {"field": "status"}
            )
        operator = _OPERATOR[status]

        def change(cur: Entry) -> Health | None:
            health = _health(cur)
            if health.operator == operator:
                return None
            return _evolve(health, operator=operator, reason="health")

        result = await self._write_health(service, instance_id, change, missing_ok=False)
        return self._current(service, instance_id, result)

    async def set_check_status(
        self, service: str, instance_id: str, status: CheckStatus, output: str
    ) -> None:
        self._check_writable()
        now = self._clock()

        def change(cur: Entry) -> Health | None:
            health = _health(cur)
            if health.check_status == status:
                # The first result of an instance never checked is written all the same.
                if health.output != NEVER_CHECKED or output == NEVER_CHECKED:
                    return None
                return _evolve(health, output=output, reason="health")
            since = None
            if status == "critical":
                since = health.critical_since if health.critical_since is not None else now
            return _evolve(
                health, check_status=status, output=output, critical_since=since, reason="health"
            )

        await self._write_health(service, instance_id, change, missing_ok=True)

    async def set_ejected(self, service: str, instance_id: str, until: float | None) -> None:
        self._check_writable()

        def change(cur: Entry) -> Health | None:
            health = _health(cur)
            if health.ejected_until == until:
                return None
            return _evolve(health, ejected_until=until, reason="eject")

        await self._write_health(service, instance_id, change, missing_ok=True)

    # ------------------------------------------------------------------ leases and txns

    async def grant_lease(self, ttl: float) -> int:
        """A lease of the caller's own (see ``txn.py``)."""
        if self._closed:
            raise Unavailable("the registry is shutting down")
        return await self._grant(lease_seconds(ttl))

    async def keep_lease(self, lease: int) -> float:
        try:
            return float(await self._client.keepalive(lease))
        except EtcdUnavailable as exc:
            raise Unavailable(f"etcd cannot be reached: {exc}") from None
        except EtcdError as exc:
            raise Unavailable(str(exc)) from None

    async def revoke_lease(self, lease: int) -> None:
        try:
            await self._client.revoke(lease)
        except EtcdUnavailable as exc:
            raise Unavailable(f"etcd cannot be reached: {exc}") from None

    async def transact(self, expect: Sequence[Expect], ops: Sequence[Op]) -> TxnOutcome:
        """Apply ``ops`` if every expectation holds, in one etcd transaction (see ``txn.py``).
        Unlike ``register`` it does not wait for this node's copy to show the result: the
        caller acts on the outcome."""
        if self._closed:
            raise Unavailable("the registry is shutting down")
        compares: list[Any] = []
        for e in expect:
            key = self.layout.instance(e.service, e.id)
            if e.created is not None:
                compares.append(cmp_create(key, e.created))
            if e.modified is not None:
                compares.append(cmp_mod(key, e.modified))
            if e.not_created is not None:
                compares.append(cmp_not_create(key, e.not_created))
        writes: list[Any] = []
        now = self._clock()
        for op in ops:
            keys = self._keys(op.service, op.id)
            if isinstance(op, Delete):
                writes.extend(op_delete(k) for k in keys)
                continue
            if op.spec.check is not None and op.spec.check.ttl is not None:
                raise ValueError("transact does not put instances with a ttl check")
            registration = Registration(op.spec, self.node_name)
            health = Health.initial(op.spec, now)
            writes.append(op_put(keys[0], registration.encode(), op.lease))
            writes.append(op_put(keys[1], health.encode(), op.lease))
            writes.append(op_delete(keys[2]))
        try:
            result = await self._client.txn(compares, writes)
        except EtcdUnavailable as exc:
            raise Unavailable(f"etcd cannot be reached: {exc}") from None
        except EtcdError as exc:
            if "lease not found" in str(exc):
                raise Conflict("the lease of a put no longer exists", {"field": "lease"}) from None
            raise Unavailable(str(exc)) from None
        return TxnOutcome(result.succeeded, result.revision)

    # ------------------------------------------------------------------ write helpers

    def _check_writable(self) -> None:
        if self._closed:
            raise Unavailable("the registry is shutting down")
        if not self._live:
            raise Unavailable(
                f"etcd cannot be reached: writes are refused until it is ({self.stale_reason})",
                {"stale": True},
            )
        if not self.lease_id:
            raise Unavailable("etcd cannot be reached: this node holds no etcd lease yet")

    def _keys(self, service: str, instance_id: str) -> tuple[bytes, bytes, bytes]:
        layout = self.layout
        return (
            layout.instance(service, instance_id),
            layout.health(service, instance_id),
            layout.ttl(service, instance_id),
        )

    def _not_found(self, service: str, instance_id: str) -> NotFound:
        if not self.state.has_service(service):
            return NotFound(f"service {service!r} is not registered", {"service": service})
        return NotFound(
            f"instance {instance_id!r} of service {service!r} is not registered",
            {"service": service, "id": instance_id},
        )

    async def _require(self, service: str, instance_id: str) -> Instance:
        """The instance from the local copy; if the copy lacks it, ask etcd whether it exists
        (registered through another node a moment ago) and wait for the copy to catch up."""
        inst = self.state.get(service, instance_id)
        if inst is None:
            entry = await self._read(service, instance_id)
            if entry is not None and entry.reg is not None:
                await self._wait_applied(entry.reg.mod_revision)
                inst = self.state.get(service, instance_id)
        if inst is None:
            raise self._not_found(service, instance_id)
        return inst

    async def _read(self, service: str, instance_id: str) -> Entry | None:
        """The instance's keys as etcd holds them now (a linearizable read)."""
        try:
            result = await self._client.txn(
                [], [op_get(k) for k in self._keys(service, instance_id)]
            )
        except EtcdUnavailable as exc:
            raise Unavailable(f"etcd cannot be reached: {exc}") from None
        except EtcdError as exc:
            raise Unavailable(str(exc)) from None
        return _entry_from(result.ranges)

    def _current(
        self, service: str, instance_id: str, result: tuple[int, Instance | None] | None = None
    ) -> tuple[Instance, int]:
        inst = self.state.get(service, instance_id)
        if result is not None:
            revision, predicted = result
            if (inst is None or inst.mod_revision < revision) and predicted is not None:
                # The watch has not delivered our own write yet: answer with what we wrote.
                create = predicted.create_revision or revision
                return predicted.evolve(mod_revision=revision, create_revision=create), revision
            if inst is not None:
                return inst, max(revision, self.state.revision)
        if inst is None:
            raise self._not_found(service, instance_id)
        return inst, self.state.revision

    async def _write_health(
        self,
        service: str,
        instance_id: str,
        change: Callable[[Entry], Health | None],
        *,
        missing_ok: bool,
    ) -> tuple[int, Instance | None] | None:
        keys = self._keys(service, instance_id)

        def plan(cur: Entry | None) -> _Step | None:
            if cur is None or cur.reg is None or cur.registration is None:
                if missing_ok:
                    return None
                raise self._not_found(service, instance_id)
            health = change(cur)
            if health is None:
                return None
            compares = [
                cmp_create(keys[0], cur.reg.create_revision),
                cmp_mod(keys[1], _mod(cur, "health")),
            ]
            # The health key shares the registration's lease: it goes with its instance.
            ops = [op_put(keys[1], health.encode(), cur.reg.lease)]
            predicted = build_instance(
                service, instance_id, cur.registration, health, cur.reg.create_revision, 0
            )
            return _Step(compares, ops, predicted)

        return await self._transact(service, instance_id, plan)

    async def _renew(self, service: str, instance_id: str) -> tuple[int, Instance | None] | None:
        """A heartbeat: renew the TTL key's lease; if it ran out, give the key a new lease, and
        turn the instance passing again."""
        entry = self.state.entry(service, instance_id)
        check = entry.registration.spec.check if entry and entry.registration else None
        if entry is None or check is None or check.ttl is None:
            raise self._not_found(service, instance_id)
        if entry.ttl is not None:
            try:
                remaining = await self._client.keepalive(entry.ttl.lease)
            except EtcdUnavailable as exc:
                raise Unavailable(f"etcd cannot be reached: {exc}") from None
            if remaining > 0 and _health(entry).check_status == "passing":
                return None
        new_lease = await self._grant(lease_seconds(check.ttl))
        keys = self._keys(service, instance_id)

        def plan(cur: Entry | None) -> _Step | None:
            if cur is None or cur.reg is None or cur.registration is None:
                raise self._not_found(service, instance_id)
            compares = [
                cmp_create(keys[0], cur.reg.create_revision),
                cmp_mod(keys[2], _mod(cur, "ttl")),
                cmp_mod(keys[1], _mod(cur, "health")),
            ]
            ops = [op_put(keys[2], b"", new_lease)]
            health = _health(cur)
            if health.check_status != "passing":
                health = _evolve(
                    health,
                    check_status="passing",
                    output="heartbeat",
                    critical_since=None,
                    reason="health",
                )
                ops.append(op_put(keys[1], health.encode(), cur.reg.lease))
            predicted = build_instance(
                service, instance_id, cur.registration, health, cur.reg.create_revision, 0
            )
            return _Step(compares, ops, predicted)

        try:
            return await self._transact(service, instance_id, plan)
        except OutcomeUnknown:
            raise  # as in register: the TTL key may hold new_lease now
        except BaseException:
            self._background_revoke(new_lease)
            raise

    async def _transact(
        self,
        service: str,
        instance_id: str,
        plan: Callable[[Entry | None], _Step | None],
    ) -> tuple[int, Instance | None] | None:
        """Plan against the local copy, commit if etcd still agrees, else re-plan against what
        etcd holds. None if the plan found nothing to do; else (revision, predicted)."""
        key = (service, instance_id)
        lock, users = self._locks.get(key) or (asyncio.Lock(), 0)
        self._locks[key] = (lock, users + 1)
        try:
            # Writes to one instance through this node go one at a time (as the embedded
            # registry's writer does); compare-and-swap settles races with other nodes.
            async with lock:
                return await self._transact_locked(service, instance_id, plan)
        finally:
            lock, users = self._locks[key]
            if users <= 1:
                del self._locks[key]
            else:
                self._locks[key] = (lock, users - 1)

    async def _transact_locked(
        self,
        service: str,
        instance_id: str,
        plan: Callable[[Entry | None], _Step | None],
    ) -> tuple[int, Instance | None] | None:
        keys = self._keys(service, instance_id)
        entry = self.state.entry(service, instance_id)
        cur = None if entry is None else _copy(entry)
        seen = 0
        if cur is None:
            try:
                plan(cur)
            except NotFound:
                # Not in the local copy: it may be in etcd already, written through another
                # node a moment ago. Plan against etcd itself.
                cur = await self._read(service, instance_id)
        for attempt in range(MAX_CAS_ATTEMPTS):
            step = plan(cur)
            if step is None:
                if seen:
                    # etcd already holds what was asked; let the local copy catch up to it so
                    # the answer is read from it.
                    await self._wait_applied(seen)
                return None
            try:
                result = await self._client.txn(step.compares, step.ops, [op_get(k) for k in keys])
            except EtcdUnavailable as exc:
                if not exc.sent:
                    raise Unavailable(f"etcd cannot be reached: {exc}") from None
                revision = await self._confirm(keys, step)
                if revision is None:
                    raise OutcomeUnknown(
                        f"etcd did not confirm the write ({exc}): it may have been applied, "
                        "or may still be; sending it again is safe",
                        {"service": service, "id": instance_id},
                    ) from None
                await self._wait_applied(revision)
                return revision, step.predicted
            except EtcdError as exc:
                if "lease not found" in str(exc):
                    self._lease_lost.set()
                    raise Unavailable(
                        "this node's etcd lease ran out; it is taking a new one, try again"
                    ) from None
                raise Unavailable(str(exc)) from None
            if result.succeeded:
                await self._wait_applied(result.revision)
                return result.revision, step.predicted
            cur = _entry_from(result.ranges)
            seen = result.revision
            # Another node wrote this instance meanwhile: step aside a moment, at random, so
            # two nodes do not keep colliding in lock-step.
            await asyncio.sleep(random.uniform(0, 0.005 * (1 + attempt)))
        raise Conflict(
            f"instance {service}/{instance_id} kept changing under concurrent writes; try again",
            {"service": service, "id": instance_id},
        )

    async def _confirm(self, keys: tuple[bytes, bytes, bytes], step: _Step) -> int | None:
        """After a transaction etcd did not answer: the revision at which etcd holds what
        ``step`` would have left (its puts' values and leases, its deletes gone), or None if it
        does not, or cannot be asked."""
        try:
            now = await self._client.txn([], [op_get(k) for k in keys])
        except (EtcdUnavailable, EtcdError):
            return None
        held = {k: (kvs[0] if kvs else None) for k, kvs in zip(keys, now.ranges, strict=True)}
        newest = 0
        for op in step.ops:
            which = op.WhichOneof("request")
            if which == "request_put":
                put = op.request_put
                kv = held.get(bytes(put.key))
                if kv is None or kv.value != bytes(put.value):
                    return None
                if not put.ignore_lease and kv.lease != put.lease:
                    return None
                newest = max(newest, kv.mod_revision)
            elif (
                which == "request_delete_range"
                and held.get(bytes(op.request_delete_range.key)) is not None
            ):
                return None
        return newest or now.revision

    async def _grant(self, ttl: int) -> int:
        try:
            lease_id, _ = await self._client.grant(ttl)
        except (EtcdUnavailable, EtcdError) as exc:
            raise Unavailable(f"etcd cannot be reached: {exc}") from None
        return lease_id

    def _background_revoke(self, lease_id: int) -> None:
        async def revoke() -> None:
            with contextlib.suppress(EtcdUnavailable, EtcdError):
                await self._client.revoke(lease_id)

        if not self._closed:
            task = asyncio.create_task(revoke())
            self._tasks.append(task)
            task.add_done_callback(self._forget_task)

    def _forget_task(self, task: asyncio.Task[None]) -> None:
        with contextlib.suppress(ValueError):
            self._tasks.remove(task)

    async def _wait_applied(self, revision: int) -> None:
        if self._applied >= revision:
            return
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._revision_waiters.append((revision, fut))
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(APPLY_WAIT):
                await fut

    def _advance(self, revision: int) -> None:
        if revision <= self._applied:
            return
        self._applied = revision
        if self._revision_waiters:
            keep = []
            for rev, fut in self._revision_waiters:
                if rev <= revision:
                    if not fut.done():
                        fut.set_result(None)
                else:
                    keep.append((rev, fut))
            self._revision_waiters = keep

    # ------------------------------------------------------------------ the node lease

    async def _lease_loop(self) -> None:
        interval = max(self.node_ttl / 3.0, 0.2)
        while True:
            try:
                if not self.lease_id:
                    await self._take_lease()
                remaining = await self._client.keepalive(self.lease_id)
                if remaining <= 0:
                    log.warning(
                        "etcd lease ran out; taking a new one",
                        extra={"event": "etcd.lease_lost", "lease": self.lease_id},
                    )
                    self.lease_id = 0
                    continue
                if self._orphans:
                    # The watch showed what the old lease took after we took a new one.
                    await self._readopt_orphans()
            except (EtcdUnavailable, EtcdError) as exc:
                log.debug("etcd lease renewal failed: %s", exc)
                await asyncio.sleep(min(interval, 0.5))
                continue
            # Renew every third of the TTL, or at once when the watch saw our lease go.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(interval):
                    await self._lease_lost.wait()
            self._lease_lost.clear()

    async def _take_lease(self) -> None:
        """Re-attach to the lease this node held before a restart, or grant a new one."""
        lease_id = self._saved_lease()
        if lease_id and await self._client.keepalive(lease_id) > 0:
            log.info(
                "re-attached to this node's etcd lease",
                extra={"event": "etcd.lease_reattached", "lease": lease_id},
            )
        else:
            lease_id, _ = await self._client.grant(self.node_ttl)
            self._save_lease(lease_id)
        record = NodeRecord(self.node_name, lease_id, self._clock())
        self._node_leases.add(lease_id)
        await self._client.put(self.layout.node(self.node_name), record.encode(), lease_id)
        self.lease_id = lease_id
        await self._readopt_orphans()
        if self._live:
            self._synced.set()

    def _saved_lease(self) -> int:
        try:
            data = json.loads(self._lease_path.read_text())
        except (OSError, ValueError):
            return 0
        if data.get("node") != self.node_name or data.get("prefix") != self.layout.prefix:
            return 0
        return int(data.get("lease", 0))

    def _save_lease(self, lease_id: int) -> None:
        body = {"node": self.node_name, "prefix": self.layout.prefix, "lease": lease_id}
        try:
            self._lease_path.parent.mkdir(parents=True, exist_ok=True)
            tmp = self._lease_path.with_suffix(".tmp")
            tmp.write_text(json.dumps(body))
            os.replace(tmp, self._lease_path)
        except OSError as exc:
            log.error("cannot save the etcd lease id: %s", exc)

    async def _readopt_orphans(self) -> None:
        """Register again, under the new lease, our instances that went with the old one."""
        orphans, self._orphans = self._orphans, {}
        for (service, instance_id), entry in orphans.items():
            if entry.reg is None or entry.registration is None:
                continue
            keys = self._keys(service, instance_id)
            ops = [op_put(keys[0], entry.reg.value, self.lease_id)]
            if entry.health is not None:
                ops.append(op_put(keys[1], entry.health.value, self.lease_id))
            try:
                await self._client.txn([cmp_create(keys[0], 0)], ops)
            except (EtcdUnavailable, EtcdError):
                self._orphans[(service, instance_id)] = entry
        if orphans:
            log.info(
                "re-registered instances lost with the old etcd lease",
                extra={"event": "etcd.readopted", "instances": len(orphans)},
            )

    # ------------------------------------------------------------------ the watch

    async def _watch_loop(self) -> None:
        prefix = self.layout.prefix_bytes
        need_list = True
        backoff = 0.05
        while True:
            try:
                if need_list:
                    kvs, revision = await self._client.get_prefix(prefix)
                    self._reset(kvs, revision)
                    need_list = False
                stream = self._client.watch(prefix, self._applied + 1)
                self._stream = stream
                try:
                    need_list = await self._follow(stream)
                finally:
                    stream.cancel()
                    self._stream = None
            except EtcdUnavailable as exc:
                self._set_live(False, str(exc))
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 1.0)
                continue
            except Exception as exc:
                # etcd refused (EtcdError) or a record did not decode: start over from a list.
                log.exception("etcd watch failed; re-listing")
                self._set_live(False, str(exc))
                need_list = True
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 1.0)
                continue
            backoff = 0.05

    async def _follow(self, stream: Any) -> bool:
        """Apply one watch stream's responses; True when a re-list is needed."""
        async for response in stream.responses():
            if response.compact_revision or response.canceled:
                log.warning(
                    "etcd watch cancelled; re-listing",
                    extra={
                        "event": "etcd.relist",
                        "compact_revision": int(response.compact_revision),
                        "reason": response.cancel_reason,
                    },
                )
                return True
            if response.created:
                self._set_live(True, "")
                continue
            if response.events:
                changes = [Change(KV.from_pb(e.kv), e.type == _DELETE) for e in response.events]
                self._apply(changes)
            else:
                # A progress notification: everything up to the header's revision was sent.
                self._advance(int(response.header.revision))
        return False

    def _set_live(self, live: bool, reason: str) -> None:
        if live == self._live:
            return
        self._live = live
        self.stale_reason = reason
        if live:
            log.info("etcd watch established", extra={"event": "etcd.live"})
            if self.lease_id:
                self._synced.set()
            self._owner_wake.set()
        else:
            log.warning(
                "etcd unreachable; serving the last copy as stale",
                extra={"event": "etcd.stale", "error": reason},
            )

    def _reset(self, kvs: list[KV], revision: int) -> None:
        vanished = self.state.reset(kvs, revision)
        mine = self.node_name
        node = self.state.nodes.get(mine)
        for key, entry in vanished.items():
            if (
                entry.owner == mine
                and entry.reg is not None
                and entry.reg.lease in self._node_leases
            ):
                lost_lease = node is None or node.lease != entry.reg.lease
                if lost_lease:
                    self._orphans[key] = entry
        if self._orphans and (node is None or node.lease != self.lease_id):
            self._lease_lost.set()
        self._advance(revision)
        self._fanout.resynced()
        self._dirty.update(k for k, e in self.state.entries.items() if e.owner == mine)
        self._owner_wake.set()

    def _apply(self, changes: list[Change]) -> None:
        applied = self.state.apply(changes)
        mine = self.node_name
        for key, entry in applied.lease_expired.items():
            if entry.owner == mine:
                self._orphans[key] = entry
        if mine in applied.nodes_deleted:
            self._lease_lost.set()
        for key in applied.touched:
            if self.state.owner(*key) == mine:
                self._dirty.add(key)
            else:
                self._due.pop(key, None)
        if self._dirty:
            self._owner_wake.set()
        if applied.events:
            self._publish(applied.events)
        self._advance(changes[-1].revision)

    def _publish(self, events: list[Event]) -> None:
        self._fanout.publish(events)

    # ------------------------------------------------------------------ owner duties

    async def _owner_loop(self) -> None:
        while True:
            delay = 5.0
            if self._due:
                delay = max(0.0, min(min(self._due.values()) - self._clock(), 5.0))
            # asyncio.timeout, not wait_for: on 3.11 wait_for can swallow a cancellation that
            # arrives as the event is set, and close() would wait for nothing.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(delay):
                    await self._owner_wake.wait()
            self._owner_wake.clear()
            if not self._live or not self.lease_id:
                continue
            now = self._clock()
            keys = self._dirty | {k for k, due in self._due.items() if due <= now}
            self._dirty = set()
            for key in keys:
                try:
                    await self._owner_duty(key, now)
                except RegistryError as exc:
                    log.debug("owner duty for %s/%s deferred: %s", *key, exc)
                    self._dirty.add(key)
                except Exception:
                    log.exception("owner duty for %s/%s failed", *key)
            if self._dirty:
                await asyncio.sleep(0.2)

    async def _owner_duty(self, key: Key, now: float) -> None:
        service, instance_id = key
        self._due.pop(key, None)
        entry = self.state.entry(service, instance_id)
        inst = self.state.get(service, instance_id)
        if entry is None or inst is None or entry.owner != self.node_name:
            return
        check = inst.spec.check
        if check is None:
            return
        if check.ttl is not None and entry.ttl is None and inst.check_status != "critical":
            await self._mark_lease_expired(service, instance_id, check.ttl, now)
            return
        if (
            inst.check_status == "critical"
            and check.deregister_after is not None
            and inst.critical_since is not None
        ):
            due = inst.critical_since + check.deregister_after
            if due > now:
                self._due[key] = due
                return
            await self._expire(service, instance_id, now)

    async def _mark_lease_expired(
        self, service: str, instance_id: str, ttl: float, now: float
    ) -> None:
        keys = self._keys(service, instance_id)

        def plan(cur: Entry | None) -> _Step | None:
            if cur is None or cur.reg is None or cur.registration is None or cur.ttl is not None:
                return None
            health = _health(cur)
            if health.check_status == "critical":
                return None
            health = _evolve(
                health,
                check_status="critical",
                output=f"ttl of {ttl:g}s expired without a heartbeat",
                critical_since=now,
                reason="lease",
            )
            compares = [
                cmp_create(keys[0], cur.reg.create_revision),
                cmp_mod(keys[1], _mod(cur, "health")),
                cmp_mod(keys[2], 0),
            ]
            return _Step(compares, [op_put(keys[1], health.encode(), cur.reg.lease)], None)

        await self._transact(service, instance_id, plan)

    async def _expire(self, service: str, instance_id: str, now: float) -> None:
        keys = self._keys(service, instance_id)

        def plan(cur: Entry | None) -> _Step | None:
            if cur is None or cur.reg is None or cur.registration is None:
                return None
            health = _health(cur)
            check = cur.registration.spec.check
            if (
                health.check_status != "critical"
                or health.critical_since is None
                or check is None
                or check.deregister_after is None
                or health.critical_since + check.deregister_after > now
            ):
                return None
            compares = [
                cmp_create(keys[0], cur.reg.create_revision),
                cmp_mod(keys[1], _mod(cur, "health")),
            ]
            return _Step(compares, [op_delete(k) for k in keys], None)

        await self._transact(service, instance_id, plan)

    # ------------------------------------------------------------------ watching

    def wake_all(self) -> None:
        """Answer every blocking query now and every later one at once (the node is stopping:
        a graceful stop must not wait out their ``wait``)."""
        self._fanout.wake_all()

    def changed_since(self, service: str | None, revision: int) -> bool:
        if service is None:
            return self.state.revision > revision
        return self.state.service_revision(service) > revision

    async def wait_for_change(self, service: str | None, revision: int, timeout: float) -> bool:
        """Wait until ``service`` (or anything, for None) changes after ``revision``."""
        return await self._fanout.wait(
            service, lambda: self.changed_since(service, revision), timeout
        )


# ---------------------------------------------------------------------- small helpers


def _copy(entry: Entry) -> Entry:
    return Entry(entry.reg, entry.health, entry.ttl, entry.registration, entry.health_record)


def _entry_from(ranges: list[list[KV]]) -> Entry | None:
    """The instance's keys as the failure branch read them (instance, health, ttl)."""
    entry = Entry()
    for kind, found in zip(("instances", "health", "ttl"), ranges, strict=False):
        entry.set(kind, found[0] if found else None)
    return None if entry.empty else entry


def _create(entry: Entry | None, which: str) -> int:
    kv = None if entry is None else getattr(entry, which)
    return 0 if kv is None else int(kv.create_revision)


def _mod(entry: Entry | None, which: str) -> int:
    kv = None if entry is None else getattr(entry, which)
    return 0 if kv is None else int(kv.mod_revision)


def _health(entry: Entry) -> Health:
    if entry.health_record is not None:
        return entry.health_record
    assert entry.registration is not None
    return Health.initial(entry.registration.spec, 0.0)


def _evolve(health: Health, **changes: Any) -> Health:
    return replace(health, **changes)
