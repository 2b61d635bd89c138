"""Leases and compare-and-swap over instances: what a consumer needs to own something through
the registry (a virtual IP, a lock) rather than only to announce itself.

A backend that can offer these (``EtcdRegistry``) has the methods of ``Transactional``; the
embedded registry, which is one node's alone, has no need of them.

* A **lease** of the caller's own, apart from the node's lease: instances put under it go when
  it runs out or is revoked, all in one revision, and nothing else of the node goes with them.
  Any node may revoke any lease whose id it knows (that is how a peer seen dead is let go early).
* ``transact`` applies puts and deletes of instances if, and only if, every expectation holds,
  in one atomic step. Expectations name an instance and the revision at which it was created
  or last written (0: absent), or a creation it must no longer be (that instance is gone, even
  if one of the same name was created since). A transaction with no operations is a
  linearizable check of its expectations.

An instance is compared by its registration: ``modified`` is the revision of the last put of the
instance itself, which a health change (a check result, an operator's drain) does not move.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from interknit.registry.model import InstanceSpec


@dataclass(frozen=True, slots=True)
class Expect:
    """What must hold of one instance for the transaction to apply (every given field)."""

    service: str
    id: str
    created: int | None = None  # created at this revision; 0: absent
    modified: int | None = None  # last put at this revision; 0: absent
    not_created: int | None = None  # not the instance created at this revision (gone or new)


@dataclass(frozen=True, slots=True)
class Put:
    """Register (or overwrite) an instance, under ``lease`` (0: under no lease, it stays until
    deleted). Its health starts as a new registration's does; instances with a TTL check are
    not accepted (their TTL key is a lease of its own: use ``register``)."""

    service: str
    id: str
    spec: InstanceSpec
    lease: int = 0


@dataclass(frozen=True, slots=True)
class Delete:
    service: str
    id: str


Op = Put | Delete


@dataclass(frozen=True, slots=True)
class TxnOutcome:
    succeeded: bool
    revision: int  # the store's revision after the transaction (or when it was refused)


@runtime_checkable
class Transactional(Protocol):
    async def grant_lease(self, ttl: float) -> int:
        """A new lease of ``ttl`` seconds (rounded up to whole seconds); its id."""
        ...

    async def keep_lease(self, lease: int) -> float:
        """Renew ``lease`` once: the seconds it has left, or 0 if it no longer exists."""
        ...

    async def revoke_lease(self, lease: int) -> None:
        """End ``lease`` now (its instances go at once); an unknown lease is not an error."""
        ...

    async def transact(self, expect: Sequence[Expect], ops: Sequence[Op]) -> TxnOutcome: ...
