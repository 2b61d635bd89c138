"""interknit.client: find and call services registered in interknit, from Python.

``AsyncClient`` (asyncio) and ``Client`` (blocking) look services up through a short-lived
cache kept current by blocking queries, balance calls with the proxy's balancers, watch
services for changes, register the running process with a heartbeated TTL, fail over across a
list of registry nodes, and serve cached answers marked stale when no node can be reached.
See docs/client.md.
"""

from interknit.client.aio import AsyncClient, Registration
from interknit.client.cache import CACHE_TTL, MAX_STALE, Cache
from interknit.client.errors import (
    DiscoveryError,
    DiscoveryUnavailable,
    NoInstances,
    RequestRejected,
)
from interknit.client.model import Instance, Lookup, Query, parse_instance, url
from interknit.client.nodes import NodeList
from interknit.client.sync import Client, SyncRegistration

__all__ = [
    "CACHE_TTL",
    "MAX_STALE",
    "AsyncClient",
    "Cache",
    "Client",
    "DiscoveryError",
    "DiscoveryUnavailable",
    "Instance",
    "Lookup",
    "NoInstances",
    "NodeList",
    "Query",
    "Registration",
    "RequestRejected",
    "SyncRegistration",
    "parse_instance",
    "url",
]
