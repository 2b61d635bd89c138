"""The local copy of an etcd-backed registry: a ``RegistryState`` fed by etcd's keys.

Rules of this file:

* Nothing here decides anything: etcd already did. This file turns etcd's key changes into
  the registry's instances and events, the same values the embedded state produces, so every
  consumer (API, DNS, proxy) reads one kind of state whatever the backend.
* The registry revision IS etcd's revision: an event carries the mod revision of the keys that
  made it, and ``revision`` is the revision of the last applied change (or of the last full
  list). Every node therefore names the same change with the same number, and a client can
  move its watch from one node to another.
* No IO, no clock: the shell hands in key changes and full listings.

Differences from the embedded state, and why. etcd's revisions are not consecutive here (other
keys, node leases, TTL keys move them too), and one etcd revision may hold several registry
events (a transaction, or a lease expiry deleting every instance of a node at once), so the
history is searched by revision with bisection instead of by offset. The write methods of
``RegistryState`` (register, heartbeat, tick...) are not used: writes go to etcd as
transactions and come back through ``apply``.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from interknit.registry.etcd_client import KV
from interknit.registry.etcd_records import Health, Layout, Registration, build_instance
from interknit.registry.model import Event, EventReason, Instance
from interknit.registry.state import DEFAULT_HISTORY, RegistryState

Key = tuple[str, str]


@dataclass(frozen=True, slots=True)
class Change:
    """One key event from a watch: ``kv`` is the new key, or for a delete only its name and the
    deleting revision (``kv.mod_revision``)."""

    kv: KV
    deleted: bool

    @property
    def revision(self) -> int:
        return self.kv.mod_revision


@dataclass(slots=True)
class Entry:
    """What etcd holds for one instance: its three keys as last seen (None: absent)."""

    reg: KV | None = None
    health: KV | None = None
    ttl: KV | None = None
    registration: Registration | None = None
    health_record: Health | None = None

    def instance(self, service: str, instance_id: str) -> Instance | None:
        if self.reg is None or self.registration is None:
            return None
        mod = max(self.reg.mod_revision, self.health.mod_revision if self.health else 0)
        return build_instance(
            service, instance_id, self.registration, self.health_record,
            self.reg.create_revision, mod,
        )  # fmt: skip

    @property
    def owner(self) -> str | None:
        return None if self.registration is None else self.registration.owner

    def set(self, kind: str, kv: KV | None) -> None:
        if kind == "instances":
            self.reg = kv
            self.registration = None if kv is None else Registration.decode(kv.value)
        elif kind == "health":
            self.health = kv
            self.health_record = None if kv is None else Health.decode(kv.value)
        elif kind == "ttl":
            self.ttl = kv

    @property
    def empty(self) -> bool:
        return self.reg is None and self.health is None and self.ttl is None


@dataclass(slots=True)
class Applied:
    """What one ``apply`` did: registry events, and the instances removed together with their
    node's lease (lease expiry) with the entry they had, for the owner to re-register."""

    events: list[Event] = field(default_factory=list)
    lease_expired: dict[Key, Entry] = field(default_factory=dict)
    touched: set[Key] = field(default_factory=set)
    nodes_deleted: set[str] = field(default_factory=set)


