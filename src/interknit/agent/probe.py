"""The supervisor's checks of its child: a TCP connect, or an HTTP GET that must answer 2xx.

Both are bounded by a timeout and answer ``(passed, output)``; they never raise (cancellation
aside). Only the status line of the HTTP answer is read: the supervisor wants to know that the
child serves, not what.
"""

from __future__ import annotations

import asyncio
import contextlib
import re

MAX_STATUS_LINE = 1024
_STATUS = re.compile(rb"HTTP/1\.[01] (\d{3})")


def _host(address: str) -> str:
    return f"[{address}]" if ":" in address else address


async def _close(writer: asyncio.StreamWriter) -> None:
    writer.close()
    with contextlib.suppress(OSError, asyncio.TimeoutError):
        await asyncio.wait_for(writer.wait_closed(), 1.0)


async def tcp_check(address: str, port: int, timeout: float) -> tuple[bool, str]:
    try:
        _, writer = await asyncio.wait_for(asyncio.open_connection(address, port), timeout)
    except (OSError, TimeoutError) as exc:
        return False, f"connect to {_host(address)}:{port}: {exc or type(exc).__name__}"
    await _close(writer)
    return True, "connected"


async def http_check(address: str, port: int, path: str, timeout: float) -> tuple[bool, str]:
    request = (
        f"GET {path} HTTP/1.1\r\nHost: {_host(address)}:{port}\r\n"
        "User-Agent: interknit-run\r\nConnection: close\r\n\r\n"
    ).encode("latin-1")

    async def exchange() -> tuple[bool, str]:
        reader, writer = await asyncio.open_connection(address, port)
        try:
            writer.write(request)
            await writer.drain()
            line = await reader.readuntil(b"\n")
        finally:
            await _close(writer)
        match = _STATUS.match(line[:MAX_STATUS_LINE])
        if match is None:
            return False, "an answer that is not HTTP/1.x"
        code = int(match.group(1))
        return 200 <= code < 300, f"HTTP {code}"

    try:
        return await asyncio.wait_for(exchange(), timeout)
    except TimeoutError:
        return False, f"no answer within {timeout:g}s"
    except asyncio.LimitOverrunError:
        return False, "a status line longer than 64 KiB"
    except (OSError, asyncio.IncompleteReadError) as exc:
        return False, f"GET {path}: {exc or type(exc).__name__}"
