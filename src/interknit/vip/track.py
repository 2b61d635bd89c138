"""What this node's VIPs depend on (keepalived's ``track_script``): HTTP URLs that must answer
2xx, TCP addresses that must accept. Each is probed every ``interval`` and decided with the
health checks' own state machine (``rise`` passes to count as up, ``fall`` failures as down),
starting up: a node that has just started holds VIPs unless a track fails ``fall`` times.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from urllib.parse import urlsplit

from interknit.health import CheckMachine, http_probe, tcp_probe
from interknit.names import parse_hostport
from interknit.registry.model import CheckStatus
from interknit.vip.config import TrackSection

log = logging.getLogger("interknit.vip")


def describe(track: TrackSection) -> str:
    return f"http {track.http}" if track.http is not None else f"tcp {track.tcp}"


def _target(track: TrackSection) -> tuple[str, int, str]:
    if track.http is not None:
        url = urlsplit(track.http)
        host = url.hostname or "127.0.0.1"
        return host, url.port or 80, (url.path or "/") + (f"?{url.query}" if url.query else "")
    assert track.tcp is not None
    host, port = parse_hostport(track.tcp)
    return host, port, ""


class Tracker:
    """Runs every track; ``on_change(healthy, reason)`` when the verdict of all of them flips."""

    def __init__(self, tracks: list[TrackSection], on_change: Callable[[bool, str], None]) -> None:
        self.tracks = tracks
        self.on_change = on_change
        self.machines = [CheckMachine(t.rise, t.fall, "passing", checked=True) for t in tracks]
        self.outputs = [""] * len(tracks)
        self.healthy = True
        self._tasks: list[asyncio.Task[None]] = []

    def start(self) -> None:
        self._tasks = [
            asyncio.create_task(self._run(i), name=f"vip-track-{i}")
            for i in range(len(self.tracks))
        ]

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    @property
    def reason(self) -> str:
        failing = [
            f"track {describe(t)}: {self.outputs[i] or 'failing'}"
            for i, t in enumerate(self.tracks)
            if self.machines[i].status == "critical"
        ]
        return "; ".join(failing)

    async def _run(self, i: int) -> None:
        track, machine = self.tracks[i], self.machines[i]
        host, port, path = _target(track)
        loop = asyncio.get_running_loop()
        while True:
            if track.http is not None:
                result = await http_probe(host, port, path, track.timeout)
            else:
                result = await tcp_probe(host, port, track.timeout)
            self.outputs[i] = result.output
            # A 429 (alive, asking for less) keeps the VIPs: only a failure counts.
            status: CheckStatus = "critical" if result.status == "critical" else "passing"
            if machine.on_result(status, loop.time()) is not None:
                healthy = all(m.status != "critical" for m in self.machines)
                if healthy != self.healthy:
                    self.healthy = healthy
                    log.warning(
                        "vip track %s",
                        "passing" if healthy else "failing",
                        extra={"event": "vip.track", "healthy": healthy, "reason": self.reason},
                    )
                    self.on_change(healthy, self.reason)
            await asyncio.sleep(track.interval)
