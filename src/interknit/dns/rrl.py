"""Response rate limiting (RRL) per client prefix, so the server cannot amplify an attack.

A UDP source address can be forged; a flood of small queries "from" a victim would otherwise
turn into a flood of larger answers at the victim. Each client prefix (/24 for IPv4, /56 for
IPv6, as BIND's RRL) has a token bucket of ``burst`` responses refilled at ``rate`` per second.
When it is empty the response is dropped, except that every ``slip``-th one is sent as a bare
truncated reply (TC set, no records): smaller than the query, useless to an attacker, and it
tells a real client to retry over TCP, which cannot be forged. ``slip = 0`` drops them all.

Sans-IO: ``check`` takes the time. Only UDP is limited; the TCP handshake proves the address.
"""

from __future__ import annotations

import enum
import ipaddress
from collections.abc import Sequence
from dataclasses import dataclass


class Verdict(enum.IntEnum):
    ALLOW = 0
    DROP = 1
    SLIP = 2


@dataclass(frozen=True)
class RrlConfig:
    rate: float = 200.0  # responses per second per prefix
    burst: float = 400.0
    slip: int = 2
    ipv4_prefix: int = 24
    ipv6_prefix: int = 56
    # Loopback is where the node's own resolvers and benchmarks live; forging it is not possible
    # from outside the host.
    exempt: Sequence[str] = ("127.0.0.0/8", "::1/128")
    max_prefixes: int = 100_000

    def __post_init__(self) -> None:
        if self.rate <= 0 or self.burst < 1:
            raise ValueError("rate must be positive and burst at least 1")
        if self.slip < 0:
            raise ValueError("slip must not be negative")


_EXEMPT = object()


class RateLimiter:
    def __init__(self, config: RrlConfig | None = None) -> None:
        self.config = config or RrlConfig()
        self._exempt = [ipaddress.ip_network(net, strict=False) for net in self.config.exempt]
        # address text -> its prefix key (or _EXEMPT); prefix key -> [tokens, last, limited]
        self._keys: dict[str, object] = {}
        self._buckets: dict[object, list[float]] = {}

    def exempt(self, address: str) -> bool:
        key = self._keys.get(address)
        if key is None:
            key = self._key_of(address)
        return key is _EXEMPT

    def check(self, address: str, now: float) -> Verdict:
        key = self._keys.get(address)
        if key is None:
            key = self._key_of(address)
        if key is _EXEMPT:
            return Verdict.ALLOW
        bucket = self._buckets.get(key)
        config = self.config
        if bucket is None:
            if len(self._buckets) >= config.max_prefixes:
                self._evict(now)
            self._buckets[key] = [config.burst - 1.0, now, 0.0]
            return Verdict.ALLOW
        tokens = bucket[0] + (now - bucket[1]) * config.rate
        if tokens > config.burst:
            tokens = config.burst
        bucket[1] = now
        if tokens >= 1.0:
            bucket[0] = tokens - 1.0
            return Verdict.ALLOW
        bucket[0] = tokens
        bucket[2] += 1.0
        if config.slip and bucket[2] % config.slip == 0:
            return Verdict.SLIP
        return Verdict.DROP

    def _key_of(self, address: str) -> object:
        if len(self._keys) >= self.config.max_prefixes:
            self._keys.clear()
        try:
            ip = ipaddress.ip_address(address)
        except ValueError:
            key: object = address  # not an IP (a Unix socket path in tests): its own bucket
        else:
            if any(ip.version == net.version and ip in net for net in self._exempt):
                key = _EXEMPT
            elif ip.version == 4:
                bits = 32 - self.config.ipv4_prefix
                key = (4, int(ip) >> bits)
            else:
                bits = 128 - self.config.ipv6_prefix
                key = (6, int(ip) >> bits)
        self._keys[address] = key
        return key

    def _evict(self, now: float) -> None:
        """Forget the prefixes whose buckets have refilled: they are the same as new ones."""
        rate, burst = self.config.rate, self.config.burst
        full = [k for k, b in self._buckets.items() if b[0] + (now - b[1]) * rate >= burst]
        for key in full:
            del self._buckets[key]
        if len(self._buckets) >= self.config.max_prefixes:
            # Everyone is busy: a spray of forged prefixes. Start over rather than grow.
            self._buckets.clear()

    def __len__(self) -> int:
        return len(self._buckets)
