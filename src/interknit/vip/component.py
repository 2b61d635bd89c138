"""The VIP component's asyncio shell: runs the core (``machine.py``) against the registry, the
interface and the peers.

It owns the IO the core has none of: the registry's events become store views; a timer runs
the core when it asks (``next_wakeup``), which is how the fence takes addresses down on time;
confirmations of the membership go out every quarter of ``fence`` and keepalives every third
of ``lease_ttl``; adverts go to every member every ``advert_interval``; tracks and the link's
state make the node eligible or not; effects are carried out in order by one worker, an address
removal awaited before the transaction that follows it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import socket
import subprocess
import sys
from collections.abc import Sequence
from typing import Any

from prometheus_client import CollectorRegistry

from interknit.registry.model import Event, InstanceSpec, is_label
from interknit.registry.registry import RegistryBackend
from interknit.registry.txn import Transactional
from interknit.vip import machine as m
from interknit.vip.adverts import Advert, AdvertProtocol, encode
from interknit.vip.announce import RawLink, mac_bytes
from interknit.vip.config import VipSection
from interknit.vip.metrics import VipMetrics
from interknit.vip.netlink import Interface, LinkError, LinkWatcher
from interknit.vip.store import (
    EtcdVipStore,
    NoAnswer,
    SoloVipStore,
    VipStore,
    read_claims,
    read_members,
)
from interknit.vip.track import Tracker

log = logging.getLogger("interknit.vip")


class VipStartError(Exception):
    """The component cannot start; one sentence that names the key at fault."""


class VipComponent:
    def __init__(
        self,
        section: VipSection,
        registry: RegistryBackend,
        node_name: str,
        metrics: CollectorRegistry,
    ) -> None:
        self.section = section
        self.registry = registry
        self.name = node_name
        self.vips = [str(v) for v in section.vips()]
        self.metrics = VipMetrics(metrics, self.vips)
        self.members_service = section.service
        self.claims_service = f"{section.service}-addresses"
        solo = not isinstance(registry, Transactional)
        timing = m.Timing(fence=section.fence, dead_after=section.dead_after)
        self.core = m.Core(node_name, self.vips, section.weight, timing, solo=solo)
        self.store: VipStore = (
            SoloVipStore(registry, node_name, section.service, section.port)
            if solo
            else EtcdVipStore(
                registry,  # type: ignore[arg-type]
                registry,
                node_name,
                section.service,
                section.port,
                section.lease_ttl,
            )
        )
        assert section.interface is not None
        self.iface = Interface(section.interface)
        self.link: RawLink | None = None
        self.adverts: AdvertProtocol | None = None
        self.address = ""
        self.guard: subprocess.Popen[bytes] | None = None
        self.tracker = Tracker(list(section.track), self._on_track)
        self._link_up = True
        self._track_ok = True
        self._queue: asyncio.Queue[list[m.Effect]] = asyncio.Queue()
        self._tasks: list[asyncio.Task[Any]] = []
        self._pending: set[asyncio.Task[Any]] = set()
        self._timer: asyncio.TimerHandle | None = None
        self._bursts: dict[str, asyncio.Task[None]] = {}
        self._seq = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stopped = asyncio.Event()
        self._arp_sock: socket.socket | None = None
        self._v6 = False

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        if not is_label(self.name):
            raise VipStartError(
                f"node.name: {self.name!r} must be a DNS label to be a VIP node "
                "(lowercase letters, digits and '-')"
            )
        self._loop = asyncio.get_running_loop()
        try:
            await self.iface.open()
        except LinkError as exc:
            raise VipStartError(str(exc)) from None
        except OSError as exc:
            raise VipStartError(f"vip: cannot open netlink: {exc.strerror}") from None
        self._start_guard()
        removed = await self.iface.remove_leftovers(self.vips)
        if removed:
            log.warning(
                "removed virtual IPs left on the interface by an earlier process",
                extra={"event": "vip.leftovers", "addresses": removed},
            )
        address = self.section.advertise or await self.iface.first_address()
        if address is None:
            raise VipStartError(
                f"vip.advertise: {self.section.interface} has no address of its own to send "
                "adverts from; give it one or set vip.advertise"
            )
        self.address = address
        try:
            self.link = RawLink(self.iface.name, mac_bytes(self.iface.mac))
            self._arp_sock = self.link.listen_arp(self._on_arp)
            self._loop.add_reader(self._arp_sock.fileno(), self.link.read_arp)
        except (OSError, ValueError) as exc:
            raise VipStartError(f"vip.interface: cannot send raw frames on it: {exc}") from None
        await self._open_adverts()
        self.registry.subscribe(self._on_events, self._on_resync)
        self._tasks = [
            asyncio.create_task(self._worker(), name="vip-effects"),
            asyncio.create_task(self._advertise(), name="vip-adverts"),
            asyncio.create_task(LinkWatcher(self.iface, self._on_link).run(), name="vip-link"),
        ]
        if not self.core.solo:
            self._tasks.append(asyncio.create_task(self._confirm(), name="vip-confirm"))
            self._tasks.append(asyncio.create_task(self._keepalive(), name="vip-keepalive"))
        self.tracker.start()
        now = self._now()
        self._apply(self.core.start(now))
        self._on_resync()
        log.info(
            "vip started",
            extra={
                "event": "vip.started",
                "interface": self.iface.name,
                "addresses": self.vips,
                "advertise": f"{self.address}:{self.section.port}",
            },
        )

    def _start_guard(self) -> None:
        self.guard = subprocess.Popen(
            [sys.executable, "-m", "interknit.vip.guard"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            start_new_session=True,
        )
        assert self.guard.stdin is not None and self.guard.stdout is not None
        spec = {"interface": self.iface.name, "addresses": self.vips}
        self.guard.stdin.write((json.dumps(spec) + "\n").encode())
        self.guard.stdin.flush()
        if self.guard.stdout.readline().strip() != b"ready":
            raise VipStartError("vip: the guard process did not start")

    async def _open_adverts(self) -> None:
        assert self._loop is not None

        def make() -> AdvertProtocol:
            return AdvertProtocol(self.name, self._on_advert)

        try:
            sock = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
            sock.bind(("::", self.section.port))
        except OSError:
            sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            try:
                sock.bind(("0.0.0.0", self.section.port))
            except OSError as exc:
                sock.close()
                raise VipStartError(
                    f"vip.port: cannot listen on UDP port {self.section.port}: {exc.strerror}"
                ) from None
        self._v6 = sock.family == socket.AF_INET6
        _, protocol = await self._loop.create_datagram_endpoint(make, sock=sock)
        self.adverts = protocol

    async def stop(self, timeout: float = 3.0) -> None:
        """Hand every VIP over and leave, then take down whatever is left."""
        if self._loop is None:
            return
        self._apply(self.core.stop(self._now()))
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout):
                while not self.core.done:
                    await self._stopped.wait()
                    self._stopped.clear()
        await self.tracker.stop()
        for task in [*self._tasks, *self._pending, *self._bursts.values()]:
            task.cancel()
        await asyncio.gather(*self._tasks, *self._pending, return_exceptions=True)
        if self._timer is not None:
            self._timer.cancel()
        for vip in sorted(self.core.present):
            with contextlib.suppress(LinkError, OSError):
                await self.iface.remove(vip)
        self.core.present.clear()
        for vip in self.vips:
            self.metrics.owned.labels(vip).set(0)
        if self._arp_sock is not None:
            self._loop.remove_reader(self._arp_sock.fileno())
        if self.link is not None:
            self.link.close()
        if self.adverts is not None and self.adverts.transport is not None:
            self.adverts.transport.close()
        await self.iface.close()
        if self.guard is not None and self.guard.stdin is not None:
            with contextlib.suppress(OSError):
                self.guard.stdin.write(b"done\n")
                self.guard.stdin.close()
            with contextlib.suppress(subprocess.TimeoutExpired):
                await asyncio.to_thread(self.guard.wait, 2.0)
        log.info("vip stopped", extra={"event": "vip.stopped"})

    # ------------------------------------------------------------------ inputs

    def _now(self) -> float:
        assert self._loop is not None
        return self._loop.time()

    def _on_events(self, events: Sequence[Event]) -> None:
        services = (self.members_service, self.claims_service)
        if any(e.instance.service in services for e in events):
            self._on_resync()

    def _on_resync(self) -> None:
        state = self.registry.state
        members = read_members(state.instances(self.members_service))
        claims = read_claims(state.instances(self.claims_service))
        live = sum(1 for x in members if x.live)
        self.metrics.members.labels("true").set(live)
        self.metrics.members.labels("false").set(len(members) - live)
        self._apply(self.core.view(state.revision, members, claims, self._now()))

    def _on_advert(self, advert: Advert) -> None:
        self._apply(self.core.heard(advert.name, advert.epoch, advert.flags, self._now()))

    def _on_arp(self, address: str, mac: bytes) -> None:
        if address in self.core.present:
            log.warning(
                "another station claims a virtual IP we hold; announcing again",
                extra={"event": "vip.conflict", "address": address, "mac": mac.hex(":")},
            )
            self._apply(self.core.conflict(address, self._now()))

    def _on_track(self, healthy: bool, reason: str) -> None:
        self._track_ok = healthy
        self._eligibility()

    def _on_link(self, up: bool) -> None:
        was = self._link_up
        self._link_up = up
        if up and not was:
            self._apply(self.core.link_up(self._now()))
        self._eligibility()

    def _eligibility(self) -> None:
        reasons = []
        if not self._link_up:
            reasons.append(f"link {self.iface.name} is down")
        if not self._track_ok:
            reasons.append(self.tracker.reason or "a track is failing")
        eligible = not reasons
        if eligible != self.core.eligible:
            self._apply(self.core.set_eligible(eligible, "; ".join(reasons), self._now()))

    # ------------------------------------------------------------------ effects

    def _apply(self, effects: list[m.Effect]) -> None:
        if effects:
            self._queue.put_nowait(effects)
        self._schedule()
        if self.core.done:
            self._stopped.set()

    def _schedule(self) -> None:
        assert self._loop is not None
        when = self.core.next_wakeup(self._now())
        if self._timer is not None:
            if self._timer.when() <= when:
                return
            self._timer.cancel()
        self._timer = self._loop.call_at(when, self._tick)

    def _tick(self) -> None:
        self._timer = None
        self._apply(self.core.tick(self._now()))

    async def _worker(self) -> None:
        while True:
            effects = await self._queue.get()
            for effect in effects:
                try:
                    await self._carry_out(effect)
                except Exception:
                    log.exception("vip effect %s failed", effect)

    async def _carry_out(self, e: m.Effect) -> None:
        if isinstance(e, m.RemoveAddress):
            await self.iface.remove(e.vip)
            self.metrics.owned.labels(e.vip).set(0)
            self.metrics.moves.labels("released", e.reason).inc()
            log.info(
                "virtual IP released",
                extra={"event": "vip.released", "address": e.vip, "reason": e.reason},
            )
        elif isinstance(e, m.AddAddress):
            # The core decided a moment ago; if its fence ran out meanwhile (a busy worker),
            # the removal is already queued behind us: do not add at all.
            if e.vip not in self.core.present or not self.core.valid(self._now()):
                return
            await self.iface.add(e.vip)
            self.metrics.owned.labels(e.vip).set(1)
            self.metrics.moves.labels("acquired", "claimed").inc()
            log.info("virtual IP acquired", extra={"event": "vip.acquired", "address": e.vip})
        elif isinstance(e, m.Announce):
            self._announce(e.vip, e.reason)
        else:
            self._spawn(self._store_call(e))

    def _spawn(self, coro: Any) -> None:
        task = asyncio.create_task(coro)
        self._pending.add(task)
        task.add_done_callback(self._pending.discard)

    async def _store_call(self, e: m.Effect) -> None:
        core, store = self.core, self.store
        sent = self._now()
        try:
            if isinstance(e, m.Join):
                spec = InstanceSpec(
                    address=self.address, port=self.section.port, weight=self.section.weight
                )
                try:
                    epoch, lease = await store.join(spec)
                except NoAnswer as exc:
                    log.warning("vip join failed: %s", exc, extra={"event": "vip.join_failed"})
                    self._apply(core.join_failed(self._now()))
                    return
                log.info("vip joined", extra={"event": "vip.joined", "epoch": epoch})
                self._apply(core.joined(epoch, lease, sent, self._now()))
            elif isinstance(e, m.ClaimVip):
                try:
                    revision = await store.claim(e)
                except NoAnswer:
                    revision = None
                self._apply(core.claim_result(e.vip, revision, self._now()))
            elif isinstance(e, m.Handover):
                unknown = False
                try:
                    revision = await store.handover(e)
                except NoAnswer:
                    revision, unknown = None, True
                self._apply(
                    core.handover_result(
                        e.vip, e.to, revision, self._now(), version=e.version, unknown=unknown
                    )
                )
            elif isinstance(e, m.Evict):
                log.warning(
                    "vip peer not heard; revoking its lease",
                    extra={"event": "vip.evict", "peer": e.member.name, "epoch": e.member.epoch},
                )
                with contextlib.suppress(NoAnswer):
                    await store.evict(e.member)
                    self.metrics.evictions.inc()
                self._apply(core.evicted(e.member.lease, self._now()))
            elif isinstance(e, m.SetLive):
                ok = True
                try:
                    await store.set_live(e.live, e.reason)
                except NoAnswer:
                    ok = False
                self._apply(core.live_result(e.live, ok, self._now()))
            elif isinstance(e, m.Leave):
                with contextlib.suppress(NoAnswer):
                    await store.leave(e.epoch)
                log.info("vip left the pool", extra={"event": "vip.left"})
                self._apply(core.left_store(self._now()))
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("vip store call %s failed", type(e).__name__)

    def _announce(self, vip: str, reason: str) -> None:
        running = self._bursts.get(vip)
        if running is not None and not running.done():
            if reason == "acquired":
                running.cancel()  # a new owner's burst starts afresh
            else:
                return  # one burst at a time per address: two announcers must not storm
        self._bursts[vip] = asyncio.create_task(self._burst(vip, reason))

    async def _burst(self, vip: str, reason: str) -> None:
        announce = self.section.announce
        rounds = 2 if announce.repeat_after > 0 else 1
        for round_ in range(rounds):
            if round_:
                await asyncio.sleep(announce.repeat_after)
            for i in range(announce.count):
                if vip not in self.core.present or self.link is None:
                    return
                try:
                    family = self.link.send(vip)
                except OSError as exc:
                    log.debug("announcement for %s not sent: %s", vip, exc)
                    return
                self.metrics.announcements.labels(f"ipv{family}", reason).inc()
                if i + 1 < announce.count and announce.spacing > 0:
                    await asyncio.sleep(announce.spacing)

    # ------------------------------------------------------------------ periodic work

    async def _advertise(self) -> None:
        while True:
            if self.adverts is not None:
                now = self._now()
                self._seq = (self._seq + 1) & 0xFFFFFFFF
                data = encode(
                    Advert(self.name, self.core.epoch, self.core.advert_flags(now), self._seq)
                )
                for member in self.core.members.values():
                    if member.name == self.name or not member.address or not member.port:
                        continue
                    address = member.address
                    if self._v6 and ":" not in address:
                        address = "::ffff:" + address
                    self.adverts.send(data, address, member.port)
                self.metrics.fenced.set(1 if self.core.epoch and not self.core.valid(now) else 0)
            await asyncio.sleep(self.section.advert_interval)

    async def _confirm(self) -> None:
        every = self.core.timing.fence / 4
        while True:
            epoch = self.core.epoch
            if epoch:
                self._spawn(self._confirm_once(epoch))
            await asyncio.sleep(every)

    async def _confirm_once(self, epoch: int) -> None:
        sent = self._now()
        try:
            async with asyncio.timeout(self.core.timing.fence):
                alive = await self.store.confirm(epoch)
        except (NoAnswer, TimeoutError):
            return
        if alive:
            self._apply(self.core.confirmed(epoch, sent, self._now()))
        elif epoch == self.core.epoch:  # several checks may be out at once: say it once
            log.warning(
                "vip membership gone (lease ran out or was revoked)",
                extra={"event": "vip.membership_lost", "epoch": epoch},
            )
            self._apply(self.core.refuted(epoch, self._now()))

    async def _keepalive(self) -> None:
        every = self.section.lease_ttl / 3
        while True:
            with contextlib.suppress(NoAnswer):
                await self.store.keepalive()
            await asyncio.sleep(every)

    # ------------------------------------------------------------------ status

    def panel(self) -> list[dict[str, Any]]:
        rows = []
        for vip in self.vips:
            claim = self.core.claims.get(vip)
            holder = claim.holder if claim is not None and claim.holder else "-"
            rows.append(
                {
                    "address": vip,
                    "holder": holder,
                    "here": self.core.state(vip) + (" (up)" if vip in self.core.present else ""),
                }
            )
        return rows

    def nodes_panel(self) -> list[dict[str, Any]]:
        now = self._now() if self._loop is not None else 0.0
        rows = []
        for member in sorted(self.core.members.values(), key=lambda x: x.name):
            peer = self.core.peers.get(member.name)
            heard = "-" if peer is None else f"{(now - peer.heard) * 1000:.0f} ms ago"
            rows.append(
                {
                    "node": member.name,
                    "epoch": member.epoch,
                    "live": member.live,
                    "heard": "(this node)" if member.name == self.name else heard,
                }
            )
        return rows
