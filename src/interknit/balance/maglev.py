"""Maglev consistent hashing (Eisenbud et al., NSDI 2016; Envoy's ``MAGLEV``).

A lookup table of ``table_size`` (a prime) slots is filled once per endpoint change: every
endpoint walks its own permutation of the slots (``offset + j * skip`` mod size, both from a
hash of its key) and, in turns, claims the next free slot of its walk. A request key is hashed
to a slot and gets that slot's endpoint: O(1) per pick, faster than a ring's binary search, and
the slots split almost exactly by weight. When an endpoint leaves or joins, the slots of the
others mostly stay theirs, so slightly more than 1/N of keys move (a ring moves exactly its
share but balances worse).

Weights follow Envoy: in each round an endpoint claims a slot only if its weight has earned
one, so the heaviest claims every round and one of half its weight every other round.

Slow start does not apply (it would move keys as the weights ramp). Without a key a random
slot is used.
"""

from __future__ import annotations

import random
from collections.abc import Container, Sequence

from interknit.balance.base import Endpoint
from interknit.balance.hashing import hash64, hash128
from interknit.balance.weights import base_weights

# Must be prime so that every skip walks all slots. Envoy's default; the paper suggests a size
# well above 100x the number of endpoints for balance within about 1%.
TABLE_SIZE = 65537


def _is_prime(n: int) -> bool:
    if n < 2:
        return False
    i = 2
    while i * i <= n:
        if n % i == 0:
            return False
        i += 1
    return True


def build_table(keys: Sequence[str], weights: Sequence[float], size: int) -> list[int]:
    """The Maglev lookup table: for each slot, the index into ``keys`` of its owner."""
    count = len(keys)
    if count == 0:
        return []
    positions: list[int] = []
    skips: list[int] = []
    for key in keys:
        first, second = hash128(key.encode())
        positions.append(first % size)
        skips.append(second % (size - 1) + 1)
    heaviest = max(weights)
    targets = [0.0] * count
    table = [-1] * size
    filled = 0
    rounds = 0
    while filled < size:
        rounds += 1
        for i in range(count):
            weight = weights[i]
            if rounds * weight < targets[i]:
                continue
            targets[i] += heaviest
            slot = positions[i]
            skip = skips[i]
            while table[slot] >= 0:
                slot += skip
                if slot >= size:
                    slot -= size
            table[slot] = i
            slot += skip
            positions[i] = slot - size if slot >= size else slot
            filled += 1
            if filled == size:
                break
    return table


class Maglev:
    name = "maglev"

    def __init__(self, rng: random.Random | None = None, table_size: int = TABLE_SIZE) -> None:
        if not _is_prime(table_size):
            raise ValueError(f"table_size {table_size} is not a prime")
        self._rng = rng if rng is not None else random.Random()
        self._size = table_size
        self._table: list[Endpoint] = []
        self._endpoints: list[Endpoint] = []

    @property
    def table(self) -> Sequence[Endpoint]:
        return self._table

    def set_endpoints(self, endpoints: Sequence[Endpoint], now: float) -> None:
        # Sorted by key, so the table does not depend on the order the pool lists endpoints in.
        weighted = [
            (ep, weight)
            for ep, weight in zip(endpoints, base_weights(endpoints), strict=True)
            if weight > 0.0
        ]
        weighted.sort(key=lambda pair: pair[0].key)
        owners = [ep for ep, _ in weighted]
        slots = build_table(
            [ep.key for ep in owners], [weight for _, weight in weighted], self._size
        )
        self._endpoints = owners
        self._table = [owners[i] for i in slots]

    def pick(
        self, hash_key: bytes | None, now: float, exclude: Container[Endpoint] = ()
    ) -> Endpoint | None:
        table = self._table
        size = len(table)
        if size == 0:
            return None
        point = self._rng.getrandbits(64) if hash_key is None else hash64(hash_key)
        index = point % size
        owner = table[index]
        if not exclude or owner not in exclude:
            return owner
        # A retry takes the next slot owned by an endpoint not yet tried: deterministic per
        # key, and spread over the others because neighbouring slots belong to anyone.
        if all(ep in exclude for ep in self._endpoints):
            return None
        for step in range(1, size):
            owner = table[(index + step) % size]
            if owner not in exclude:
                return owner
        return None
