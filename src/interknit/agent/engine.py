"""A client for the Docker Engine API, the subset the container agent needs: ``/_ping``,
``/containers/json``, ``/containers/{id}/json`` and ``/events``. Docker and Podman's
compatible service both speak it, over a unix socket (or plain TCP).

Paths carry no API version, so the engine answers in its own (every field read here exists
in all of them). Every answer is bounded in size; the event stream is read as JSON values one
after another (Docker ends each with a newline; nothing here relies on it).
"""

from __future__ import annotations

import codecs
import json
import os
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote, urlsplit

import aiohttp

from interknit.agent.container import Container, ContainerError, parse_inspect, parse_list

DEFAULT_SOCKET = "/var/run/docker.sock"
MAX_ANSWER = 64 * 1024 * 1024  # a list of thousands of containers
MAX_INSPECT = 4 * 1024 * 1024
MAX_EVENT = 1024 * 1024
# The container events that change what runs or how healthy it is. Podman's compatible API
# matches its own name "died" for a "die" filter, and Docker ignores names it does not know,
# so both are asked for.
EVENT_FILTER = {
    "type": ["container"],
    "event": ["start", "die", "died", "health_status"],
}


class EngineError(Exception):
    """The engine could not be reached, or answered something unusable."""


@dataclass(frozen=True, slots=True)
class EngineEvent:
    action: str  # start, die or health_status (any ": detail" cut off)
    id: str
    time_nano: int  # when the engine says it happened (ns since the epoch); 0 if unknown

    @property
    def since(self) -> str:
        """This event's time as ``/events?since=`` takes it."""
        seconds, nanos = divmod(self.time_nano, 1_000_000_000)
        return f"{seconds}.{nanos:09d}"


def engine_address(socket: str | None, environ: Mapping[str, str] | None = None) -> str:
    """Where the engine is: ``--socket``, else ``DOCKER_HOST``, else the default socket."""
    env = os.environ if environ is None else environ
    where = socket or env.get("DOCKER_HOST") or DEFAULT_SOCKET
    parts = urlsplit(where)
    if parts.scheme in ("", "unix"):
        path = parts.path if parts.scheme else where
        if not path:
            raise ValueError(f"{where!r} names no socket path")
        return f"unix://{path}"
    if parts.scheme in ("tcp", "http"):
        if not parts.hostname or parts.port is None:
            raise ValueError(f"{where!r} needs a host and a port")
        return f"http://{parts.hostname}:{parts.port}"
    raise ValueError(f"{where!r}: only unix:// and tcp:// engines are supported (no TLS)")


def parse_event(data: Any) -> EngineEvent | None:
    """An event the agent acts on, or ``None`` for anything else."""
    if not isinstance(data, dict) or data.get("Type", "container") != "container":
        return None
    raw = data.get("Action") or data.get("status")
    if not isinstance(raw, str):
        return None
    action = raw.split(":", 1)[0].strip()
    if action == "died":
        action = "die"
    if action not in ("start", "die", "health_status"):
        return None
    actor = data.get("Actor")
    if not isinstance(actor, dict):
        actor = {}
    cid = data.get("id") or actor.get("ID")
    if not isinstance(cid, str) or not 12 <= len(cid) <= 128:
        return None
    nano = data.get("timeNano")
    if not isinstance(nano, int) or nano < 0:
        seconds = data.get("time")
        nano = int(seconds) * 1_000_000_000 if isinstance(seconds, int) and seconds > 0 else 0
    return EngineEvent(action, cid, nano)


class EventParser:
    """JSON values in, one after another, from a byte stream: sans-IO."""

    def __init__(self, limit: int = MAX_EVENT) -> None:
        self.limit = limit
        self._buffer = ""
        # A UTF-8 sequence split between two chunks is completed by the next one.
        self._utf8 = codecs.getincrementaldecoder("utf-8")("replace")
        self._decoder = json.JSONDecoder()

    def feed(self, chunk: bytes) -> list[Any]:
        self._buffer += self._utf8.decode(chunk)
        out = []
        while True:
            text = self._buffer.lstrip()
            if not text:
                self._buffer = ""
                break
            try:
                value, end = self._decoder.raw_decode(text)
            except json.JSONDecodeError:
                if len(text) > self.limit:
                    raise EngineError("an event longer than the agent reads") from None
                self._buffer = text
                break
            out.append(value)
            self._buffer = text[end:]
        return out


