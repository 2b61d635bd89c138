"""The HealthChecker end to end: real backends on 127.0.0.1, a sink that records its calls."""

from __future__ import annotations

import asyncio
import logging
import math
import random
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

import pytest
from prometheus_client import CollectorRegistry

from interknit.health.checker import (
    MAX_INTERVAL,
    MIN_INTERVAL,
    NEVER_CHECKED_OUTPUT,
    HealthChecker,
    first_slot,
    next_slot,
    schedule_interval,
)
from interknit.registry.model import Check, CheckStatus, Instance, InstanceSpec
from tests.health.servers import read_request, serve

INTERVAL = 0.05


@dataclass
class Backend:
    """An HTTP backend answering a script of status codes, then ``then`` forever."""

    script: list[int] = field(default_factory=list)
    then: int = 200
    delay: float = 0.0
    requests: int = 0
    open: int = 0
    max_open: int = 0
    abandoned: int = 0  # requests whose client went away before the answer

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        self.open += 1
        self.max_open = max(self.max_open, self.open)
        try:
            code = self.script[self.requests] if self.requests < len(self.script) else self.then
            self.requests += 1
            if self.delay:
                try:
                    # Reading while we "work" notices a client that gives up.
                    gone = await asyncio.wait_for(reader.read(1), self.delay) == b""
                except TimeoutError:
                    gone = False
                except ConnectionError:
                    gone = True
                if gone:
                    self.abandoned += 1
                    return
            body = f"answer {self.requests}".encode()
            writer.write(
                f"HTTP/1.1 {code} X\r\nContent-Length: {len(body)}\r\n\r\n".encode() + body
            )
            await writer.drain()
        finally:
            self.open -= 1


@dataclass
class Sink:
    """Records every call with the number of requests its backend had served by then."""

    backend: Backend | None = None
    calls: list[tuple[str, str, CheckStatus, str]] = field(default_factory=list)
    at: list[tuple[CheckStatus, int]] = field(default_factory=list)
    fail_first: int = 0

    async def __call__(self, service: str, instance_id: str, status: CheckStatus, out: str) -> None:
        self.calls.append((service, instance_id, status, out))
        self.at.append((status, self.backend.requests if self.backend else -1))
        if len(self.calls) <= self.fail_first:
            raise RuntimeError("registry unavailable")


def instance(
    port: int,
    id: str = "i1",
    status: CheckStatus = "critical",
    output: str = NEVER_CHECKED_OUTPUT,
    **check: object,
) -> Instance:
    params: dict[str, object] = {"http": "/health", "interval": INTERVAL, "timeout": 0.5}
    params.update(check)
    spec = InstanceSpec(address="127.0.0.1", port=port, check=Check(**params))  # type: ignore[arg-type]
    return Instance(service="web", id=id, spec=spec, check_status=status, output=output)


@pytest.fixture
async def checker_factory() -> AsyncIterator[Callable[..., HealthChecker]]:
    made: list[HealthChecker] = []

    def make(sink: Sink, **kwargs: object) -> HealthChecker:
        checker = HealthChecker(sink, rng=random.Random(7), **kwargs)  # type: ignore[arg-type]
        made.append(checker)
        checker.start()
        return checker

    yield make
    for checker in made:
        await checker.stop()


async def until(condition: Callable[[], bool], timeout: float = 5.0) -> None:
    async with asyncio.timeout(timeout):
        # Polling: the conditions are plain counters bumped by servers and sinks.
        while True:
            if condition():
                return
            await asyncio.sleep(0.01)


def checks_done(checker: HealthChecker, id: str = "i1") -> int:
    stats = checker.target_stats("web", id)
    return 0 if stats is None else stats.checks


# ------------------------------------------------------------------ transitions


