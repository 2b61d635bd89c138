"""interknit.balance: sans-IO load-balancing policies, pools and sticky cookies."""

from interknit.balance.base import Balancer, Endpoint, effective_weight
from interknit.balance.least_requests import LeastRequests
from interknit.balance.maglev import Maglev
from interknit.balance.pool import (
    HASHING_POLICIES,
    PANIC_THRESHOLD,
    POLICIES,
    EndpointState,
    Health,
    Policy,
    Pool,
    make_balancer,
)
from interknit.balance.random_choice import RandomChoice
from interknit.balance.ring_hash import RingHash
from interknit.balance.round_robin import RoundRobin
from interknit.balance.source_ip import SourceIp
from interknit.balance.sticky import StickyCookie, find_cookie, new_secret

__all__ = [
    "HASHING_POLICIES",
    "PANIC_THRESHOLD",
    "POLICIES",
    "Balancer",
    "Endpoint",
    "EndpointState",
    "Health",
    "LeastRequests",
    "Maglev",
    "Policy",
    "Pool",
    "RandomChoice",
    "RingHash",
    "RoundRobin",
    "SourceIp",
    "StickyCookie",
    "effective_weight",
    "find_cookie",
    "make_balancer",
    "new_secret",
]
