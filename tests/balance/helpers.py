"""Small builders shared by the balance tests."""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence

from interknit.balance.base import Endpoint
from interknit.balance.pool import EndpointState, Health

# Upper 0.1% points of the chi-square distribution by degrees of freedom: with a fixed seed the
# draws are the same every run, and a correct sampler passes these with a wide margin.
CHI2_999 = {
    1: 10.83,
    2: 13.82,
    3: 16.27,
    4: 18.47,
    5: 20.52,
    6: 22.46,
    7: 24.32,
    8: 26.12,
    9: 27.88,
    10: 29.59,
}


def endpoints(*weights: int, prefix: str = "svc/") -> list[Endpoint]:
    """Endpoints named ``svc/a``, ``svc/b``, ... with the given weights."""
    return [
        Endpoint(
            key=f"{prefix}{chr(ord('a') + i)}", address=f"10.0.0.{i + 1}", port=8000 + i, weight=w
        )
        for i, w in enumerate(weights)
    ]


def many(count: int, prefix: str = "svc/") -> list[Endpoint]:
    return [
        Endpoint(key=f"{prefix}{i}", address=f"10.1.{i // 250}.{i % 250 + 1}", port=9000)
        for i in range(count)
    ]


def chi_square(counts: Counter[str], expected: dict[str, float]) -> float:
    return sum((counts[key] - e) ** 2 / e for key, e in expected.items())


def assert_distribution(counts: Counter[str], weights: dict[str, float]) -> None:
    """Counts fit the weights at the 0.1% level (and name nothing else)."""
    assert set(counts) <= set(weights), counts
    total = sum(counts.values())
    weight_sum = sum(weights.values())
    expected = {key: total * w / weight_sum for key, w in weights.items() if w > 0}
    stat = chi_square(counts, expected)
    assert stat < CHI2_999[len(expected) - 1], (stat, counts, expected)


def instance(
    id: str,
    health: Health = "passing",
    *,
    service: str = "svc",
    weight: int = 1,
    port: int = 8000,
    address: str = "10.0.0.1",
    ejected_until: float | None = None,
    meta: tuple[tuple[str, str], ...] = (),
) -> EndpointState:
    """A registry instance ``service/id`` as a pool is told about it."""
    return EndpointState(
        key=f"{service}/{id}",
        address=address,
        port=port,
        weight=weight,
        meta=meta,
        health=health,
        ejected_until=ejected_until,
    )


def keys(eps: Sequence[Endpoint | None]) -> list[str | None]:
    return [None if ep is None else ep.key for ep in eps]
