"""Consistent hashing on a ring (Karger et al.; Envoy's ``RING_HASH``, ketama).

Each endpoint owns many points on a 64-bit ring, in proportion to its weight; a request key is
hashed onto the ring and goes to the owner of the first point at or after it. When an endpoint
leaves, only the keys that landed on its points move (to the next points along); when one
joins, it takes over only the keys just before its new points. So about 1/N of keys move.

Ring size: at least ``min_ring_size`` points so that few endpoints still split keys evenly, at
most ``max_ring_size``. The points per unit of weight are a power of two that depends only on
the pool's total weight, and an endpoint's points are numbered ``key_0, key_1, ...``: a change
that keeps that power keeps every other endpoint's points exactly, and one that doubles or
halves it only adds or drops points at the end of each endpoint's list. (Envoy's exact scale
factor instead reshuffles a little of every endpoint on any change.)

Slow start does not apply: ramping a ring would move keys twice. Without a key (``hash_key``
is None) a random point is used.
"""

from __future__ import annotations

import math
import random
from bisect import bisect_left
from collections.abc import Container, Sequence

from interknit.balance.base import Endpoint
from interknit.balance.hashing import hash64
from interknit.balance.weights import base_weights

MIN_RING_SIZE = 1024
# 2**18 points build in about 0.3 s in CPython; Envoy allows 8M, which would take seconds here.
MAX_RING_SIZE = 1 << 18


def points_per_weight(weights: Sequence[float], min_ring_size: int, max_ring_size: int) -> float:
    """A power of two: enough points for ``min_ring_size`` and one for the lightest endpoint."""
    positive = [w for w in weights if w > 0.0]
    if not positive:
        return 0.0
    total = sum(positive)
    wanted = max(min_ring_size / total, 1.0 / min(positive))
    scale = 2.0 ** math.ceil(math.log2(wanted))
    while scale > 2.0**-30 and total * scale > max_ring_size:
        scale /= 2.0
    return scale


class RingHash:
    name = "ring_hash"

    def __init__(
        self,
        rng: random.Random | None = None,
        min_ring_size: int = MIN_RING_SIZE,
        max_ring_size: int = MAX_RING_SIZE,
    ) -> None:
        if not 1 <= min_ring_size <= max_ring_size:
            raise ValueError("need 1 <= min_ring_size <= max_ring_size")
        self._rng = rng if rng is not None else random.Random()
        self._min = min_ring_size
        self._max = max_ring_size
        self._hashes: list[int] = []
        self._owners: list[Endpoint] = []
        self._endpoints: list[Endpoint] = []

    @property
    def ring_size(self) -> int:
        return len(self._hashes)

    def set_endpoints(self, endpoints: Sequence[Endpoint], now: float) -> None:
        self._endpoints = list(endpoints)
        weights = base_weights(self._endpoints)
        scale = points_per_weight(weights, self._min, self._max)
        points: list[tuple[int, str, Endpoint]] = []
        for ep, weight in zip(self._endpoints, weights, strict=True):
            if weight <= 0.0:
                continue
            prefix = ep.key + "_"
            for i in range(max(1, round(weight * scale))):
                points.append((hash64(f"{prefix}{i}".encode()), ep.key, ep))
        # Ties on a 64-bit hash are all but impossible; the key breaks them the same everywhere.
        points.sort(key=lambda point: (point[0], point[1]))
        self._hashes = [point[0] for point in points]
        self._owners = [point[2] for point in points]

    def pick(
        self, hash_key: bytes | None, now: float, exclude: Container[Endpoint] = ()
    ) -> Endpoint | None:
        hashes = self._hashes
        size = len(hashes)
        if size == 0:
            return None
        point = self._rng.getrandbits(64) if hash_key is None else hash64(hash_key)
        index = bisect_left(hashes, point)
        if index == size:
            index = 0
        owner = self._owners[index]
        if not exclude or owner not in exclude:
            return owner
        # A retry walks on along the ring: the next distinct endpoint a key would fall to if
        # this one left, so retries of one key also agree with each other.
        if all(ep in exclude for ep in self._endpoints):
            return None
        for step in range(1, size):
            owner = self._owners[(index + step) % size]
            if owner not in exclude:
                return owner
        return None
