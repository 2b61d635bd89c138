"""``interknit agent containers``: keeps the registry equal to what a container engine runs.

Registrator's loop, with its known failures designed out:

* It subscribes to the engine's events *before* listing containers, so a container that starts
  or dies during the listing is not missed.
* It reconciles both ways on every change: it registers what runs and removes what it owns
  that no longer runs (``meta.owner`` says what is its own), so registrations left behind by an
  earlier agent, or by a ``die`` event nobody received, go on the next reconciliation.
* When the event stream closes (the engine restarted, a proxy timed it out), it reconnects
  with ``since=`` the last event's time and lists again, instead of exiting.
* Every ``resync`` it reads the registry's state and the engine's again and writes only the
  differences, so watchers see nothing when nothing changed.
* Registrations without a check of their own carry a lease the agent renews, so that the
  registrations of a host whose agent died end on their own.

The decisions are pure (``labels.desired_all`` and ``reconcile.reconcile``); this module only
reads, writes and waits.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import time
from collections.abc import Coroutine
from typing import Any

from interknit.agent.container import Container, ContainerError
from interknit.agent.engine import Engine, EngineError, EngineEvent
from interknit.agent.labels import Key, Policy, desired_all
from interknit.agent.metrics import AgentMetrics
from interknit.agent.reconcile import Held, reconcile
from interknit.agent.registry_api import RegistryApi, RegistryUnavailable

log = logging.getLogger("interknit.agent.containers")

MAX_BACKOFF = 10.0
INSPECT_CONCURRENCY = 16
RECHECK_AFTER = 1.0


def _backoff(failures: int) -> float:
    return min(0.25 * 2.0 ** max(failures - 1, 0), MAX_BACKOFF)


class ContainerAgent:
    def __init__(
        self,
        engine: Engine,
        api: RegistryApi,
        policy: Policy,
        resync: float = 30.0,
        metrics: AgentMetrics | None = None,
    ) -> None:
        self.engine = engine
        self.api = api
        self.policy = policy
        self.resync = resync
        # What runs (by container id) and what the registry holds (by key), as last seen.
        self.containers: dict[str, Container] = {}
        self.held: dict[Key, Held] = {}
        self.lock = asyncio.Lock()
        self.since: str | None = None  # the last event's time, for a reconnect
        self.listed_at_ns = 0
        self.connected = False
        self.dirty = False  # a write failed: reconcile again soon
        self.retry_failures = 0
        self.wake = asyncio.Event()
        self.said: set[str] = set()  # problems already logged
        self.pending: set[asyncio.Task[None]] = set()  # rechecks to come
        self.metrics = metrics if metrics is not None else AgentMetrics()

    # ------------------------------------------------------------------ main

    async def run(self) -> None:
        await self._first_snapshot()
        tasks = [
            asyncio.create_task(self._engine_loop(), name="interknit-agent-engine"),
            asyncio.create_task(self._resync_loop(), name="interknit-agent-resync"),
        ]
        if self.policy.ttl:
            tasks.append(asyncio.create_task(self._renew_loop(), name="interknit-agent-renew"))
        try:
            await asyncio.gather(*tasks)
        finally:
            everything = [*tasks, *self.pending]
            for task in everything:
                task.cancel()
            for task in everything:
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task

    async def _first_snapshot(self) -> None:
        failures = 0
        while True:
            try:
                await self._snapshot()
                return
            except RegistryUnavailable as exc:
                failures += 1
                if failures == 1:
                    log.warning(
                        f"registry unreachable, retrying: {exc}",
                        extra={"event": "agent.registry_unreachable"},
                    )
                await asyncio.sleep(_backoff(failures))

    async def _snapshot(self) -> None:
        _, instances = await self.api.snapshot()
        async with self.lock:
            self.held = {(i.service, i.id): Held.of(i.spec) for i in instances}
        owned = sum(1 for h in self.held.values() if h.owner == self.policy.owner)
        log.debug("registry read", extra={"event": "agent.snapshot", "owned": owned})

    # ------------------------------------------------------------------ the engine

    async def _engine_loop(self) -> None:
        failures = 0
        while True:
            try:
                await self.engine.ping()
                async for event in self.engine.events(self.since):
                    if event is None:
                        # Subscribed: whatever happens from now on arrives as an event, so
                        # the listing cannot miss a change.
                        await self._list()
                        if failures:
                            log.info(
                                "engine reachable again",
                                extra={"event": "agent.engine_ok", "since": self.since},
                            )
                        failures = 0
                        self.connected = True
                        self.metrics.connected.set(1)
                        continue
                    await self._on_event(event)
                log.warning(
                    "the engine closed the event stream; reconnecting",
                    extra={"event": "agent.events_closed", "since": self.since},
                )
            except EngineError as exc:
                if failures == 0:
                    log.warning(
                        f"engine unreachable: {exc}",
                        extra={"event": "agent.engine_unreachable"},
                    )
            self.connected = False
            self.metrics.connected.set(0)
            self.metrics.reconnects.inc()
            failures += 1
            await asyncio.sleep(_backoff(failures))

    async def _list(self) -> None:
        listed_at = time.time_ns()
        ids = await self.engine.running()
        found = await self._inspect_all(ids)
        async with self.lock:
            self.containers = found
            self.listed_at_ns = listed_at
            await self._reconcile()
        log.info(
            "containers listed",
            extra={
                "event": "agent.listed",
                "running": len(found),
                "owned": self._owned(),
            },
        )

    async def _inspect_all(self, ids: list[str]) -> dict[str, Container]:
        gate = asyncio.Semaphore(INSPECT_CONCURRENCY)

        async def one(cid: str) -> Container | None:
            async with gate:
                return await self._inspect(cid)

        found = await asyncio.gather(*(one(cid) for cid in ids))
        return {c.id: c for c in found if c is not None and c.running}

    async def _inspect(self, cid: str) -> Container | None:
        try:
            return await self.engine.inspect(cid)
        except ContainerError as exc:
            self._say(f"container {cid[:12]}: the engine's description does not read: {exc}")
            return None

    async def _on_event(self, event: EngineEvent) -> None:
        heard = time.time_ns()
        self.metrics.events.labels(event.action).inc()
        if event.time_nano:
            self.since = event.since
        container: Container | None = None
        if event.action != "die" or event.time_nano < self.listed_at_ns:
            # A start, a health change, or a die replayed from before the last listing (the
            # container may run again since): ask the engine how it is now.
            container = await self._inspect(event.id)
        async with self.lock:
            if container is not None and container.running:
                self.containers[container.id] = container
            else:
                self.containers.pop(event.id, None)
            await self._reconcile()
        if event.action == "health_status":
            # Some engines send the event before the new status can be read (Podman 4 writes
            # its health log and its event from separate steps): look once more a moment later.
            self._later(RECHECK_AFTER, self._recheck(event.id))
        # How late the engine told (its event's time to here) and how long acting took.
        log.debug(
            "engine event",
            extra={
                "event": "agent.engine_event",
                "action": event.action,
                "id": event.id[:12],
                "told_ms": round((heard - event.time_nano) / 1e6, 1) if event.time_nano else None,
                "took_ms": round((time.time_ns() - heard) / 1e6, 1),
            },
        )

    async def _recheck(self, cid: str) -> None:
        try:
            container = await self._inspect(cid)
        except EngineError:
            return  # the engine loop sees the same and reconnects
        async with self.lock:
            if container is not None and container.running:
                if self.containers.get(cid) == container:
                    return
                self.containers[cid] = container
            elif cid in self.containers:
                del self.containers[cid]
            else:
                return
            await self._reconcile()

    def _later(self, delay: float, coro: Coroutine[Any, Any, None]) -> None:
        async def run() -> None:
            await asyncio.sleep(delay)
            await coro

        task = asyncio.create_task(run())
        self.pending.add(task)
        task.add_done_callback(self.pending.discard)

    # ------------------------------------------------------------------ the registry

    async def _reconcile(self) -> None:
        """Write what differs (the caller holds the lock)."""
        wanted, problems = desired_all(self.containers.values(), self.policy)
        for problem in problems:
            self._say(problem)
        owner = self.policy.owner
        plan = reconcile({k: d.spec for k, d in wanted.items()}, self.held, owner)
        for key in plan.conflicts:
            held = self.held[key]
            self._say(f"{key[0]}/{key[1]} is registered by {held.owner}; not overwritten")
        failed = False
        for key in plan.deletes:
            reply = await self.api.deregister(*key)
            self.metrics.writes.labels("deregister", reply.result).inc()
            if reply.result == "failed":
                failed = True
                self._write_failed("deregister", key, reply.error)
                continue
            self.held.pop(key, None)
            log.info(
                f"deregistered {key[0]}/{key[1]}",
                extra={"event": "agent.deregistered", "service": key[0], "id": key[1]},
            )
        for key, spec in plan.puts:
            reply = await self.api.register(key[0], key[1], spec.to_json())
            self.metrics.writes.labels("register", reply.result).inc()
            if reply.result != "ok":
                failed = True
                self._write_failed("register", key, reply.error)
                continue
            self.held[key] = Held(spec, owner)
            d = wanted[key]
            log.info(
                f"registered {key[0]}/{key[1]} at {spec.address}:{spec.port}",
                extra={
                    "event": "agent.registered",
                    "service": key[0],
                    "id": key[1],
                    "container": d.container[:12],
                },
            )
        self.metrics.running.set(len(self.containers))
        self.metrics.owned.set(self._owned())
        self.dirty = failed
        if failed:
            self.wake.set()
        else:
            self.retry_failures = 0

    def _write_failed(self, kind: str, key: Key, error: str) -> None:
        log.warning(
            f"{kind} {key[0]}/{key[1]} failed: {error}",
            extra={"event": "agent.write_failed", "write": kind},
        )

    async def _resync_loop(self) -> None:
        """Read both sides again every ``resync``; sooner, with a backoff, after a failed
        write."""
        loop = asyncio.get_running_loop()
        next_full = loop.time() + self.resync
        while True:
            timeout = max(0.0, next_full - loop.time())
            if self.dirty:
                timeout = min(timeout, _backoff(self.retry_failures + 1))
            self.wake.clear()
            try:
                await asyncio.wait_for(self.wake.wait(), timeout)
                continue  # a write failed meanwhile: wait for its retry instead
            except TimeoutError:
                pass
            if loop.time() < next_full:
                if self.dirty:
                    self.retry_failures += 1
                    async with self.lock:
                        await self._reconcile()
                continue
            next_full = loop.time() + self.resync
            try:
                await self._snapshot()
                if self.connected:
                    await self._list()
                else:
                    async with self.lock:
                        await self._reconcile()
            except (RegistryUnavailable, EngineError) as exc:
                log.warning(f"resync failed: {exc}", extra={"event": "agent.resync_failed"})

    async def _renew_loop(self) -> None:
        """Renew the leases of the registrations the agent owns. The renewals go out without
        the lock, so that a die event is not kept waiting behind hundreds of them."""
        assert self.policy.ttl
        every = self.policy.ttl / 3
        while True:
            await asyncio.sleep(every)
            keys = [
                k
                for k, h in self.held.items()
                if h.owner == self.policy.owner and h.spec.check and h.spec.check.ttl
            ]
            lost = []
            for key in keys:
                reply = await self.api.heartbeat(*key)
                if reply.result == "gone":
                    lost.append(key)
            if lost:
                async with self.lock:
                    for key in lost:
                        # The lease ran out while we could not renew it: register again.
                        self.held.pop(key, None)
                    await self._reconcile()

    # ------------------------------------------------------------------ helpers

    def _owned(self) -> int:
        return sum(1 for h in self.held.values() if h.owner == self.policy.owner)

    def _say(self, problem: str) -> None:
        if problem in self.said:
            return
        if len(self.said) > 10_000:
            self.said.clear()
        self.said.add(problem)
        log.warning(problem, extra={"event": "agent.problem"})


async def watch_containers(
    engine: Engine,
    api: RegistryApi,
    policy: Policy,
    resync: float,
    metrics: AgentMetrics | None = None,
) -> None:
    """Run the agent until SIGTERM or SIGINT. Its registrations stay: the containers still run,
    and the next agent (or the leases) takes care of them."""
    agent = ContainerAgent(engine, api, policy, resync, metrics)
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    log.info(
        "container agent started",
        extra={"event": "agent.started", "engine": engine.address, "owner": policy.owner},
    )
    runner = asyncio.create_task(agent.run(), name="interknit-agent")
    stopper = asyncio.create_task(stop.wait())
    try:
        await asyncio.wait({runner, stopper}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in (runner, stopper):
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await engine.close()
        await api.close()
        log.info("container agent stopped", extra={"event": "agent.stopped"})
