"""Consul's agent endpoints name an instance by its service ID alone (``deregister/web-1``,
``check/pass/service:web-1``); interknit keys instances by (service, id). This index finds
the one from the other. It follows the registry's watch stream like every other consumer, and
every answer is checked against the registry's state before it is used, so a lagging entry
can cause a miss, never a wrong hit.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence

from interknit.compat.names import Identity, identity
from interknit.registry.model import Event, Instance
from interknit.registry.state import RegistryState

Key = tuple[str, str]
_SERVICE_CHECK = "service:"


class ConsulIds:
    def __init__(self) -> None:
        self._by_id: dict[str, set[Key]] = {}
        self._by_check: dict[str, set[Key]] = {}
        self._names: dict[Key, tuple[str, str]] = {}  # key -> (consul id, check id)

    # ------------------------------------------------------------------ upkeep

    def rebuild(self, instances: Iterable[Instance]) -> None:
        self._by_id.clear()
        self._by_check.clear()
        self._names.clear()
        for inst in instances:
            self._put(inst)

    def apply(self, events: Sequence[Event]) -> None:
        for event in events:
            if event.type == "put":
                self._put(event.instance)
            else:
                self._drop(event.instance.key)

    def _put(self, inst: Instance) -> None:
        ident = identity(inst)
        names = (ident.id, ident.check_id)
        if self._names.get(inst.key) == names:
            return
        self._drop(inst.key)
        self._names[inst.key] = names
        self._by_id.setdefault(ident.id, set()).add(inst.key)
        self._by_check.setdefault(ident.check_id, set()).add(inst.key)

    def _drop(self, key: Key) -> None:
        names = self._names.pop(key, None)
        if names is None:
            return
        for table, name in ((self._by_id, names[0]), (self._by_check, names[1])):
            keys = table.get(name)
            if keys is not None:
                keys.discard(key)
                if not keys:
                    del table[name]

    # ------------------------------------------------------------------ lookups

    def find(self, state: RegistryState, consul_id: str, scan: bool = False) -> list[Instance]:
        """The instances with this Consul service ID; ``scan`` looks through the whole
        registry when the index knows none (for answers that would otherwise be a 404)."""

        def test(ident: Identity) -> bool:
            return ident.id == consul_id

        found = _verified(state, self._by_id.get(consul_id, ()), test)
        if found or not scan:
            return found
        return [i for i in state.all_instances() if test(identity(i))]

    def find_check(self, state: RegistryState, check_id: str) -> list[Instance]:
        """The instances whose service check has this ID: a CheckID given at registration,
        ``service:ID``, or ``service:ID:N`` (the N-th check of a registration with several,
        of which interknit kept one)."""

        def test(ident: Identity) -> bool:
            return ident.check_id == check_id

        found = _verified(state, self._by_check.get(check_id, ()), test)
        if found:
            return found
        if check_id.startswith(_SERVICE_CHECK):
            consul_id = check_id[len(_SERVICE_CHECK) :]
            found = self.find(state, consul_id, scan=True)
            base, sep, number = consul_id.rpartition(":")
            if not found and sep and number.isascii() and number.isdigit():
                found = self.find(state, base, scan=True)
            return found
        return [i for i in state.all_instances() if test(identity(i))]


def _verified(
    state: RegistryState, keys: Iterable[Key], test: Callable[[Identity], bool]
) -> list[Instance]:
    """The instances behind ``keys`` that are still there and still pass ``test``."""
    out = []
    for key in sorted(keys):
        inst = state.get(*key)
        if inst is not None and test(identity(inst)):
            out.append(inst)
    return out
