"""A route's ``demand`` table, read and checked, and the objects it builds.

``demand = { concurrency = "adaptive" | "aimd" | N, queue = 64, queue_timeout = "100ms",
rate = "500/s", burst = N, client_rate = "50/s", client_burst = N, client_key = "address" |
"header:X-Api-Key", priority = "default", reserve = 0.1 }``. Every key has a default; an
unknown key or a bad value raises ValueError naming the key.

``from_dict`` also reads the spelling of ``config.DemandSection`` (already-parsed values):
``limit = "gradient" | "aimd" | "fixed"`` picks the algorithm behind ``concurrency``, and
``rate_key`` (``"address"``/``"source"`` or ``"header:NAME"``) makes ``rate``/``burst`` apply
per client instead of to the whole route. ``None`` values are taken as absent, so
``DemandSettings.from_dict(section.model_dump())`` works.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from interknit.demand.limiter import Limiter
from interknit.demand.limits import AimdLimit, FixedLimit, GradientLimit, Limit
from interknit.demand.queue import PRIORITY_NAMES, Priority, parse_priority
from interknit.demand.rate import KeyedRateLimiter, TokenBucket, parse_rate
from interknit.durations import parse_duration

_ADAPTIVE = ("adaptive", "gradient")
_KEYS = frozenset(
    {
        "concurrency",
        "queue",
        "queue_timeout",
        "rate",
        "burst",
        "client_rate",
        "client_burst",
        "client_key",
        "priority",
        "reserve",
        "limit",
        "rate_key",
    }
)


@dataclass(frozen=True, slots=True)
class DemandSettings:
    """Demand control for one route. ``concurrency`` None means no concurrency limit."""

    concurrency: int | str | None = None  # N, "adaptive" (= "gradient") or "aimd"
    queue: int = 64
    queue_timeout: float = 0.1
    rate: float | None = None  # requests per second for the whole route
    burst: float | None = None
    client_rate: float | None = None  # requests per second per client key
    client_burst: float | None = None
    client_key: str = "address"  # or "header:NAME"
    priority: Priority = 1
    reserve: float = 0.1

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> DemandSettings:
        """Read a ``demand`` table; ValueError("key: reason") on the first bad key."""
        unknown = sorted(set(data) - _KEYS)
        if unknown:
            raise ValueError(f"{unknown[0]}: unknown key")
        out: dict[str, Any] = {}
        for key, raw in data.items():
            if raw is None:
                continue
            try:
                out[key] = _read(key, raw)
            except (ValueError, TypeError) as exc:
                raise ValueError(f"{key}: {exc}") from None
        algorithm = out.pop("limit", None)
        if algorithm is not None:
            concurrency = out.get("concurrency")
            if algorithm == "fixed":
                if not isinstance(concurrency, int):
                    raise ValueError("limit: 'fixed' needs a number for concurrency")
            elif concurrency is None or concurrency in _ADAPTIVE:
                out["concurrency"] = algorithm
            else:
                raise ValueError(f"limit: {algorithm!r} needs concurrency = 'adaptive'")
        rate_key = out.pop("rate_key", None)
        if rate_key is not None:
            out["client_key"] = rate_key
            if "rate" in out:
                out["client_rate"] = out.pop("rate")
            if "burst" in out:
                out["client_burst"] = out.pop("burst")
        return cls(**out)

    def build_limit(self) -> Limit | None:
        c = self.concurrency
        if c is None:
            return None
        if isinstance(c, int):
            return FixedLimit(c)
        if c in _ADAPTIVE:
            return GradientLimit()
        return AimdLimit()

    def build_limiter(self) -> Limiter:
        return Limiter(
            self.build_limit(),
            queue=self.queue,
            queue_timeout=self.queue_timeout,
            reserve=self.reserve,
        )

    def build_rate(self) -> TokenBucket | None:
        return None if self.rate is None else TokenBucket(self.rate, self.burst)

    def build_client_rate(self) -> KeyedRateLimiter | None:
        if self.client_rate is None:
            return None
        return KeyedRateLimiter(self.client_rate, self.client_burst)

    @property
    def client_header(self) -> str | None:
        """The lower-case header that keys per-client buckets, or None for the address."""
        if self.client_key.startswith("header:"):
            return self.client_key[len("header:") :].strip().lower()
        return None


def _read(key: str, raw: Any) -> Any:
    if key == "concurrency":
        if isinstance(raw, bool):
            raise ValueError("must be a number or 'adaptive'")
        if isinstance(raw, int):
            if raw < 1:
                raise ValueError("must be at least 1")
            return raw
        if raw in (*_ADAPTIVE, "aimd"):
            return raw
        raise ValueError("must be a number, 'adaptive' or 'aimd'")
    if key == "queue":
        if isinstance(raw, bool) or not isinstance(raw, int) or raw < 0:
            raise ValueError("must be a whole number, 0 or more")
        return raw
    if key == "queue_timeout":
        seconds = float(raw) if isinstance(raw, int | float) and not isinstance(raw, bool) else None
        if seconds is None:
            seconds = parse_duration(raw)
        if seconds <= 0.0:
            raise ValueError("must be more than zero")
        return seconds
    if key in ("rate", "client_rate"):
        return parse_rate(raw)
    if key in ("burst", "client_burst"):
        if isinstance(raw, bool) or not isinstance(raw, int | float) or raw < 1:
            raise ValueError("must be a number, 1 or more")
        return float(raw)
    if key == "limit":
        if raw not in ("gradient", "aimd", "fixed"):
            raise ValueError("must be 'gradient', 'aimd' or 'fixed'")
        return raw
    if key in ("client_key", "rate_key"):
        if raw == "source":
            return "address"
        if raw == "address" or (
            isinstance(raw, str) and raw.startswith("header:") and raw[len("header:") :].strip()
        ):
            return raw
        raise ValueError("must be 'address' or 'header:NAME'")
    if key == "priority":
        priority = parse_priority(raw) if isinstance(raw, str) else None
        if priority is None:
            raise ValueError(f"must be one of {', '.join(PRIORITY_NAMES)}")
        return priority
    if key == "reserve":
        if isinstance(raw, bool) or not isinstance(raw, int | float) or not 0 <= raw < 1:
            raise ValueError("must be a share in [0, 1)")
        return float(raw)
    raise ValueError("unknown key")  # pragma: no cover - guarded by _KEYS
