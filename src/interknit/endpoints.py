"""Registry instances as pools see them: the adapter the proxy and the discovery client share.

``registry/`` and ``balance/`` import neither each other (DESIGN.md's layering): a pool is told
``EndpointState`` values, and whoever holds registry instances turns them into those here.
"""

from __future__ import annotations

from collections.abc import Iterable

from interknit.balance.pool import EndpointState
from interknit.registry.model import Instance


def endpoint_state(instance: Instance) -> EndpointState:
    """A registry instance as a pool is told about it, keyed ``service/id``."""
    spec = instance.spec
    return EndpointState(
        key=f"{instance.service}/{instance.id}",
        address=spec.address,
        port=spec.port,
        weight=spec.weight,
        zone=spec.zone,
        meta=spec.meta,
        health=instance.health,
        ejected_until=instance.ejected_until,
    )


def endpoint_states(instances: Iterable[Instance]) -> list[EndpointState]:
    return [endpoint_state(instance) for instance in instances]