async def test_fails_then_recovers_at_the_expected_counts(
    checker_factory: Callable[..., HealthChecker],
) -> None:
    backend = Backend(script=[500, 500, 200, 200, 500, 500, 500, 500, 200, 200, 200, 200])
    sink = Sink(backend)
    async with serve(backend.handle) as port:
        checker = checker_factory(sink)
        checker.update(instance(port, rise=2, fall=3))
        await until(lambda: backend.requests >= 15)
    # New: its first result is written whatever it is (1: the registry says why it has not
    # passed); passing on the first success (3); 3 failures (5-7); rise 2 passes (9-10); the
    # steady results in between and after produce no calls.
    assert sink.at == [("critical", 1), ("passing", 3), ("critical", 7), ("passing", 10)]
    assert [c[:3] for c in sink.calls] == [
        ("web", "i1", "critical"),
        ("web", "i1", "passing"),
        ("web", "i1", "critical"),
        ("web", "i1", "passing"),
    ]
    assert sink.calls[0][3] == f"HTTP GET http://127.0.0.1:{port}/health: 500 X Output: answer 1"
    assert sink.calls[2][3] == f"HTTP GET http://127.0.0.1:{port}/health: 500 X Output: answer 7"


async def test_restored_passing_needs_fall_failures(
    checker_factory: Callable[..., HealthChecker],
) -> None:
    backend = Backend(then=503)
    sink = Sink(backend)
    async with serve(backend.handle) as port:
        checker = checker_factory(sink)
        checker.update(instance(port, status="passing", output="", fall=4))
        await until(lambda: backend.requests >= 6)
    assert sink.at == [("critical", 4)]


async def test_restored_critical_needs_rise_passes(
    checker_factory: Callable[..., HealthChecker],
) -> None:
    backend = Backend(then=200)
    sink = Sink(backend)
    async with serve(backend.handle) as port:
        checker = checker_factory(sink)
        checker.update(instance(port, output="HTTP GET ...: 500", rise=3))
        await until(lambda: backend.requests >= 5)
    assert sink.at == [("passing", 3)]


async def test_warning_is_reported_at_once(checker_factory: Callable[..., HealthChecker]) -> None:
    backend = Backend(script=[200, 429, 429, 200])
    sink = Sink(backend)
    async with serve(backend.handle) as port:
        checker = checker_factory(sink)
        checker.update(instance(port))
        await until(lambda: backend.requests >= 6)
    assert sink.at == [("passing", 1), ("warning", 2), ("passing", 4)]


async def test_tcp_check(checker_factory: Callable[..., HealthChecker]) -> None:
    sink = Sink()
    accepted = 0

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal accepted
        accepted += 1

    async with serve(handler) as port:
        checker = checker_factory(sink)
        checker.update(instance(port, http=None, tcp=True, fall=2))
        await until(lambda: len(sink.calls) == 1)
        assert sink.calls[0][2:] == ("passing", f"TCP connect 127.0.0.1:{port}: Success")
    # The listener is gone: connections are refused, and after two of them it is critical.
    await until(lambda: len(sink.calls) == 2)
    assert sink.calls[1][2:] == ("critical", f"TCP connect 127.0.0.1:{port}: connection refused")
    assert accepted >= 1


async def test_sink_failure_is_retried_after_the_next_check(
    checker_factory: Callable[..., HealthChecker],
) -> None:
    backend = Backend(then=200)
    sink = Sink(backend, fail_first=1)
    async with serve(backend.handle) as port:
        checker = checker_factory(sink)
        checker.update(instance(port))
        await until(lambda: backend.requests >= 5)
    assert sink.at == [("passing", 1), ("passing", 2)]


async def test_status_the_registry_lost_is_reported_again(
    checker_factory: Callable[..., HealthChecker],
) -> None:
    backend = Backend(then=200)
    sink = Sink(backend)
    async with serve(backend.handle) as port:
        checker = checker_factory(sink)
        inst = instance(port)
        checker.update(inst)
        await until(lambda: len(sink.calls) == 1)
        # The registry comes back holding "critical" (say, restored from an older copy): the
        # machine stays passing and the next check tells the registry again.
        checker.update(inst.evolve(output="restored"))
        seen = backend.requests
        await until(lambda: len(sink.calls) == 2)
        assert sink.at[1] == ("passing", seen + 1)
        assert checker.status("web", "i1") == "passing"


