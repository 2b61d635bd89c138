"""Which address an instance is registered at: the agents' address policy.

An agent registers an address other hosts can reach, so it never registers a wildcard
(``0.0.0.0``, ``::``), which means "every interface" to the process that binds it and nothing
to a caller. ``--address`` is either an address (used as written), or ``auto``: the address the
host's routing table picks for traffic leaving it (the source address of its default route,
found by connecting a UDP socket, which sends nothing), or loopback when there is no route.
"""

from __future__ import annotations

import ipaddress
import socket

AUTO = "auto"
WILDCARDS = frozenset({"", "0.0.0.0", "::", "[::]"})
# Any address outside the host works: no packet is sent, the kernel only picks a route.
_PROBE_V4 = ("192.0.2.1", 9)  # TEST-NET-1 (RFC 5737)


def check_policy(value: str) -> str:
    """``value`` if it is a usable policy, else ValueError naming what is wrong."""
    if value == AUTO:
        return value
    try:
        address = ipaddress.ip_address(value)
    except ValueError:
        raise ValueError(f"{value!r} is neither an IP address nor 'auto'") from None
    if address.is_unspecified:
        raise ValueError(f"{value} is a wildcard; give the address callers should use")
    return str(address)


def route_address() -> str:
    """The source address of this host's default route, or 127.0.0.1 without one."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        try:
            sock.connect(_PROBE_V4)
            address = str(sock.getsockname()[0])
        except OSError:
            return "127.0.0.1"
    return address if address not in WILDCARDS else "127.0.0.1"


def resolve(policy: str) -> str:
    """The address a policy names now."""
    return route_address() if policy == AUTO else check_policy(policy)


def published_address(host_ip: str, policy_address: str) -> str:
    """The address for a port a container engine published on ``host_ip``: that address
    itself, unless it is a wildcard, which means the host's address under the policy."""
    return policy_address if host_ip.strip() in WILDCARDS else host_ip.strip().strip("[]")