class EtcdState(RegistryState):
    def __init__(self, layout: Layout, history_size: int = DEFAULT_HISTORY) -> None:
        super().__init__(history_size, 0)
        self.layout = layout
        self.entries: dict[Key, Entry] = {}
        self.nodes: dict[str, KV] = {}
        # Events after this revision are all in the history.
        self._floor = 0

    # ------------------------------------------------------------------ reads

    def entry(self, service: str, instance_id: str) -> Entry | None:
        return self.entries.get((service, instance_id))

    def owner(self, service: str, instance_id: str) -> str | None:
        entry = self.entries.get((service, instance_id))
        return None if entry is None else entry.owner

    def oldest_revision(self) -> int:
        history = self._history
        if len(history) > self.history_size:
            return history[len(history) - self.history_size - 1].revision
        return self._floor

    def events_since(
        self, revision: int, service: str | None = None
    ) -> tuple[list[Event], int] | None:
        if revision >= self.revision:
            return [], self.revision
        if revision < self.oldest_revision():
            return None
        start = bisect.bisect_right(self._history, revision, key=lambda e: e.revision)
        events = self._history[start:]
        if service is not None:
            events = [e for e in events if e.instance.service == service]
        return events, self.revision

    def next_deadline(self) -> float | None:
        return None  # leases and expiry are etcd's and the owning node's business

    # ------------------------------------------------------------------ changes from etcd

    def reset(self, kvs: Iterable[KV], revision: int) -> dict[Key, Entry]:
        """Replace everything with a full listing read at ``revision``.

        Returns the entries that vanished since the last copy (the caller decides whether they
        were its own and were lost with its lease)."""
        old_entries = self.entries
        old_services = set(self._services)
        self._services = {}
        self._history = []
        self._lease = {}
        self._timers = []
        self.entries = {}
        self.nodes = {}
        for kv in kvs:
            parsed = self.layout.parse(kv.key)
            if parsed is None:
                continue
            kind, service, instance_id = parsed
            if kind == "nodes":
                self.nodes[service] = kv
                continue
            self.entries.setdefault((service, instance_id), Entry()).set(kind, kv)
        for (service, instance_id), entry in self.entries.items():
            inst = entry.instance(service, instance_id)
            if inst is not None:
                self._services.setdefault(service, {})[instance_id] = inst
        # Anything may have changed while we were away: every service, present or gone, moves
        # to the listing's revision so that blocked watchers compare correctly.
        self._service_revision = {name: revision for name in old_services | set(self._services)}
        self.revision = max(self.revision, revision)
        self._floor = self.revision
        self._history_first = self.revision + 1
        vanished = {k: e for k, e in old_entries.items() if k not in self.entries}
        return vanished

    def apply(self, changes: Sequence[Change]) -> Applied:
        """Apply watch events (in revision order); the registry events they make."""
        out = Applied()
        i = 0
        while i < len(changes):
            revision = changes[i].revision
            j = i
            while j < len(changes) and changes[j].revision == revision:
                j += 1
            self._apply_revision(changes[i:j], revision, out)
            i = j
        return out

    def _apply_revision(self, changes: Sequence[Change], revision: int, out: Applied) -> None:
        before: dict[Key, tuple[Instance | None, Entry]] = {}
        nodes_deleted: dict[str, int] = {}
        for change in changes:
            parsed = self.layout.parse(change.kv.key)
            if parsed is None:
                continue
            kind, service, instance_id = parsed
            if kind == "nodes":
                if change.deleted:
                    gone = self.nodes.pop(service, None)
                    nodes_deleted[service] = gone.lease if gone is not None else 0
                    out.nodes_deleted.add(service)
                else:
                    self.nodes[service] = change.kv
                continue
            key = (service, instance_id)
            entry = self.entries.get(key)
            if entry is None:
                entry = self.entries[key] = Entry()
            if key not in before:
                old_entry = Entry(
                    entry.reg, entry.health, entry.ttl, entry.registration, entry.health_record
                )
                before[key] = (self.get(service, instance_id), old_entry)
            entry.set(kind, None if change.deleted else change.kv)
        expired_leases = set(nodes_deleted.values()) - {0}
        for key, (old, old_entry) in before.items():
            out.touched.add(key)
            entry = self.entries[key]
            new = entry.instance(*key)
            if entry.empty:
                del self.entries[key]
            if new is None:
                if old is None:
                    continue
                lease = old_entry.reg.lease if old_entry.reg is not None else 0
                by_lease = lease in expired_leases
                if by_lease:
                    out.lease_expired[key] = old_entry
                reason: EventReason = "expire" if by_lease or _long_critical(old) else "deregister"
                out.events.append(self._remove(old, revision, reason))
                continue
            if old is not None and new == old:
                continue
            if old is None:
                reason = "register"
            elif new.spec != old.spec:
                reason = "update"
            else:
                record = entry.health_record
                reason = record.reason if record is not None else "health"
                if reason == "register":
                    reason = "update"
            new = new.evolve(mod_revision=revision)
            out.events.append(self._install(new, revision, reason))

    # ------------------------------------------------------------------ internals

    def _install(self, inst: Instance, revision: int, reason: EventReason) -> Event:
        self._services.setdefault(inst.service, {})[inst.id] = inst
        self.revision = max(self.revision, revision)
        return self._record(Event(revision, "put", reason, inst))

    def _remove(self, inst: Instance, revision: int, reason: EventReason) -> Event:
        group = self._services.get(inst.service, {})
        group.pop(inst.id, None)
        if not group:
            self._services.pop(inst.service, None)
        self.revision = max(self.revision, revision)
        return self._record(Event(revision, "delete", reason, inst))

    def _record(self, event: Event) -> Event:
        self._service_revision[event.instance.service] = event.revision
        self._history.append(event)
        if len(self._history) >= 2 * self.history_size:
            drop = len(self._history) - self.history_size
            self._floor = self._history[drop - 1].revision
            del self._history[:drop]
        return event


def _long_critical(inst: Instance) -> bool:
    """Removed while critical with ``deregister_after`` set: the owner's expiry did it."""
    check = inst.spec.check
    return (
        inst.check_status == "critical"
        and check is not None
        and check.deregister_after is not None
        and inst.critical_since is not None
    )