# ------------------------------------------------------------------ instances come and go


async def test_update_with_a_new_check_starts_a_new_machine(
    checker_factory: Callable[..., HealthChecker],
) -> None:
    backend = Backend(then=500)
    sink = Sink(backend)
    async with serve(backend.handle) as port:
        checker = checker_factory(sink)
        checker.update(instance(port, status="passing", output="", fall=100))
        await until(lambda: backend.requests >= 2)
        assert checker.status("web", "i1") == "passing"
        # A changed check: the registry reset it to critical, never checked.
        checker.update(instance(port, http="/other", fall=100))
        assert checker.status("web", "i1") == "critical"
        target = checker.target_stats("web", "i1")
        assert target is not None and target.checks == 0
    assert sink.calls == []


async def test_remove_and_sync(checker_factory: Callable[..., HealthChecker]) -> None:
    a, b = Backend(), Backend()
    sink = Sink()
    async with serve(a.handle) as port_a, serve(b.handle) as port_b:
        checker = checker_factory(sink)
        ttl = Instance(
            service="web", id="t", spec=InstanceSpec("127.0.0.1", 1, check=Check(ttl=10.0))
        )
        bare = Instance(service="web", id="n", spec=InstanceSpec("127.0.0.1", 1))
        checker.sync([instance(port_a, id="a"), instance(port_b, id="b"), ttl, bare])
        assert len(checker) == 2
        assert ("web", "t") not in checker and ("web", "n") not in checker
        await until(lambda: a.requests >= 1 and b.requests >= 1)

        checker.sync([instance(port_a, id="a")])
        assert ("web", "b") not in checker
        checker.remove("web", "a")
        assert len(checker) == 0
        # Let any check already in flight land, then nothing more arrives.
        await asyncio.sleep(4 * INTERVAL)
        seen = (a.requests, b.requests)
        await asyncio.sleep(4 * INTERVAL)
        assert (a.requests, b.requests) == seen


async def test_update_to_a_ttl_check_stops_checking(
    checker_factory: Callable[..., HealthChecker],
) -> None:
    sink = Sink()
    checker = checker_factory(sink)
    checker.update(instance(1))
    assert len(checker) == 1
    checker.update(instance(1, http=None, ttl=5.0))
    assert len(checker) == 0


async def test_new_address_is_used_from_the_next_check(
    checker_factory: Callable[..., HealthChecker],
) -> None:
    old, new = Backend(then=500), Backend(then=500)
    sink = Sink()
    async with serve(old.handle) as port_old, serve(new.handle) as port_new:
        checker = checker_factory(sink)
        inst = instance(port_old, status="passing", output="", fall=100)
        checker.update(inst)
        await until(lambda: old.requests >= 1)
        spec = InstanceSpec("127.0.0.1", port_new, check=inst.spec.check)
        checker.update(inst.evolve(spec=spec))
        await until(lambda: new.requests >= 2)
        assert checker.status("web", "i1") == "passing"  # the same machine carried on


async def test_an_earlier_instance_wakes_the_scheduler(
    checker_factory: Callable[..., HealthChecker],
) -> None:
    backend = Backend()
    sink = Sink()
    async with serve(backend.handle) as port:
        checker = checker_factory(sink)
        checker.update(instance(port, id="slow", interval=3600.0))
        await asyncio.sleep(0.02)  # the scheduler is now asleep until the slow one's slot
        checker.update(instance(port, id="fast"))
        await until(lambda: len(sink.calls) == 1)
    assert sink.calls[0][:3] == ("web", "fast", "passing")


