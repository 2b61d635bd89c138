"""The registry's state machine: instances, leases, revisions and the event history.

Rules of this file:

* Everything that changes what the registry holds happens here, and nowhere else. The IO shell
  (``registry.py``) decides *when* (a request arrived, a timer fired) and makes the result
  durable; this file decides *what*.
* This file has no clock and no IO. Every method that depends on time takes ``now`` (wall-clock
  seconds, so that persisted times survive a restart), which is how the tests drive leases
  through hours of expiry in microseconds.
* Every change is exactly one event with exactly one new revision. A call that changes nothing
  produces no event and leaves the revision alone, so steady heartbeats and identical
  re-registrations cost consumers nothing.

Theory of operation. An instance's ``health`` is its operator status (``draining``,
``maintenance``) if an operator set one, else its check status. A TTL check keeps a lease:
registration and every heartbeat push the lease deadline ``ttl`` into the future; ``tick(now)``
turns instances whose lease ran out ``critical``. Any instance that stays critical for its
check's ``deregister_after`` is removed by ``tick`` as an ``expire``. Active checks (HTTP, TCP)
are run by the health component, which reports results through ``set_check_status``.

The history keeps the last ``history_size`` events. Revisions in it are consecutive, so a
watcher that last saw revision R resumes from index ``R + 1 - first``; a watcher older than the
history gets ``None`` and must resync from a full snapshot.
"""

from __future__ import annotations

import heapq
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from interknit.registry.model import (
    CheckStatus,
    Event,
    EventReason,
    Instance,
    InstanceSpec,
    OperatorStatus,
)

DEFAULT_HISTORY = 10_000
# The output of an actively checked instance that no check has reached yet; the health
# component tells "never checked" (passes on its first success) from "failed" by it.
NEVER_CHECKED_OUTPUT = "no check has run yet"

Key = tuple[str, str]

# Initial check status by check kind. A TTL instance starts passing: the registration itself
# is its first heartbeat. An actively checked one starts critical, so that nothing is sent
# traffic before it has been seen working once (the health component passes it on its first
# successful check).
_INITIAL_STATUS: dict[str, CheckStatus] = {
    "none": "passing",
    "ttl": "passing",
    "http": "critical",
    "tcp": "critical",
}

# Operator requests: status asked for -> operator field afterwards.
_OPERATOR_TRANSITIONS: dict[str, OperatorStatus | None] = {
    "draining": "draining",
    "maintenance": "maintenance",
    "passing": None,
}


class RegistryError(Exception):
    """A request the state refuses; ``status`` is the HTTP status the API answers with."""

    status = 400
    # For a write the store could not take (503): "none" (nothing was changed) or "unknown"
    # (the store may have applied it); None for every other refusal.
    outcome: str | None = None

    def __init__(self, message: str, detail: object = None) -> None:
        super().__init__(message)
        self.message = message
        self.detail = detail


class NotFound(RegistryError):
    status = 404


class Conflict(RegistryError):
    status = 409


@dataclass(frozen=True, slots=True)
class ServiceSummary:
    instances: int
    passing: int


