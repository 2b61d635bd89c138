"""The container agent's decision: what to write so that the registry holds exactly what the
running containers ask for, among the instances the agent owns. Pure: no IO, no clock.

Rules:

* The agent touches only instances whose ``meta.owner`` is its own. An instance another owner
  holds at a key a container asks for is a conflict: reported, left alone.
* A wanted registration is written only when the registry does not hold it as wanted (the
  spec differs or it is missing); an owned one nobody asks for any more is deleted. So a
  periodic resync over an unchanged system writes nothing, and watchers see nothing.
* Health and operator states are the registry's: an operator's ``draining`` survives a resync,
  because only the spec is compared.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from interknit.registry.model import InstanceSpec

Key = tuple[str, str]  # (service, instance id)


@dataclass(frozen=True, slots=True)
class Held:
    """What the registry holds at a key, as far as the agent knows."""

    spec: InstanceSpec
    owner: str | None

    @classmethod
    def of(cls, spec: InstanceSpec) -> Held:
        return cls(spec, spec.meta_dict.get("owner"))


@dataclass(frozen=True, slots=True)
class Plan:
    puts: tuple[tuple[Key, InstanceSpec], ...] = ()
    deletes: tuple[Key, ...] = ()
    conflicts: tuple[Key, ...] = ()

    def __bool__(self) -> bool:
        return bool(self.puts or self.deletes)


def reconcile(wanted: Mapping[Key, InstanceSpec], held: Mapping[Key, Held], owner: str) -> Plan:
    """The writes that make the registry's instances owned by ``owner`` equal ``wanted``."""
    puts: list[tuple[Key, InstanceSpec]] = []
    conflicts: list[Key] = []
    for key in sorted(wanted):
        spec = wanted[key]
        current = held.get(key)
        if current is None:
            puts.append((key, spec))
        elif current.owner != owner:
            conflicts.append(key)
        elif current.spec != spec:
            puts.append((key, spec))
    deletes = tuple(key for key in sorted(held) if held[key].owner == owner and key not in wanted)
    return Plan(tuple(puts), deletes, tuple(conflicts))


def apply(plan: Plan, held: Mapping[Key, Held], owner: str) -> dict[Key, Held]:
    """What the registry holds once every write of ``plan`` succeeded."""
    out = dict(held)
    for key, spec in plan.puts:
        out[key] = Held(spec, owner)
    for key in plan.deletes:
        out.pop(key, None)
    return out
