"""The registry's write path against a real SQLite store whose disk can be made to say no:
group commit, writes that change nothing, a failed commit and the recovery after it.

Nothing here waits a fixed time for another thread or task to get somewhere: the disk says
when a commit has reached it, and the tests wait for that (or for the state they need) with a
generous deadline.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from interknit.registry.api import RegistryApi
from interknit.registry.model import Check, InstanceSpec
from interknit.registry.registry import Registry, Unavailable
from interknit.registry.store import Batch, SqliteStore, StoreError

SPEC = InstanceSpec(address="10.0.0.1", port=80)


class Disk(SqliteStore):
    """The real store, with a gate that holds commits and a switch that makes them fail."""

    def __init__(self, path: Path) -> None:
        super().__init__(path)
        self.gate = threading.Event()
        self.gate.set()
        self.fail = False
        self.commits: list[Batch] = []
        self.arrived = 0  # commits that reached the disk (some may wait at the gate)

    def commit(self, batch: Batch) -> None:
        self.arrived += 1
        self.gate.wait(30)
        if self.fail:
            raise StoreError("disk full")
        super().commit(batch)
        self.commits.append(batch)


async def until(condition: Callable[[], bool], timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.005)


def registered(registry: Registry, *ids: str) -> Callable[[], bool]:
    """The writes were applied in memory (and queued for the disk): on the writer's state,
    which readers do not see until the commit is on the disk."""
    return lambda: all(registry._writer.get("api", i) is not None for i in ids)


async def timers_asleep_until_the_lease(registry: Registry) -> None:
    """The lease timers task is waiting for the soonest deadline (and nothing woke it)."""
    wake = registry._timer_wake
    assert wake is not None
    await until(
        lambda: registry._timer_due == registry._writer.next_deadline() and not wake.is_set()
    )


async def started(path: Path) -> tuple[Registry, Disk]:
    disk = Disk(path)
    registry = Registry(disk)
    await registry.start()
    return registry, disk


async def test_writes_queued_during_a_commit_share_the_next_one(tmp_path: Path) -> None:
    registry, disk = await started(tmp_path)
    disk.gate.clear()
    first = asyncio.create_task(registry.register("api", "a", SPEC))
    await until(lambda: disk.arrived == 1)  # the committer now holds "a" at the gate
    names = [f"b{n}" for n in range(10)]
    rest = [asyncio.create_task(registry.register("api", name, SPEC)) for name in names]
    await until(registered(registry, *names))
    assert not first.done()
    disk.gate.set()
    await asyncio.gather(first, *rest)
    assert [len(b.upserts) for b in disk.commits] == [1, 10]
    await registry.close()


async def test_a_write_that_changes_nothing_waits_for_the_commit_it_repeats(
    tmp_path: Path,
) -> None:
    registry, disk = await started(tmp_path)
    disk.gate.clear()
    original = asyncio.create_task(registry.register("api", "a", SPEC))
    await until(lambda: disk.arrived == 1)
    repeat = asyncio.create_task(registry.register("api", "a", SPEC))
    # Answering it now would acknowledge what is not on the disk: given turns of the loop to
    # answer, it must not.
    done, _ = await asyncio.wait({repeat}, timeout=0.05)
    assert not done
    disk.gate.set()
    (_, rev1), (_, rev2) = await asyncio.gather(original, repeat)
    assert rev1 == rev2
    # With nothing in flight, the same registration is answered at once and writes nothing.
    await registry.register("api", "a", SPEC)
    assert len(disk.commits) == 1
    await registry.close()


async def test_a_failed_commit_fails_its_writes_and_those_behind_it_and_changes_nothing(
    tmp_path: Path,
) -> None:
    registry, disk = await started(tmp_path)
    await registry.register("api", "kept", SPEC)
    resyncs: list[int] = []
    registry.subscribe(lambda events: None, lambda: resyncs.append(registry.state.revision))
    revision = registry.state.revision
    disk.gate.clear()
    disk.fail = True
    arrived = disk.arrived
    doomed = asyncio.create_task(registry.register("api", "lost", SPEC))
    await until(lambda: disk.arrived == arrived + 1)
    behind = asyncio.create_task(registry.deregister("api", "kept"))
    await until(lambda: registry._writer.get("api", "kept") is None)
    disk.gate.set()
    for task in (doomed, behind):
        with pytest.raises(Unavailable, match="disk full"):
            await task
    # Readers never saw the failed writes: nothing to undo for them, nothing to rebuild.
    assert resyncs == []
    assert registry.state.get("api", "lost") is None
    assert registry.state.get("api", "kept") is not None
    assert registry.state.revision == revision
    disk.fail = False
    # Writes are refused until the writer's state is reloaded from the disk.
    for _ in range(200):
        try:
            _, rev = await registry.register("api", "later", SPEC)
            break
        except Unavailable:
            await asyncio.sleep(0.01)
    assert rev == revision + 1
    await registry.close()
    reopened, _ = await started(tmp_path)
    assert {i.id for i in reopened.state.instances("api")} == {"kept", "later"}
    await reopened.close()


async def test_close_commits_and_answers_what_is_queued(tmp_path: Path) -> None:
    registry, disk = await started(tmp_path)
    disk.gate.clear()
    names = [f"i{n}" for n in range(20)]
    writes = [asyncio.create_task(registry.register("api", name, SPEC)) for name in names]
    await until(lambda: disk.arrived == 1)
    await until(registered(registry, *names))
    closing = asyncio.create_task(registry.close())
    await asyncio.wait({closing}, timeout=0.05)  # close() is now waiting for the disk
    assert not closing.done()
    disk.gate.set()
    await closing
    assert all(task.done() and task.exception() is None for task in writes)
    reopened, _ = await started(tmp_path)
    assert len(reopened.state.instances("api")) == 20
    await reopened.close()


async def test_the_revision_survives_a_restart_when_the_last_commits_only_put(
    tmp_path: Path,
) -> None:
    # Put-only commits do not write the revision row; the newest mod_revision stands for it.
    registry, _ = await started(tmp_path)
    await registry.register("api", "a", SPEC)
    await registry.register("api", "b", SPEC)
    await registry.deregister("api", "a")  # writes the revision row: 3
    await registry.register("api", "c", SPEC)
    await registry.register("api", "c", InstanceSpec(address="10.0.0.2", port=80))
    assert registry.state.revision == 5
    await registry.close()
    reopened, _ = await started(tmp_path)
    assert reopened.state.revision == 5
    _, rev = await reopened.register("api", "d", SPEC)
    assert rev == 6
    await reopened.close()


async def test_a_batch_too_big_for_one_statement_or_with_deletes_commits_whole(
    tmp_path: Path,
) -> None:
    registry, disk = await started(tmp_path)
    gone, _ = await registry.register("api", "gone", SPEC)
    disk.gate.clear()
    arrived = disk.arrived
    first = asyncio.create_task(registry.register("api", "x", SPEC))
    await until(lambda: disk.arrived == arrived + 1)
    names = [f"i{n}" for n in range(300)]
    many = [asyncio.create_task(registry.register("api", name, SPEC)) for name in names]
    many.append(asyncio.create_task(registry.deregister("api", "gone")))
    await until(registered(registry, *names))
    await until(lambda: registry._writer.get("api", "gone") is None)
    disk.gate.set()
    await asyncio.gather(first, *many)
    assert [len(b.upserts) for b in disk.commits[-2:]] == [1, 300]
    assert disk.commits[-1].deletes == [gone.create_revision]
    revision = registry.state.revision
    await registry.close()
    reopened, _ = await started(tmp_path)
    assert reopened.state.revision == revision
    names = {i.id for i in reopened.state.instances("api")}
    assert names == {"x", *(f"i{n}" for n in range(300))}
    await reopened.close()


async def test_close_in_the_turn_a_write_woke_the_lease_timers(tmp_path: Path) -> None:
    # A write with a sooner lease deadline wakes the timers task; if close() cancels it in that
    # same turn, before it runs, asyncio.wait_for (3.11) returned the wake-up and swallowed the
    # cancellation: the task slept again until the deadline and close() hung. The interleaving
    # is made here directly: wake, then cancel, with no turn of the loop between.
    registry, _ = await started(tmp_path)
    await registry.register(
        "api", "a", InstanceSpec(address="10.0.0.1", port=80, check=Check(ttl=30.0))
    )
    await timers_asleep_until_the_lease(registry)
    (timers,) = registry._tasks
    assert registry._timer_wake is not None
    registry._timer_wake.set()
    closing = asyncio.ensure_future(registry.close())
    await asyncio.wait_for(asyncio.shield(closing), 5)
    assert timers.cancelled()


async def test_a_write_with_a_later_lease_does_not_wake_the_lease_timers(tmp_path: Path) -> None:
    # The timers sleep until the soonest lease; a commit wakes them only for a sooner one. The
    # time they wake by themselves was computed from two readings of the clock, came out a
    # little after the soonest deadline, and so every commit woke them for nothing.
    ticks = iter(range(10**9))
    registry = Registry(Disk(tmp_path), clock=lambda: 1000.0 + next(ticks) * 1e-6)
    await registry.start()
    ttl = InstanceSpec(address="10.0.0.1", port=80, check=Check(ttl=30.0))
    await registry.register("api", "a", ttl)
    await timers_asleep_until_the_lease(registry)  # until a's lease runs out
    wake = registry._timer_wake
    assert wake is not None
    wakes: list[None] = []
    set_wake = wake.set
    wake.set = lambda: (wakes.append(None), set_wake())[1]  # type: ignore[method-assign]
    for n in range(5):
        await registry.register("api", f"later{n}", ttl)
    assert wakes == []
    sooner = InstanceSpec(address="10.0.0.1", port=80, check=Check(ttl=5.0))
    await registry.register("api", "sooner", sooner)
    assert len(wakes) == 1
    await registry.close()


async def test_a_commit_answers_its_writes_before_it_tells_the_listeners(tmp_path: Path) -> None:
    # The answers go out first; the listeners (DNS, the proxy, watchers) are told in the same
    # callback of the loop, so nothing can act on an answer before they know.
    registry, _ = await started(tmp_path)
    order: list[str] = []
    registry.subscribe(lambda events: order.append(f"listener {len(events)}"))
    registry.on_answered(lambda: order.append("answers sent"))
    done = asyncio.Event()

    def answered(error: BaseException | None) -> None:
        order.append("answer")
        done.set()

    _, queued = registry.register_nowait("api", "a", SPEC, answered)
    assert queued
    await asyncio.wait_for(done.wait(), 5)
    assert order == ["answer", "answers sent", "listener 1"]
    await registry.close()


async def test_a_write_is_read_nowhere_before_its_commit_is_on_the_disk(tmp_path: Path) -> None:
    """Readers (the API, DNS, the proxy, watchers) see the registry's ``state``: a write waiting
    for its commit is in none of it, and when the commit lands all learn it in one callback,
    before its answer goes out."""
    registry, disk = await started(tmp_path)
    api = RegistryApi(registry)
    await registry.register("api", "kept", SPEC)
    revision = registry.state.revision
    told: list[list[str]] = []
    registry.subscribe(lambda events: told.append([e.instance.id for e in events]))
    disk.gate.clear()
    write = asyncio.create_task(registry.register("api", "new", SPEC))
    gone = asyncio.create_task(registry.deregister("api", "kept"))
    await until(lambda: registry._writer.get("api", "kept") is None)  # both applied, held
    assert not write.done()
    assert registry.state.get("api", "new") is None
    assert registry.state.get("api", "kept") is not None
    assert registry.state.revision == revision
    assert registry.state.events_since(revision) == ([], revision)
    assert not registry.changed_since("api", revision)
    listed = json.loads(api.lookup_body("api", False, None))
    assert [i["id"] for i in listed["instances"]] == ["kept"]
    assert told == []
    # What a reader sees when the answer is given: the write (read your writes).
    seen_at_answer: list[bool] = []
    third = asyncio.Event()

    def answered(error: BaseException | None) -> None:
        seen_at_answer.append(registry.state.get("api", "third") is not None)
        third.set()

    registry.register_nowait("api", "third", SPEC, answered)
    disk.gate.set()
    (inst, _), _ = await asyncio.gather(write, gone)
    await asyncio.wait_for(third.wait(), 5)
    assert registry.state.get("api", "new") == inst
    assert registry.state.get("api", "kept") is None
    assert [i for batch in told for i in batch] == ["new", "kept", "third"]
    assert seen_at_answer == [True]
    await registry.close()


async def test_a_failed_commit_shows_its_writes_to_no_reader(tmp_path: Path) -> None:
    """A commit that fails: its writes were never listed, counted or streamed, and the
    registry's revision never moved."""
    registry, disk = await started(tmp_path)
    api = RegistryApi(registry)
    await registry.register("api", "kept", SPEC)
    before = api.lookup_body("api", False, None)
    revision = registry.state.revision
    told: list[object] = []
    registry.subscribe(told.append, lambda: told.append("resync"))
    disk.gate.clear()
    disk.fail = True
    doomed = [
        asyncio.create_task(registry.register("api", "lost", SPEC)),
        asyncio.create_task(registry.register("other", "lost", SPEC)),
        asyncio.create_task(registry.set_operator("api", "kept", "draining")),
    ]
    await until(lambda: registry._writer.has_service("other"))  # applied by the writer
    for _ in range(3):  # every read while the commit is held, and after it failed
        assert api.lookup_body("api", False, None) == before
        assert not registry.state.has_service("other")
        assert registry.state.services()["api"].instances == 1
        assert registry.state.revision == revision
        disk.gate.set()
        await asyncio.wait(doomed)
    assert all(isinstance(t.exception(), Unavailable) for t in doomed)
    assert told == []
    await registry.close()
