"""The proxy-facing adapter: one gate per route behind the proxy's Admission interface."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any

import pytest

from interknit.demand.deadline import parse_request_timeout
from interknit.demand.overload import OverloadMonitor
from interknit.demand.route import DemandAdmissions, RouteAdmission, Ticket
from interknit.demand.settings import DemandSettings


@dataclass(frozen=True)
class Route:
    label: str
    timeout: float | None = None


def source(**settings: object) -> DemandAdmissions:
    by_label = {"limited": DemandSettings.from_dict(settings)}
    return DemandAdmissions(lambda route: by_label.get(route.label), overload=OverloadMonitor())


async def test_routes_without_settings_have_no_admission_and_gates_are_cached() -> None:
    admissions = source(concurrency=2)
    assert admissions.admission(Route("free")) is None
    first = admissions.admission(Route("limited"))
    assert isinstance(first, RouteAdmission)
    assert admissions.admission(Route("limited")) is first
    assert admissions.gates() == [first.gate]


def admit(admission: RouteAdmission, **demand: Any) -> Ticket:
    """A ticket decided at once (these tests never queue)."""
    ticket = admission.admit(0.0, on_decided=lambda: pytest.fail("decided later"), **demand)
    assert ticket.admitted or ticket.refused
    return ticket


async def test_admit_release_and_rejection_details() -> None:
    admissions = source(concurrency=1, queue=0, reserve=0.0)
    admission = admissions.admission(Route("limited", timeout=2.0))
    assert admission is not None
    permit = admit(admission, request_timeout=b"500ms", priority=b"critical")
    assert permit.admitted and not permit.refused
    forwarded = permit.forward_timeout()
    assert forwarded is not None and 0.0 < parse_request_timeout(forwarded) <= 0.5
    refused = admit(admission)
    assert refused.refused and not refused.admitted
    assert (refused.status, refused.reason, refused.retry_after) == (503, "queue_full", 1)
    permit.release(True, 0.0)
    again = admit(admission)
    assert again.admitted
    # A failed exchange is fed to the limit as a drop and frees the slot all the same.
    again.release(False, 0.0)
    assert admission.gate.limiter is not None and admission.gate.limiter.inflight == 0
    again.release(False, 0.0)  # once only: a second release changes nothing
    assert admission.gate.limiter.inflight == 0


async def test_a_queued_ticket_is_decided_by_callback_or_cancelled() -> None:
    admission = source(concurrency=1, queue=4, reserve=0.0, queue_timeout="5s").admission(
        Route("limited")
    )
    assert admission is not None
    held = admit(admission)
    decided = asyncio.Event()
    waiting = admission.admit(0.0, on_decided=decided.set)
    assert not waiting.admitted and not waiting.refused
    gone = admission.admit(0.0, on_decided=lambda: pytest.fail("cancelled"))
    limiter = admission.gate.limiter
    assert limiter is not None and len(limiter.queue) == 2
    gone.cancel()  # its client left: the place is free at once
    assert len(limiter.queue) == 1
    held.release(True, 0.0)
    await asyncio.wait_for(decided.wait(), 5)
    assert waiting.admitted and limiter.inflight == 1
    waiting.release(True, 0.0)
    assert limiter.inflight == 0


async def test_route_timeout_is_the_default_deadline() -> None:
    admission = source(concurrency=4).admission(Route("limited", timeout=0.25))
    assert admission is not None
    permit = admit(admission)
    assert permit.admitted and permit.forward_timeout() is not None
    bare = source(concurrency=4).admission(Route("limited"))
    assert bare is not None
    unbounded = admit(bare)
    assert unbounded.admitted and unbounded.forward_timeout() is None


async def test_rate_limit_per_client_from_config_spelling() -> None:
    admissions = DemandAdmissions(
        lambda route: DemandSettings.from_dict(
            {"rate": "1/m", "burst": 1, "rate_key": "source", "concurrency": None}
        )
    )
    admission = admissions.admission(Route("any"))
    assert admission is not None
    assert admit(admission, client_key="10.0.0.1").admitted
    assert admit(admission, client_key="10.0.0.2").admitted
    refused = admit(admission, client_key="10.0.0.1")
    assert refused.refused and refused.status == 429


async def test_overloaded_for_the_node_health() -> None:
    admissions = DemandAdmissions(
        lambda route: DemandSettings(concurrency=1, queue=0, reserve=0.0),
        overload=OverloadMonitor(min_requests=5),
    )
    admission = admissions.admission(Route("r"))
    assert admission is not None and not admissions.overloaded()
    held = admit(admission)
    results = [admit(admission).refused for _ in range(10)]
    assert results == [True] * 10
    assert admissions.overloaded()
    assert held.admitted
    held.release(True, 0.0)


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        ({"concurrency": "adaptive", "limit": "aimd"}, "aimd"),
        ({"concurrency": "adaptive", "limit": "gradient"}, "gradient"),
        ({"concurrency": 5, "limit": "fixed"}, 5),
        ({"concurrency": 5, "limit": None, "queue_timeout": 0.2}, 5),
    ],
)
def test_settings_read_the_config_section_spelling(
    data: dict[str, object], expected: object
) -> None:
    assert DemandSettings.from_dict(data).concurrency == expected


@pytest.mark.parametrize(
    "data",
    [{"concurrency": "adaptive", "limit": "fixed"}, {"concurrency": 5, "limit": "aimd"}],
)
def test_settings_reject_contradictions(data: dict[str, object]) -> None:
    with pytest.raises(ValueError, match=r"^limit: "):
        DemandSettings.from_dict(data)
