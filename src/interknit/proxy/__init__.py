"""interknit.proxy: the HTTP/1.1 (L7) and TCP (L4) reverse proxy, the data plane."""

from interknit.proxy.listener import HttpListener, Listener, TcpListener, build_listener
from interknit.proxy.pools import (
    Admission,
    AdmissionSource,
    BalancedPool,
    PoolLike,
    PoolSource,
    StaticPoolSource,
    Ticket,
)
from interknit.proxy.spec import ListenerSpec, MatchSpec, RouteSpec

__all__ = [
    "Admission",
    "AdmissionSource",
    "BalancedPool",
    "HttpListener",
    "Listener",
    "ListenerSpec",
    "MatchSpec",
    "PoolLike",
    "PoolSource",
    "RouteSpec",
    "StaticPoolSource",
    "TcpListener",
    "Ticket",
    "build_listener",
]
