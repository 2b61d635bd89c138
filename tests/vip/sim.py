"""A simulated VIP cluster: real ``Core`` objects, a simulated store, network and clocks.

Everything runs on one virtual timeline (true time ``t``). Each node reads its own clock, which
runs at a rate within ``1 +- rho`` of true time from an arbitrary offset; requests to the store
and their answers take random times (some far longer than the shell's timeout, so an answer
may be lost while the request still commits later); store views reach each node late and in
order; adverts are late or lost; a node's timers fire late, by less than ``lag``. Nodes crash
(their addresses vanish with them, as with a dead machine or the guard process), restart, stop
gracefully, lose the store, lose each other, and fail their own health.

What the shell does is mirrored here: effects are carried out in order, an address is removed
before the transaction that follows it is sent, confirmations go out every quarter of
``fence``, keepalives every third of the lease TTL.

``Sim.owners_log`` records every moment an address is added; ``Sim.violations`` every add that
happened while another live node had the same address.
"""

from __future__ import annotations

import heapq
import itertools
import math
import random
from collections.abc import Callable
from dataclasses import dataclass, field

from interknit.vip import machine as m

REQUEST_TIMEOUT = 0.5
LEASE_TTL = 2.0


@dataclass
class SMember:
    epoch: int
    lease: int
    live: bool = True
    weight: int = 1


@dataclass
class SClaim:
    holder: str
    epoch: int
    version: int


class Store:
    """The store's truth; operations apply atomically at the moment they arrive."""

    def __init__(self) -> None:
        self.rev = 1
        self.members: dict[str, SMember] = {}
        self.claims: dict[str, SClaim] = {}
        self.leases: dict[int, float] = {}  # id -> expiry (true time)
        self.lease_ids = itertools.count(1000)
        self.listeners: list[Callable[[], None]] = []

    def expire(self, t: float) -> None:
        gone = [lease for lease, until in self.leases.items() if until <= t]
        for lease in gone:
            self.revoke(lease)

    def _bump(self) -> int:
        self.rev += 1
        for listener in self.listeners:
            listener()
        return self.rev

    def revoke(self, lease: int) -> None:
        if self.leases.pop(lease, None) is None:
            return
        names = [n for n, mem in self.members.items() if mem.lease == lease]
        for name in names:
            del self.members[name]
        if names:
            self.rev += 1
            for listener in self.listeners:
                listener()

    def join(self, name: str, weight: int, t: float) -> tuple[int, int]:
        old = self.members.get(name)
        if old is not None:
            self.revoke(old.lease)
        lease = next(self.lease_ids)
        self.leases[lease] = t + LEASE_TTL
        self.rev += 1
        self.members[name] = SMember(self.rev, lease, True, weight)
        for listener in self.listeners:
            listener()
        return self.rev, lease

    def keepalive(self, lease: int, t: float) -> None:
        if lease in self.leases:
            self.leases[lease] = t + LEASE_TTL

    def alive(self, name: str, epoch: int) -> bool:
        member = self.members.get(name)
        return member is not None and member.epoch == epoch

    def claim(self, name: str, e: m.ClaimVip) -> int | None:
        claim = self.claims.get(e.vip)
        if (claim.version if claim else 0) != e.version or not self.alive(name, e.epoch):
            return None
        if e.gone is not None and self.alive(*e.gone):
            return None
        rev = self._bump_claim(e.vip, name, e.epoch)
        return rev

    def handover(self, name: str, e: m.Handover) -> int | None:
        claim = self.claims.get(e.vip)
        if claim is None or claim.version != e.version or not self.alive(name, e.epoch):
            return None
        if e.to is not None and not self.alive(e.to.name, e.to.epoch):
            return None
        if e.to is None:
            return self._bump_claim(e.vip, "", 0)
        return self._bump_claim(e.vip, e.to.name, e.to.epoch)

    def _bump_claim(self, vip: str, holder: str, epoch: int) -> int:
        self.rev += 1
        self.claims[vip] = SClaim(holder, epoch, self.rev)
        for listener in self.listeners:
            listener()
        return self.rev

    def set_live(self, name: str, epoch: int, live: bool) -> bool:
        if not self.alive(name, epoch):
            return False
        self.members[name].live = live
        self._bump()
        return True

    def snapshot(self) -> tuple[int, list[m.Member], list[m.Claim]]:
        members = [
            m.Member(n, s.epoch, s.lease, weight=s.weight, live=s.live)
            for n, s in self.members.items()
        ]
        claims = [m.Claim(v, c.holder, c.epoch, c.version) for v, c in self.claims.items()]
        return self.rev, members, claims