class Engine:
    """One engine, one connection pool."""

    def __init__(self, address: str, timeout: float = 5.0) -> None:
        self.address = address
        self.timeout = timeout
        self._session: aiohttp.ClientSession | None = None
        if address.startswith("unix://"):
            self._base = "http://engine"
            self._socket: str | None = address[len("unix://") :]
        else:
            self._base = address
            self._socket = None

    def _http(self) -> aiohttp.ClientSession:
        if self._session is None:
            connector: aiohttp.BaseConnector
            if self._socket is not None:
                connector = aiohttp.UnixConnector(path=self._socket)
            else:
                connector = aiohttp.TCPConnector()
            self._session = aiohttp.ClientSession(
                connector=connector, headers={"User-Agent": "interknit-agent"}
            )
        return self._session

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def _get(self, path: str, limit: int, params: Mapping[str, str] | None = None) -> Any:
        timeout = aiohttp.ClientTimeout(total=self.timeout)
        try:
            async with self._http().get(self._base + path, params=params, timeout=timeout) as r:
                if r.status == 404:
                    return None
                if r.content_length is not None and r.content_length > limit:
                    raise EngineError(f"GET {path}: an answer of {r.content_length} bytes")
                body = bytearray()
                async for chunk in r.content.iter_any():
                    body += chunk
                    if len(body) > limit:
                        raise EngineError(f"GET {path}: an answer over {limit} bytes")
                if r.status != 200:
                    text = body[:200].decode("utf-8", "replace")
                    raise EngineError(f"GET {path}: HTTP {r.status} {text}")
        except (aiohttp.ClientError, OSError, TimeoutError) as exc:
            raise EngineError(f"GET {path}: {type(exc).__name__}: {exc}") from None
        try:
            return json.loads(body) if body else None
        except ValueError:
            raise EngineError(f"GET {path}: an answer that is not JSON") from None

    async def ping(self) -> None:
        timeout = aiohttp.ClientTimeout(total=self.timeout)
        try:
            async with self._http().get(self._base + "/_ping", timeout=timeout) as r:
                body = await r.content.read(64)
                if r.status != 200:
                    raise EngineError(f"/_ping: HTTP {r.status} {body[:64]!r}")
        except (aiohttp.ClientError, OSError, TimeoutError) as exc:
            raise EngineError(f"/_ping: {type(exc).__name__}: {exc}") from None

    async def running(self) -> list[str]:
        """The ids of the containers that run now."""
        data = await self._get("/containers/json", MAX_ANSWER)
        try:
            return parse_list(data if data is not None else [])
        except ContainerError as exc:
            raise EngineError(f"/containers/json: {exc}") from None

    async def inspect(self, cid: str) -> Container | None:
        """The container, or ``None`` when the engine no longer knows it; a container the
        agent cannot read raises ``ContainerError``."""
        data = await self._get(f"/containers/{quote(cid, safe='')}/json", MAX_INSPECT)
        return None if data is None else parse_inspect(data)

    async def events(self, since: str | None = None) -> AsyncIterator[EngineEvent | None]:
        """The engine's container events, from ``since`` (the engine replays what it kept).
        Yields ``None`` once, first, when the subscription is in place; ends when the engine
        closes the stream; raises ``EngineError`` when it cannot be opened or breaks."""
        params = {"filters": json.dumps(EVENT_FILTER)}
        if since is not None:
            params["since"] = since
        timeout = aiohttp.ClientTimeout(total=None, connect=self.timeout, sock_read=None)
        try:
            async with self._http().get(
                self._base + "/events", params=params, timeout=timeout
            ) as r:
                if r.status != 200:
                    body = await r.content.read(200)
                    raise EngineError(f"/events: HTTP {r.status} {body!r}")
                yield None
                parser = EventParser()
                async for chunk in r.content.iter_any():
                    for value in parser.feed(chunk):
                        event = parse_event(value)
                        if event is not None:
                            yield event
        except (aiohttp.ClientError, OSError, TimeoutError) as exc:
            raise EngineError(f"/events: {type(exc).__name__}: {exc}") from None
