"""Which live node should hold which virtual IP: one pure function every node computes alike.

``assign(vips, weights, current)`` starts from who holds what now and moves as little as it can:

1. **Keep.** A VIP held by a live node stays there.
2. **Place.** A VIP with no live holder (never held, or its holder died or left) goes to the
   node with the fewest for its weight (Traffic Server's rule: an unbound VIP goes to the node
   with the fewest); among equals, the one that ranks it highest by weighted rendezvous hashing.
3. **Balance.** While moving one VIP from the most loaded node to the least loaded lowers the
   spread, move one: for equal weights that is Traffic Server's "rebalance one at a time when
   loads differ by two or more". The VIP that moves is the one the receiving node ranks
   highest, so the same VIPs tend to come back to the same node after it recovers.

Loads are compared by weight through the potential sum(load^2 / weight): a move from i to j is
made only when it lowers the potential, ``(2 l_j + 1) / w_j < (2 l_i - 1) / w_i``, so the loop
ends (the potential is a non-negative number that only falls, in finite steps), and the result
is a fixed point: assigning again from it moves nothing. Weighted rendezvous hashing (score
``-w / ln(u)`` with ``u`` uniform from a hash of the VIP and the node) ranks nodes for a VIP
consistently across nodes and restarts, with no coordination.

Nothing here knows about the store, the clock or the network.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping, Sequence

_SCALE = float(2**64)


def score(vip: str, node: str, weight: int) -> float:
    """Weighted rendezvous score of ``node`` for ``vip`` (higher ranks first)."""
    digest = hashlib.blake2b(f"{vip}\0{node}".encode(), digest_size=8).digest()
    u = (int.from_bytes(digest, "big") + 0.5) / _SCALE  # in (0, 1), never 0 or 1
    return -weight / math.log(u)


def assign(
    vips: Sequence[str], weights: Mapping[str, int], current: Mapping[str, str]
) -> dict[str, str]:
    """VIP -> node for every VIP (none when there is no live node). ``weights`` holds the live
    nodes (weight >= 1); ``current`` the holder of each held VIP (dead holders are ignored)."""
    if not weights or not vips:
        return {}
    if any(w < 1 for w in weights.values()):
        raise ValueError("weights must be at least 1")
    result: dict[str, str] = {}
    held: dict[str, list[str]] = {node: [] for node in weights}
    for vip in vips:
        holder = current.get(vip)
        if holder in held:
            result[vip] = holder
            held[holder].append(vip)

    def grow(node: str) -> float:  # the potential added by one more VIP on node
        return (2 * len(held[node]) + 1) / weights[node]

    def shrink(node: str) -> float:  # the potential removed by one fewer
        return (2 * len(held[node]) - 1) / weights[node]

    nodes = sorted(weights)
    for vip in sorted(v for v in vips if v not in result):
        node = min(nodes, key=lambda n: (grow(n), -score(vip, n, weights[n]), n))
        result[vip] = node
        held[node].append(vip)

    while True:
        giver = max((n for n in nodes if held[n]), key=lambda n: (shrink(n), n))
        taker = min(nodes, key=lambda n: (grow(n), n))
        if not grow(taker) < shrink(giver):
            return result
        vip = max(held[giver], key=lambda v: (score(v, taker, weights[taker]), v))
        held[giver].remove(vip)
        held[taker].append(vip)
        result[vip] = taker
