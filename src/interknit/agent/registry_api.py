"""The agents' side of the registry's HTTP API: the writes they make and the snapshot they
reconcile against.

Agents reach a node only through its public API, like any other client. Every call is bounded
by ``timeout`` and never raises for an unreachable or refusing node: it answers a ``Reply``
whose ``result`` says what happened (``ok``, ``gone`` for a 404, ``failed`` otherwise), so the
callers' state machines decide about retries. With several node URLs, a node that cannot be
reached (or answers 5xx) passes the call to the next one.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import ssl
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal
from urllib.parse import quote

import aiohttp

from interknit.client import Instance, parse_instance
from interknit.client.sse import SseParser

Result = Literal["ok", "gone", "failed"]
TIMEOUT = 2.0
# A snapshot is the registry's whole state; far more than this is not a registry talking.
MAX_SNAPSHOT = 256 * 1024 * 1024


@dataclass(frozen=True, slots=True)
class Reply:
    result: Result
    status: int = 0  # HTTP status; 0 when no node answered
    error: str = ""
    body: Any = None

    @property
    def refused(self) -> bool:
        """A 4xx other than 404: the node understood and said no (retrying will not help)."""
        return 400 <= self.status < 500 and self.status != 404


class RegistryUnavailable(Exception):
    """No registry node answered a read."""


def instance_path(service: str, instance_id: str) -> str:
    return f"/v1/services/{quote(service, safe='')}/instances/{quote(instance_id, safe='')}"


def _describe(exc: BaseException) -> str:
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


class RegistryApi:
    """A small asyncio client for the writes agents make."""

    def __init__(
        self,
        nodes: Sequence[str] | str,
        token: str | None = None,
        timeout: float = TIMEOUT,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        if isinstance(nodes, str):
            nodes = [n for n in nodes.split(",") if n.strip()]
        self.nodes = [n.strip().rstrip("/") for n in nodes]
        if not self.nodes:
            raise ValueError("no registry node given")
        self.timeout = timeout
        self._token = token
        # For https:// nodes: their CA and a client certificate (interknit.tls.api_context).
        self._ssl = ssl_context
        self._session: aiohttp.ClientSession | None = None
        self._last = 0  # index of the node that answered last

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    def _http(self) -> aiohttp.ClientSession:
        if self._session is None:
            headers = {"User-Agent": "interknit-agent"}
            if self._token:
                headers["Authorization"] = f"Bearer {self._token}"
            self._session = aiohttp.ClientSession(
                headers=headers,
                connector=aiohttp.TCPConnector(ssl=self._ssl if self._ssl is not None else True),
            )
        return self._session

    def _order(self) -> list[str]:
        n = len(self.nodes)
        return [self.nodes[(self._last + i) % n] for i in range(n)]

    async def request(self, method: str, path: str, body: Any = None) -> Reply:
        errors: list[str] = []
        timeout = aiohttp.ClientTimeout(total=self.timeout)
        for url in self._order():
            try:
                async with self._http().request(
                    method, url + path, json=body, timeout=timeout
                ) as resp:
                    raw = await resp.read()
                    status = resp.status
            except (aiohttp.ClientError, TimeoutError, OSError) as exc:
                errors.append(f"{url}: {_describe(exc)}")
                continue
            if status >= 500:
                errors.append(f"{url}: HTTP {status}")
                continue
            self._last = self.nodes.index(url)
            data: Any = None
            with contextlib.suppress(ValueError):
                data = json.loads(raw) if raw else None
            if 200 <= status < 300:
                return Reply("ok", status, "", data)
            message = data.get("error") if isinstance(data, dict) else None
            error = f"HTTP {status}: {message or raw[:200].decode('utf-8', 'replace')}"
            return Reply("gone" if status == 404 else "failed", status, error, data)
        return Reply("failed", 0, "no registry node answered (" + "; ".join(errors) + ")")

    # ------------------------------------------------------------------ writes

    async def register(self, service: str, instance_id: str, body: Mapping[str, Any]) -> Reply:
        return await self.request("PUT", instance_path(service, instance_id), dict(body))

    async def deregister(self, service: str, instance_id: str) -> Reply:
        return await self.request("DELETE", instance_path(service, instance_id))

    async def heartbeat(self, service: str, instance_id: str) -> Reply:
        return await self.request("PUT", instance_path(service, instance_id) + "/heartbeat")

    async def set_health(self, service: str, instance_id: str, status: str) -> Reply:
        path = instance_path(service, instance_id) + "/health"
        return await self.request("PUT", path, {"status": status})

    async def get(self, service: str, instance_id: str) -> Instance | None:
        """The instance as the registry holds it, ``None`` if it does not; raises
        ``RegistryUnavailable`` when no node answers."""
        reply = await self.request("GET", instance_path(service, instance_id))
        if reply.result == "gone":
            return None
        if reply.result != "ok" or not isinstance(reply.body, dict):
            raise RegistryUnavailable(reply.error or "an answer that is not an instance")
        return parse_instance(reply.body)

    # ------------------------------------------------------------------ reads

    async def snapshot(self) -> tuple[int, list[Instance]]:
        """Every instance the registry holds, with its revision: the first event (a resync) of
        ``GET /v1/watch``, after which the stream is closed."""
        errors: list[str] = []
        timeout = aiohttp.ClientTimeout(total=None, connect=self.timeout, sock_read=self.timeout)
        for url in self._order():
            try:
                async with self._http().get(url + "/v1/watch", timeout=timeout) as resp:
                    if resp.status != 200:
                        errors.append(f"{url}: HTTP {resp.status}")
                        continue
                    parser = SseParser()
                    seen = 0
                    async for chunk in resp.content.iter_any():
                        seen += len(chunk)
                        if seen > MAX_SNAPSHOT:
                            raise ValueError("the snapshot is larger than agents accept")
                        for event in parser.feed(chunk):
                            if event.event != "resync":
                                continue
                            data = json.loads(event.data)
                            instances = [parse_instance(i) for i in data["instances"]]
                            self._last = self.nodes.index(url)
                            return int(data["revision"]), instances
                    errors.append(f"{url}: the watch stream ended before its snapshot")
            except (aiohttp.ClientError, TimeoutError, OSError) as exc:
                errors.append(f"{url}: {_describe(exc)}")
            except (ValueError, KeyError, TypeError) as exc:
                errors.append(f"{url}: a snapshot that does not parse ({_describe(exc)})")
        raise RegistryUnavailable("no registry node answered (" + "; ".join(errors) + ")")


async def wait_closed(api: RegistryApi) -> None:
    """Close ``api``, ignoring a loop that is already going away."""
    with contextlib.suppress(RuntimeError, asyncio.CancelledError):
        await api.close()