async def test_a_bad_interval_never_stops_the_checks(
    checker_factory: Callable[..., HealthChecker],
) -> None:
    """A zero, negative or NaN interval (the API refuses them, but a Check can be built by
    hand or read back from an older store) once killed the instance's check task with a
    ZeroDivisionError after its first check; it was never checked again."""
    backend = Backend()
    sink = Sink()
    async with serve(backend.handle) as port:
        checker = checker_factory(sink)
        bad = {"zero": 0.0, "negative": -1.0, "nan": math.nan}
        for id, interval in bad.items():
            checker.update(instance(port, id=id, interval=interval))
        checker.update(instance(port, id="good"))
        await until(lambda: all(checks_done(checker, id) >= 5 for id in [*bad, "good"]))
    assert {call[1] for call in sink.calls} == {*bad, "good"}


def test_schedule_interval_keeps_within_bounds() -> None:
    assert schedule_interval(Check(http="/", interval=2.0)) == 2.0
    for bad in (0.0, -5.0, math.nan, 0.001):
        assert schedule_interval(Check(http="/", interval=bad)) == MIN_INTERVAL
    assert schedule_interval(Check(http="/", interval=math.inf)) == MAX_INTERVAL
    assert next_slot(10.0, 0.0, now=10.0) == pytest.approx(10.0 + MIN_INTERVAL)


# ------------------------------------------------------------------ concurrency and stop


async def test_in_flight_checks_are_bounded(
    checker_factory: Callable[..., HealthChecker],
) -> None:
    backend = Backend(delay=0.1)
    sink = Sink()
    async with serve(backend.handle) as port:
        checker = checker_factory(sink, max_in_flight=2)
        for i in range(6):
            checker.update(instance(port, id=f"i{i}"))
        await until(lambda: backend.requests >= 10)
        assert checker.in_flight <= 2
    assert backend.max_open == 2
    stats = checker.lag_stats()
    assert stats.count >= 10
    assert stats.max >= stats.p99 >= stats.p50 >= 0


async def test_stop_cancels_checks_in_flight(checker_factory: Callable[..., HealthChecker]) -> None:
    backend = Backend(delay=10.0)
    sink = Sink()
    async with serve(backend.handle) as port:
        checker = checker_factory(sink)
        checker.update(instance(port))
        await until(lambda: backend.open == 1)
        await checker.stop()
        assert checker.in_flight == 0
        # The probe's connection is closed, not left hanging.
        await until(lambda: backend.abandoned == 1)
        assert backend.open == 0
    assert sink.calls == []


# ------------------------------------------------------------------ what it exposes


async def test_metrics_and_stats(checker_factory: Callable[..., HealthChecker]) -> None:
    registry = CollectorRegistry()
    backend = Backend(script=[500], then=200)
    sink = Sink(backend)
    async with serve(backend.handle) as port:
        checker = checker_factory(sink, registry=registry)
        checker.update(instance(port))
        await until(lambda: checks_done(checker) >= 3)

    def value(name: str, **labels: str) -> float | None:
        return registry.get_sample_value(name, labels)

    assert (
        value("interknit_health_checks_total", service="web", instance="i1", result="critical") == 1
    )
    passing = value("interknit_health_checks_total", service="web", instance="i1", result="passing")
    assert passing is not None and passing >= 2
    count = value("interknit_health_check_seconds_count", service="web")
    assert count is not None and count >= 3
    last = value("interknit_health_check_last_seconds", service="web", instance="i1")
    assert last is not None and last >= 0
    assert value("interknit_health_transitions_total", service="web", to="passing") == 1
    lag_count = value("interknit_health_check_lag_seconds_count")
    assert lag_count is not None and lag_count >= 3

    stats = checker.target_stats("web", "i1")
    assert stats is not None
    assert stats.status == "passing" and stats.last_result == "passing"
    assert stats.last_latency is not None and stats.last_lag is not None
    assert stats.last_output.startswith("HTTP GET")

    checker.remove("web", "i1")
    assert checker.target_stats("web", "i1") is None
    assert (
        value("interknit_health_checks_total", service="web", instance="i1", result="passing")
        is None
    )
    assert value("interknit_health_check_last_seconds", service="web", instance="i1") is None