class RegistryState:
    def __init__(self, history_size: int = DEFAULT_HISTORY, revision: int = 0) -> None:
        if history_size < 1:
            raise ValueError("history_size must be at least 1")
        self.history_size = history_size
        self.revision = revision
        self._services: dict[str, dict[str, Instance]] = {}
        # Last revision that touched each service, kept after the service empties so that a
        # blocking query on it still wakes and compares correctly.
        self._service_revision: dict[str, int] = {}
        self._history: list[Event] = []
        self._history_first = revision + 1
        # Lease deadlines for TTL instances; a heap of (deadline, key) with lazy deletion:
        # an entry is live only while it equals the deadline in ``_lease``.
        self._lease: dict[Key, float] = {}
        self._timers: list[tuple[float, Key]] = []

    # ------------------------------------------------------------------ reads

    def get(self, service: str, instance_id: str) -> Instance | None:
        return self._services.get(service, {}).get(instance_id)

    def owner(self, service: str, instance_id: str) -> str | None:
        """The node that owns the instance, where the store records one (etcd); None here:
        the embedded store's one node owns every instance."""
        return None

    def instances(self, service: str) -> list[Instance]:
        """The instances of ``service`` sorted by id (empty if unknown)."""
        group = self._services.get(service)
        if not group:
            return []
        return [group[k] for k in sorted(group)]

    def has_service(self, service: str) -> bool:
        return bool(self._services.get(service))

    def service_names(self) -> list[str]:
        return sorted(name for name, group in self._services.items() if group)

    def services(self) -> dict[str, ServiceSummary]:
        out: dict[str, ServiceSummary] = {}
        for name in self.service_names():
            group = self._services[name]
            passing = sum(1 for inst in group.values() if inst.passing)
            out[name] = ServiceSummary(instances=len(group), passing=passing)
        return out

    def all_instances(self) -> Iterable[Instance]:
        for name in self.service_names():
            yield from self.instances(name)

    def count(self) -> int:
        return sum(len(group) for group in self._services.values())

    def service_revision(self, service: str) -> int:
        return self._service_revision.get(service, 0)

    def lease_deadline(self, service: str, instance_id: str) -> float | None:
        return self._lease.get((service, instance_id))

    def oldest_revision(self) -> int:
        """The oldest revision a watcher may resume *after* without a resync.

        The list may hold up to twice ``history_size`` events between trims; the promise is
        exactly ``history_size``, so that behaviour does not depend on when a trim happened.
        """
        return max(self._history_first, self.revision - self.history_size + 1) - 1

    def events_since(
        self, revision: int, service: str | None = None
    ) -> tuple[list[Event], int] | None:
        """Events after ``revision`` (for ``service`` only, if given) and the revision scanned to.

        ``None`` means the history no longer reaches back to ``revision``: resync.
        """
        if revision >= self.revision:
            return [], self.revision
        if revision < self.oldest_revision():
            return None
        start = revision + 1 - self._history_first
        events = self._history[start:]
        if service is not None:
            events = [e for e in events if e.instance.service == service]
        return events, self.revision

    def next_deadline(self) -> float | None:
        """When ``tick`` next has something to do, so the shell can sleep until then."""
        self._drop_stale_timers()
        return self._timers[0][0] if self._timers else None

    # ------------------------------------------------------------------ writes

    def register(
        self, service: str, instance_id: str, spec: InstanceSpec, now: float
    ) -> list[Event]:
        current = self.get(service, instance_id)
        if current is not None and current.spec == spec:
            if spec.check is not None and spec.check.ttl is not None:
                self._renew(current, now)
            return []
        if current is None:
            kind = "none" if spec.check is None else spec.check.kind
            status = _INITIAL_STATUS[kind]
            # Built with its revisions in place: copying a frozen value costs more than making it.
            rev = self.revision + 1
            new = Instance(
                service=service,
                id=instance_id,
                spec=spec,
                check_status=status,
                output="" if status == "passing" else NEVER_CHECKED_OUTPUT,
                critical_since=now if status == "critical" else None,
                create_revision=rev,
                mod_revision=rev,
            )
            event = self._store(new, "register")
        else:
            changes: dict[str, object] = {"spec": spec}
            if spec.check != current.spec.check:
                kind = "none" if spec.check is None else spec.check.kind
                status = _INITIAL_STATUS[kind]
                changes.update(
                    check_status=status,
                    output="" if status == "passing" else NEVER_CHECKED_OUTPUT,
                    critical_since=now if status == "critical" else None,
                )
            event = self._put(current, "update", **changes)
        self._renew(event.instance, now)
        return [event]

    def deregister(self, service: str, instance_id: str) -> list[Event]:
        current = self._require(service, instance_id)
        return [self._delete(current, "deregister")]

    def heartbeat(self, service: str, instance_id: str, now: float) -> list[Event]:
        current = self._require(service, instance_id)
        check = current.spec.check
        if check is None or check.ttl is None:
            raise Conflict(
                f"instance {service}/{instance_id} has no ttl check to renew",
                {"field": "check"},
            )
        self._renew(current, now)
        if current.check_status == "passing":
            return []
        return [
            self._put(
                current, "health", check_status="passing", output="heartbeat", critical_since=None
            )
        ]

    def set_operator(self, service: str, instance_id: str, status: str) -> list[Event]:
        current = self._require(service, instance_id)
        if status not in _OPERATOR_TRANSITIONS:
            raise RegistryError(
                "status: must be one of draining, maintenance, passing", {"field": "status"}
            )
        operator = _OPERATOR_TRANSITIONS[status]
        if operator == current.operator:
            return []
        return [self._put(current, "health", operator=operator)]

    def set_check_status(
        self,
        service: str,
        instance_id: str,
        status: CheckStatus,
        output: str,
        now: float,
    ) -> list[Event]:
        """Record a check result that changes the status (the caller filters steady results),
        or the first result of an instance no check has reached yet, whatever it is: one that
        never passed shows its failure at once, not "no check has run yet"."""
        current = self.get(service, instance_id)
        if current is None:
            return []
        if current.check_status == status:
            if current.output != NEVER_CHECKED_OUTPUT or output == NEVER_CHECKED_OUTPUT:
                return []
            return [self._put(current, "health", output=output)]
        critical_since = current.critical_since
        if status == "critical":
            critical_since = critical_since if critical_since is not None else now
            self._arm(current.key, critical_since, current)
        else:
            critical_since = None
        return [
            self._put(
                current,
                "health",
                check_status=status,
                output=output,
                critical_since=critical_since,
            )
        ]

    def set_ejected(self, service: str, instance_id: str, until: float | None) -> list[Event]:
        current = self.get(service, instance_id)
        if current is None or current.ejected_until == until:
            return []
        return [self._put(current, "eject", ejected_until=until)]

    def tick(self, now: float) -> list[Event]:
        """Expire leases and remove long-critical instances whose time has come."""
        events: list[Event] = []
        while self._timers and self._timers[0][0] <= now:
            _, key = heapq.heappop(self._timers)
            inst = self.get(*key)
            if inst is None:
                continue
            lease = self._lease.get(key)
            if lease is not None and lease <= now and inst.check_status != "critical":
                ttl = inst.spec.check.ttl if inst.spec.check else None
                fresh_event = self._put(
                    inst,
                    "lease",
                    check_status="critical",
                    output=f"ttl of {ttl:g}s expired without a heartbeat" if ttl else "expired",
                    critical_since=lease,
                )
                events.append(fresh_event)
                inst = fresh_event.instance
                self._arm(key, lease, inst)
            if self._due_for_removal(inst, now):
                events.append(self._delete(inst, "expire"))
        return events

    # ------------------------------------------------------------------ committed copies

    def take_committed(self, events: Iterable[Event]) -> None:
        """Take events another state made, as they are: the embedded registry keeps the state
        its readers see one commit behind the state its writes are made on, and moves it
        forward by the events of each commit once it is on the disk. Only what readers use
        is kept here: instances, revisions, history (leases and timers are the writer's)."""
        for event in events:
            if event.revision != self.revision + 1:
                raise ValueError(
                    f"event at revision {event.revision} applied at revision {self.revision}"
                )
            self.install(event)

    def install(self, event: Event) -> None:
        """Take one event as it is, revision and all (a commit's reader copy, a follower's
        mirror of another registry)."""
        inst = event.instance
        self.revision = event.revision
        if event.type == "put":
            self._services.setdefault(inst.service, {})[inst.id] = inst
        else:
            group = self._services.get(inst.service, {})
            group.pop(inst.id, None)
            if not group:
                self._services.pop(inst.service, None)
        self._record(event)

    # ------------------------------------------------------------------ restore

    def restore(self, instances: Iterable[Instance], revision: int, now: float) -> None:
        """Load a persisted snapshot. Every lease gets one full TTL of grace from ``now``."""
        self.__init__(self.history_size, revision)  # type: ignore[misc]
        for inst in instances:
            self._services.setdefault(inst.service, {})[inst.id] = inst
            rev = max(self._service_revision.get(inst.service, 0), inst.mod_revision)
            self._service_revision[inst.service] = rev
            check = inst.spec.check
            if check is not None and check.ttl is not None:
                self._lease[inst.key] = now + check.ttl
                heapq.heappush(self._timers, (now + check.ttl, inst.key))
            if inst.critical_since is not None and check is not None:
                # Grace for removal too: never remove before the instance could renew.
                grace = now + (check.ttl or 0.0)
                self._arm(inst.key, max(grace, inst.critical_since), inst)

    # ------------------------------------------------------------------ internals

    def _require(self, service: str, instance_id: str) -> Instance:
        inst = self.get(service, instance_id)
        if inst is None:
            if not self.has_service(service):
                raise NotFound(f"service {service!r} is not registered", {"service": service})
            raise NotFound(
                f"instance {instance_id!r} of service {service!r} is not registered",
                {"service": service, "id": instance_id},
            )
        return inst

    def _renew(self, inst: Instance, now: float) -> None:
        check = inst.spec.check
        if check is None or check.ttl is None:
            self._lease.pop(inst.key, None)
            return
        deadline = now + check.ttl
        self._lease[inst.key] = deadline
        heapq.heappush(self._timers, (deadline, inst.key))

    def _arm(self, key: Key, critical_since: float, inst: Instance) -> None:
        check = inst.spec.check
        if check is not None and check.deregister_after is not None:
            heapq.heappush(self._timers, (critical_since + check.deregister_after, key))

    def _due_for_removal(self, inst: Instance, now: float) -> bool:
        check = inst.spec.check
        if check is None or check.deregister_after is None or inst.critical_since is None:
            return False
        if inst.check_status != "critical":
            return False
        due = inst.critical_since + check.deregister_after
        lease = self._lease.get(inst.key)
        # After a restart the lease's grace also protects against removal.
        if lease is not None and lease > now:
            return False
        return due <= now

    def _drop_stale_timers(self) -> None:
        timers = self._timers
        while timers:
            deadline, key = timers[0]
            inst = self.get(*key)
            if inst is None:
                heapq.heappop(timers)
                continue
            lease = self._lease.get(key)
            live_lease = lease == deadline and inst.check_status != "critical"
            check = inst.spec.check
            live_removal = (
                check is not None
                and check.deregister_after is not None
                and inst.critical_since is not None
                and inst.check_status == "critical"
            )
            if live_lease or live_removal:
                return
            heapq.heappop(timers)

    def _put(self, current: Instance, reason: EventReason, **changes: Any) -> Event:
        """Store ``current`` with ``changes`` at the next revision (one copy, not two)."""
        return self._store(current.evolve(mod_revision=self.revision + 1, **changes), reason)

    def _store(self, inst: Instance, reason: EventReason) -> Event:
        """Store ``inst``, which already carries the next revision as its ``mod_revision``."""
        self.revision += 1
        assert inst.mod_revision == self.revision
        self._services.setdefault(inst.service, {})[inst.id] = inst
        return self._record(Event(self.revision, "put", reason, inst))

    def _delete(self, inst: Instance, reason: EventReason) -> Event:
        self.revision += 1
        group = self._services.get(inst.service, {})
        group.pop(inst.id, None)
        if not group:
            self._services.pop(inst.service, None)
        self._lease.pop(inst.key, None)
        return self._record(Event(self.revision, "delete", reason, inst))

    def _record(self, event: Event) -> Event:
        self._service_revision[event.instance.service] = event.revision
        self._history.append(event)
        # Trim in chunks so that appends stay amortised O(1).
        if len(self._history) >= 2 * self.history_size:
            drop = len(self._history) - self.history_size
            del self._history[:drop]
            self._history_first += drop
        return event