@dataclass
class Node:
    name: str
    rate: float
    offset: float
    core: m.Core
    up: bool = True
    store_link: bool = True
    net_link: bool = True
    addresses: set[str] = field(default_factory=set)
    generation: int = 0  # bumps on crash/restart: events of an older life are dropped
    view_due: float = 0.0  # deliveries keep their order
    last_delivered: int = 0
    wake_at: float = math.inf
    slow_store: bool = False  # every answer and view from the store comes 100-400 ms late

    def local(self, t: float) -> float:
        return self.offset + self.rate * t

    def true(self, local: float) -> float:
        return (local - self.offset) / self.rate


class Sim:
    def __init__(
        self,
        rng: random.Random,
        names: list[str],
        vips: list[str],
        timing: m.Timing | None = None,
        slow: float = 0.02,
    ) -> None:
        self.rng = rng
        self.vips = vips
        self.timing = timing or m.Timing()
        self.slow = slow  # chance that one store round trip is very slow
        self.t = 0.0
        self.queue: list[tuple[float, int, Callable[[], None]]] = []
        self.seq = itertools.count()
        self.store = Store()
        self.store.listeners.append(self._store_changed)
        self.nodes = {name: self._new_node(name) for name in names}
        self.violations: list[str] = []
        self.adds = 0
        self.owners_log: list[tuple[float, str, str]] = []

    # ------------------------------------------------------------------ plumbing

    def _new_node(self, name: str) -> Node:
        rho = self.timing.rho
        core = m.Core(name, self.vips, timing=self.timing)
        return Node(name, self.rng.uniform(1 - rho, 1 + rho), self.rng.uniform(0, 1000), core)

    def at(self, t: float, fn: Callable[[], None]) -> None:
        heapq.heappush(self.queue, (t, next(self.seq), fn))

    def run_until(self, end: float) -> None:
        while self.queue and self.queue[0][0] <= end:
            t, _, fn = heapq.heappop(self.queue)
            self.t = max(self.t, t)
            self.store.expire(self.t)
            fn()
        self.t = max(self.t, end)

    def latency(self) -> float:
        if self.rng.random() < self.slow:
            return self.rng.uniform(0.05, 1.5)
        return self.rng.uniform(0.0005, 0.01)

    def answer_latency(self, node: Node) -> float:
        if node.slow_store:
            return self.rng.uniform(0.1, 0.4)
        return self.latency()

    def guard(self, node: Node, fn: Callable[[], None]) -> Callable[[], None]:
        generation = node.generation

        def run() -> None:
            if node.up and node.generation == generation:
                fn()

        return run

    # ------------------------------------------------------------------ a node's life

    def start(self, name: str) -> None:
        node = self.nodes[name]
        node.core.started = None
        now = node.local(self.t)
        self.apply(node, node.core.start(now))
        self._every(node, self.timing.fence / 4, self._confirm)
        self._every(node, LEASE_TTL / 3, self._keepalive)
        self._every(node, 0.05, self._advertise)
        self._deliver_view(node)

    def _every(self, node: Node, period: float, fn: Callable[[Node], None]) -> None:
        def tick() -> None:
            fn(node)
            self.at(node.true(node.local(self.t) + period), self.guard(node, tick))

        self.at(self.t + self.rng.uniform(0, period), self.guard(node, tick))

    def crash(self, name: str) -> None:
        node = self.nodes[name]
        node.up = False
        node.generation += 1
        node.addresses.clear()  # the machine (or the guard) takes them down with it

    def restart(self, name: str) -> None:
        old = self.nodes[name]
        if old.up:
            return
        node = self._new_node(name)
        node.generation = old.generation + 1
        node.store_link, node.net_link = old.store_link, old.net_link
        node.slow_store = old.slow_store
        self.nodes[name] = node
        self.start(name)

    def stop(self, name: str) -> None:
        node = self.nodes[name]
        if node.up:
            self.apply(node, node.core.stop(node.local(self.t)))

    def set_eligible(self, name: str, eligible: bool) -> None:
        node = self.nodes[name]
        if node.up:
            reason = "" if eligible else "track failing"
            self.apply(node, node.core.set_eligible(eligible, reason, node.local(self.t)))

    # ------------------------------------------------------------------ effects

    def apply(self, node: Node, effects: list[m.Effect]) -> None:
        for effect in effects:
            self._effect(node, effect)
        if node.core.done and node.up:
            node.up = False
            node.generation += 1
            assert not node.addresses, "stopped with addresses still up"
            return
        self._schedule_tick(node)

    def _schedule_tick(self, node: Node) -> None:
        now = node.local(self.t)
        wake = node.true(node.core.next_wakeup(now))
        # Timers fire late, by less than the lag the timing allows for.
        wake += self.rng.uniform(0, self.timing.lag * 0.9)
        if wake < node.wake_at or node.wake_at <= self.t:
            node.wake_at = wake
            self.at(wake, self.guard(node, lambda: self._tick(node, wake)))

    def _tick(self, node: Node, wake: float) -> None:
        if node.wake_at != wake:
            return
        node.wake_at = math.inf
        self.apply(node, node.core.tick(node.local(self.t)))

    def _effect(self, node: Node, e: m.Effect) -> None:
        if isinstance(e, m.AddAddress):
            for other in self.nodes.values():
                if other is not node and other.up and e.vip in other.addresses:
                    self.violations.append(
                        f"t={self.t:.4f} {node.name} added {e.vip} held by {other.name}"
                    )
            node.addresses.add(e.vip)
            self.adds += 1
            self.owners_log.append((self.t, e.vip, node.name))
        elif isinstance(e, m.RemoveAddress):
            node.addresses.discard(e.vip)
        elif isinstance(e, m.Announce | m.Evict | m.Leave | m.Join | m.ClaimVip | m.Handover):
            if not isinstance(e, m.Announce):
                self._request(node, e)
        elif isinstance(e, m.SetLive):
            self._request(node, e)

    def _request(self, node: Node, e: m.Effect) -> None:
        """Send ``e`` to the store; its answer (or a timeout) comes back later."""
        sent = node.local(self.t)
        answered = [False]

        def on_answer(result: object) -> None:
            if answered[0]:
                return
            answered[0] = True
            self._answer(node, e, result, sent)

        def arrive() -> None:
            result = self._execute(node, e)
            back = self.answer_latency(node)

            def deliver() -> None:
                if node.store_link:
                    on_answer(result)

            self.at(self.t + back, self.guard(node, deliver))

        if node.store_link:
            self.at(self.t + self.latency(), lambda: arrive() if node.store_link else None)
        self.at(
            node.true(sent + REQUEST_TIMEOUT),
            self.guard(node, lambda: on_answer(TimeoutError())),
        )

    def _execute(self, node: Node, e: m.Effect) -> object:
        store, name = self.store, node.name
        if isinstance(e, m.Join):
            return store.join(name, node.core.weight, self.t)
        if isinstance(e, m.ClaimVip):
            return store.claim(name, e)
        if isinstance(e, m.Handover):
            return store.handover(name, e)
        if isinstance(e, m.Evict):
            store.revoke(e.member.lease)
            return True
        if isinstance(e, m.Leave):
            member = store.members.get(name)
            if member is not None and member.epoch == e.epoch:
                store.revoke(member.lease)
            return True
        if isinstance(e, m.SetLive):
            return store.set_live(name, node.core.epoch, e.live)
        raise AssertionError(e)

    def _answer(self, node: Node, e: m.Effect, result: object, sent: float) -> None:
        core, now = node.core, node.local(self.t)
        failed = isinstance(result, TimeoutError)
        if isinstance(e, m.Join):
            if failed or not isinstance(result, tuple):
                effects = core.join_failed(now)
            else:
                effects = core.joined(result[0], result[1], sent, now)
        elif isinstance(e, m.ClaimVip):
            rev = None if failed or not isinstance(result, int) else result
            effects = core.claim_result(e.vip, rev, now)
        elif isinstance(e, m.Handover):
            rev = None if failed or not isinstance(result, int) else result
            effects = core.handover_result(e.vip, e.to, rev, now, version=e.version, unknown=failed)
        elif isinstance(e, m.Leave):
            effects = core.left_store(now)
        elif isinstance(e, m.SetLive):
            effects = core.live_result(e.live, result is True, now)
        else:
            effects = core.evicted(0, now)
        self.apply(node, effects)

    # ------------------------------------------------------------------ periodic work

    def _confirm(self, node: Node) -> None:
        core = node.core
        if not core.epoch or not node.store_link:
            return
        epoch, sent = core.epoch, node.local(self.t)

        def arrive() -> None:
            alive = self.store.alive(node.name, epoch)

            def back() -> None:
                if not node.store_link:
                    return
                now = node.local(self.t)
                if alive:
                    self.apply(node, core.confirmed(epoch, sent, now))
                else:
                    self.apply(node, core.refuted(epoch, now))

            self.at(self.t + self.answer_latency(node), self.guard(node, back))

        self.at(self.t + self.latency(), lambda: arrive() if node.store_link else None)

    def _keepalive(self, node: Node) -> None:
        lease = node.core.lease
        if lease and node.store_link:
            self.at(self.t + self.latency(), lambda: self.store.keepalive(lease, self.t))

    def _advertise(self, node: Node) -> None:
        core = node.core
        flags = core.advert_flags(node.local(self.t))
        for other in self.nodes.values():
            if other.name == node.name or self.rng.random() < 0.02:
                continue
            if not (node.net_link and other.net_link):
                continue
            target = other

            def receive(target: Node = target) -> None:
                if target.net_link:
                    now = target.local(self.t)
                    self.apply(target, target.core.heard(node.name, core.epoch, flags, now))

            self.at(self.t + self.rng.uniform(0.0002, 0.004), self.guard(target, receive))

    # ------------------------------------------------------------------ views

    def _store_changed(self) -> None:
        for node in self.nodes.values():
            if node.up:
                self._deliver_view(node)

    def _deliver_view(self, node: Node) -> None:
        snapshot = self.store.snapshot()
        due = max(node.view_due, self.t + self.rng.uniform(0.0005, 0.02))
        if self.rng.random() < self.slow:
            due += self.rng.uniform(0.05, 0.8)
        if node.slow_store:
            due += self.rng.uniform(0.1, 0.4)
        node.view_due = due

        def deliver() -> None:
            if not node.store_link or snapshot[0] <= node.last_delivered:
                return
            node.last_delivered = snapshot[0]
            self.apply(node, node.core.view(*snapshot, node.local(self.t)))

        self.at(due, self.guard(node, deliver))

    def heal_store(self, name: str) -> None:
        node = self.nodes[name]
        node.store_link = True
        if node.up:
            self._deliver_view(node)  # the watch resumes with a fresh listing

    # ------------------------------------------------------------------ reading the outcome

    def holders(self) -> dict[str, list[str]]:
        out: dict[str, list[str]] = {v: [] for v in self.vips}
        for node in self.nodes.values():
            if node.up:
                for vip in node.addresses:
                    out[vip].append(node.name)
        return out