async def test_transitions_are_logged_with_their_output(
    checker_factory: Callable[..., HealthChecker], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="interknit.health")
    backend = Backend(then=200)
    sink = Sink(backend)
    async with serve(backend.handle) as port:
        checker = checker_factory(sink)
        checker.update(instance(port))
        await until(lambda: len(sink.calls) == 1)
    records = [r for r in caplog.records if getattr(r, "event", None) == "health.transition"]
    assert len(records) == 1
    record = records[0]
    assert record.__dict__["service"] == "web"
    assert record.__dict__["instance"] == "i1"
    assert record.__dict__["previous"] == "critical"
    assert record.__dict__["health"] == "passing"
    assert record.__dict__["output"].endswith("200 X Output: answer 1")
    assert record.levelno == logging.INFO


# ------------------------------------------------------------------ schedule arithmetic


def test_next_slot_stays_on_the_grid() -> None:
    assert next_slot(10.0, 1.0, now=10.5) == 11.0  # ahead: the next slot
    assert next_slot(10.0, 1.0, now=11.4) == 11.0  # a little late: run it now
    assert next_slot(10.0, 1.0, now=13.5) == 13.0  # behind by whole slots: skip them
    due, now = 0.0, 0.0
    for _ in range(1000):  # a check that always takes 0.3 of its interval does not drift
        now = due + 0.3
        due = next_slot(due, 1.0, now)
    assert due == pytest.approx(1000.0)


def test_first_slot_is_within_one_interval() -> None:
    rng = random.Random(1)
    slots = [first_slot(100.0, 2.0, rng) for _ in range(1000)]
    assert all(100.0 <= s <= 102.0 for s in slots)
    assert max(slots) - min(slots) > 1.5  # spread out, not lock-step


def test_max_in_flight_must_be_positive() -> None:
    with pytest.raises(ValueError):
        HealthChecker(Sink(), max_in_flight=0)


# ------------------------------------------------------------------ bounds (issue 13)


async def test_the_node_wide_cap_holds_checks_to_its_rate_and_counts_the_late(
    checker_factory: Callable[..., HealthChecker],
) -> None:
    """40 instances at a 50 ms interval are 800 checks due a second; capped at 100 a second,
    a second of it starts about 200 (a second's worth at once, then 100 a second)."""
    backend = Backend()
    metrics = CollectorRegistry()
    async with serve(backend.handle) as port:
        checker = checker_factory(Sink(backend), registry=metrics, max_per_second=100)
        for n in range(40):
            checker.update(instance(port, id=f"i{n}"))
        await asyncio.sleep(1.0)
        started = sum(checks_done(checker, f"i{n}") for n in range(40))
    assert 100 <= started <= 220, started
    throttled = metrics.get_sample_value("interknit_health_checks_throttled_total")
    assert throttled is not None and throttled > 0


async def test_no_cap_no_throttling(checker_factory: Callable[..., HealthChecker]) -> None:
    backend = Backend()
    metrics = CollectorRegistry()
    async with serve(backend.handle) as port:
        checker = checker_factory(Sink(backend), registry=metrics, max_per_second=100_000)
        for n in range(5):
            checker.update(instance(port, id=f"i{n}"))
        await until(lambda: all(checks_done(checker, f"i{n}") >= 3 for n in range(5)))
    assert metrics.get_sample_value("interknit_health_checks_throttled_total") == 0


async def test_an_interval_under_the_floor_is_checked_at_the_floor(
    checker_factory: Callable[..., HealthChecker],
) -> None:
    """A check stored before the floor existed (or through a node with a lower one) is
    scheduled at the node's floor, not at its own interval."""
    backend = Backend()
    async with serve(backend.handle) as port:
        checker = checker_factory(Sink(backend), min_interval=0.25)
        checker.update(instance(port, interval=0.01))
        await asyncio.sleep(1.0)
        done = checks_done(checker)
    assert 2 <= done <= 6, done  # about 4 at 250 ms, where 10 ms would be about 100
