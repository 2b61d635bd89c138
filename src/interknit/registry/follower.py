"""A read-only copy of a node's registry, kept current by its watch stream.

``--workers`` processes use it: each follows the main node's ``/v1/watch`` (Server-Sent
Events), resumes with ``since`` after a dropped stream, takes a ``resync`` when it fell behind,
and keeps serving its last copy, marked stale, while the node cannot be reached.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import ssl
import time
from collections.abc import Callable, Sequence
from typing import Any

import aiohttp

from interknit.registry.fanout import Listener, ResyncListener
from interknit.registry.model import Event, EventType, Instance
from interknit.registry.state import RegistryState

log = logging.getLogger("interknit.follower")


def _instance(data: dict[str, Any]) -> Instance:
    state = {
        "check_status": data.get("health")
        if data.get("health") in ("passing", "warning", "critical")
        else "passing"
    }
    if data.get("health") in ("draining", "maintenance"):
        state["operator"] = data["health"]
    raw = json.dumps({"instance": data, "state": state})
    return Instance.from_record(raw)


def parse_sse(lines: Sequence[str]) -> tuple[str, str]:
    """One SSE event's lines -> (event name, data)."""
    name, data = "message", []
    for line in lines:
        if line.startswith("event:"):
            name = line[6:].strip()
        elif line.startswith("data:"):
            data.append(line[5:].lstrip())
    return name, "\n".join(data)


class Follower:
    def __init__(
        self,
        api: str,
        token: str | None = None,
        retry: float = 0.5,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        self.api = api.rstrip("/")
        # For an https:// API: its CA and this process's client certificate (mTLS).
        self._ssl = ssl_context
        # Another registry's events, installed as they are (``install``), not decided here.
        self.state = RegistryState()
        self._headers = {"Authorization": f"Bearer {token}"} if token else {}
        self._retry = retry
        self._listeners: list[Listener] = []
        self._resync_listeners: list[ResyncListener] = []
        self._task: asyncio.Task[None] | None = None
        self._connected = False
        self._said_unreachable = False
        self._synced = asyncio.Event()
        self.last_contact = 0.0

    @property
    def stale(self) -> bool:
        return not self._connected

    def subscribe(self, listener: Listener, on_resync: ResyncListener | None = None) -> None:
        self._listeners.append(listener)
        if on_resync is not None:
            self._resync_listeners.append(on_resync)

    async def start(self, wait: float = 10.0) -> None:
        self._task = asyncio.create_task(self._run(), name="registry-follower")
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(wait):
                await self._synced.wait()

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _run(self) -> None:
        since: int | None = None
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=5, sock_read=60)
        connector = aiohttp.TCPConnector(ssl=self._ssl if self._ssl is not None else True)
        async with aiohttp.ClientSession(
            timeout=timeout, headers=self._headers, connector=connector
        ) as session:
            while True:
                url = f"{self.api}/v1/watch" + ("" if since is None else f"?since={since}")
                try:
                    async with session.get(url) as response:
                        response.raise_for_status()
                        self._connected = True
                        since = await self._consume(response, since)
                except (aiohttp.ClientError, OSError, TimeoutError, ValueError) as exc:
                    if self._connected:
                        log.warning(
                            "lost the registry's watch stream; serving the last copy",
                            extra={"event": "follower.stale", "error": str(exc)},
                        )
                    elif not self._said_unreachable:
                        # Said once: a worker that never reaches its node (a certificate it
                        # does not trust, say) must not be silent about it.
                        self._said_unreachable = True
                        log.warning(
                            "cannot reach the registry's watch stream at %s: %s",
                            self.api,
                            exc,
                            extra={"event": "follower.unreachable", "error": str(exc)},
                        )
                self._connected = False
                await asyncio.sleep(self._retry)

    async def _consume(self, response: aiohttp.ClientResponse, since: int | None) -> int | None:
        lines: list[str] = []
        async for raw in response.content:
            line = raw.decode().rstrip("\r\n")
            if line:
                lines.append(line)
                continue
            if not lines:
                continue
            name, data = parse_sse(lines)
            lines = []
            self.last_contact = time.monotonic()
            if name == "resync":
                body = json.loads(data)
                self.state.restore(
                    [_instance(i) for i in body["instances"]], body["revision"], time.time()
                )
                self._notify_resync()
                since = int(body["revision"])
                self._synced.set()
            elif name in ("put", "delete"):
                body = json.loads(data)
                kind: EventType = "put" if name == "put" else "delete"
                event = Event(body["revision"], kind, body["reason"], _instance(body["instance"]))
                if since is not None and event.revision <= since:
                    continue
                self.state.install(event)
                self._notify([event])
                since = event.revision
        return since

    def _notify(self, events: list[Event]) -> None:
        for listener in self._listeners:
            try:
                listener(events)
            except Exception:
                log.exception("follower listener failed")

    def _notify_resync(self) -> None:
        for listener in self._resync_listeners:
            try:
                listener()
            except Exception:
                log.exception("follower resync listener failed")


def local_ejections(
    follower: Follower, apply: Callable[[Sequence[Event]], None]
) -> Callable[[str, str, float | None], Any]:
    """Ejections a worker decides stay in its own pools (the node's watch overwrites them)."""

    async def set_ejected(service: str, instance_id: str, until: float | None) -> None:
        inst = follower.state.get(service, instance_id)
        if inst is not None:
            event = Event(follower.state.revision, "put", "eject", inst.evolve(ejected_until=until))
            apply([event])

    return set_ejected
