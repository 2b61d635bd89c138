"""A backend with a fixed capacity, for the overload and health benchmarks.

    .venv/bin/python bench/backend.py --port 9000 [--concurrency 8] [--work 20ms]

Every request except the health path takes one of ``concurrency`` slots for ``work`` seconds
(``await asyncio.sleep``, so the capacity is ``concurrency / work`` requests per second however
fast the machine is). Excess requests wait for a slot in FIFO order, without bound: the backend
slows down under load the way a real one does, instead of refusing. It keeps working on a
request whose client has gone (it only notices when it writes the answer), which is what makes
an unprotected proxy collapse.

``GET /health`` answers at once without a slot; ``GET /_stats`` answers the counters as JSON.
In-process, :class:`Backend` can also stop answering (``hang``: connections are accepted and
read but never answered; ``refuse``: the listener is closed, so connections are refused) and
``recover``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import socket
from collections import deque
from typing import cast

HEALTH_PATH = b"/health"
STATS_PATH = b"/_stats"
MAX_HEAD = 65536
BACKLOG = 4096

_OK = b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: %d\r\n%s\r\n"
_KEEP = b""
_CLOSE = b"Connection: close\r\n"


class Backend:
    """One listening port; the counters are for the benchmark's report."""

    def __init__(
        self, host: str = "127.0.0.1", port: int = 0, concurrency: int = 8, work: float = 0.02
    ) -> None:
        self.host = host
        self.port = port
        self.concurrency = concurrency
        self.work = work
        # Counters.
        self.served = 0  # work requests answered to a client still connected
        self.wasted = 0  # work requests finished after their client had gone
        self.health_checks = 0
        self.waiting = 0
        self.peak_waiting = 0
        # State.
        self._slots = asyncio.Semaphore(concurrency)
        self._server: asyncio.AbstractServer | None = None
        self._conns: set[_Connection] = set()
        self._hang: asyncio.Future[None] | None = None

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(
            lambda: _Connection(self), self.host, self.port, backlog=BACKLOG, reuse_address=True
        )
        sock = self._server.sockets[0]
        self.port = int(sock.getsockname()[1])

    async def stop(self) -> None:
        await self._close_listener()
        for conn in list(self._conns):
            conn.abort()
        if self._hang is not None and not self._hang.done():
            self._hang.set_result(None)

    # Failure modes.

    def hang(self) -> None:
        """Keep accepting and reading, never answer (until ``recover``)."""
        if self._hang is None or self._hang.done():
            self._hang = asyncio.get_running_loop().create_future()

    async def refuse(self) -> None:
        """Close the listener and every open connection: new connections are refused."""
        await self._close_listener()
        for conn in list(self._conns):
            conn.abort()

    async def recover(self) -> None:
        if self._hang is not None and not self._hang.done():
            self._hang.set_result(None)
        self._hang = None
        if self._server is None:
            await self.start()

    async def _close_listener(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None

    def stats(self) -> dict[str, int]:
        return {
            "served": self.served,
            "wasted": self.wasted,
            "health_checks": self.health_checks,
            "waiting": self.waiting,
            "peak_waiting": self.peak_waiting,
            "connections": len(self._conns),
        }

    async def handle(self, path: bytes) -> bytes:
        """The response body for one request, once its work is done."""
        hang = self._hang
        if hang is not None:
            await hang
        if path == HEALTH_PATH:
            self.health_checks += 1
            return b"ok\n"
        if path == STATS_PATH:
            return json.dumps(self.stats()).encode()
        self.waiting += 1
        self.peak_waiting = max(self.peak_waiting, self.waiting)
        try:
            await self._slots.acquire()
        finally:
            self.waiting -= 1
        try:
            await asyncio.sleep(self.work)
        finally:
            self._slots.release()
        return b"done\n"


class _Connection(asyncio.Protocol):
    """HTTP/1.1 (and 1.0) keep-alive, pipelined requests answered in order; GET-sized only."""

    def __init__(self, backend: Backend) -> None:
        self.backend = backend
        self.transport: asyncio.Transport | None = None
        self.buffer = bytearray()
        self.pending: deque[tuple[bytes, bool]] = deque()  # (path, close after)
        self.worker: asyncio.Task[None] | None = None
        self.gone = False

    # Protocol interface

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not subclasses of asyncio.Transport.
        self.transport = cast(asyncio.Transport, transport)
        sock = transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.backend._conns.add(self)

    def connection_lost(self, exc: Exception | None) -> None:
        self.gone = True
        self.backend._conns.discard(self)

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        while True:
            end = self.buffer.find(b"\r\n\r\n")
            if end < 0:
                if len(self.buffer) > MAX_HEAD:
                    self.abort()
                return
            head = bytes(self.buffer[:end]).lower()
            length = 0
            for line in head.split(b"\r\n")[1:]:
                if line.startswith(b"content-length:"):
                    length = int(line[15:].strip() or b"0")
            if len(self.buffer) < end + 4 + length:
                return
            del self.buffer[: end + 4 + length]
            request_line = head.split(b"\r\n", 1)[0].split()
            path = request_line[1].split(b"?", 1)[0] if len(request_line) > 1 else b"/"
            http10 = request_line[-1:] == [b"http/1.0"]
            close = b"connection: close" in head or (
                http10 and b"connection: keep-alive" not in head
            )
            self.pending.append((path, close))
            if self.worker is None:
                self.worker = asyncio.get_running_loop().create_task(self._serve())

    # Work

    async def _serve(self) -> None:
        backend = self.backend
        while self.pending:
            path, close = self.pending.popleft()
            body = await backend.handle(path)
            is_work = path not in (HEALTH_PATH, STATS_PATH)
            if self.gone or self.transport is None or self.transport.is_closing():
                if is_work:
                    backend.wasted += 1
                break
            if is_work:
                backend.served += 1
            self.transport.write(_OK % (len(body), _CLOSE if close else _KEEP) + body)
            if close:
                self.transport.close()
                break
        self.worker = None

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()


async def serve(host: str, port: int, concurrency: int, work: float) -> None:
    backend = Backend(host, port, concurrency, work)
    await backend.start()
    print(f"listening on {host}:{backend.port}", flush=True)
    await asyncio.Event().wait()


def main() -> None:
    from interknit.durations import parse_duration

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--work", default="20ms", help="time per request (a duration)")
    args = parser.parse_args()
    import uvloop

    uvloop.run(serve(args.host, args.port, args.concurrency, parse_duration(args.work)))


if __name__ == "__main__":
    main()
