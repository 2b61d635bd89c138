from __future__ import annotations

import pytest

from interknit.demand.limits import AimdLimit, FixedLimit, GradientLimit
from interknit.demand.queue import CRITICAL, DEFAULT
from interknit.demand.settings import DemandSettings


def test_defaults() -> None:
    s = DemandSettings.from_dict({})
    assert s == DemandSettings()
    assert s.build_limit() is None
    assert s.build_rate() is None and s.build_client_rate() is None
    assert s.priority == DEFAULT


def test_the_documented_example() -> None:
    s = DemandSettings.from_dict(
        {
            "concurrency": "adaptive",
            "queue": 64,
            "queue_timeout": "100ms",
            "rate": "500/s",
            "burst": 100,
            "priority": "critical",
            "client_rate": "10/s",
            "client_key": "header:X-Api-Key",
        }
    )
    assert isinstance(s.build_limit(), GradientLimit)
    assert s.queue_timeout == pytest.approx(0.1)
    assert s.rate == 500.0 and s.burst == 100.0
    assert s.priority == CRITICAL
    assert s.client_header == "x-api-key"
    limiter = s.build_limiter()
    assert limiter.queue.capacity == 64
    bucket = s.build_rate()
    assert bucket is not None and bucket.burst == 100.0
    assert s.build_client_rate() is not None


def test_limits_by_name() -> None:
    assert isinstance(DemandSettings.from_dict({"concurrency": 8}).build_limit(), FixedLimit)
    assert isinstance(DemandSettings.from_dict({"concurrency": "aimd"}).build_limit(), AimdLimit)
    assert isinstance(
        DemandSettings.from_dict({"concurrency": "gradient"}).build_limit(), GradientLimit
    )


@pytest.mark.parametrize(
    ("data", "key"),
    [
        ({"concurrency": 0}, "concurrency"),
        ({"concurrency": True}, "concurrency"),
        ({"concurrency": "lots"}, "concurrency"),
        ({"queue": -1}, "queue"),
        ({"queue_timeout": "soon"}, "queue_timeout"),
        ({"queue_timeout": "0s"}, "queue_timeout"),
        ({"rate": "500"}, "rate"),
        ({"burst": 0}, "burst"),
        ({"priority": "urgent"}, "priority"),
        ({"client_key": "cookie"}, "client_key"),
        ({"reserve": 1.0}, "reserve"),
        ({"qeue": 1}, "qeue"),
    ],
)
def test_bad_values_name_the_key(data: dict[str, object], key: str) -> None:
    with pytest.raises(ValueError, match=f"^{key}: "):
        DemandSettings.from_dict(data)
