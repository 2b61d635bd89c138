"""Large bodies pass through in constant memory: backpressure works on both sides."""

from __future__ import annotations

import asyncio

from interknit.proxy import RouteSpec
from tests.proxy.conftest import body_json, read_response

SIZE = 200 * 1024 * 1024
# Far below the body size: the proxy (and the test's own client and backend, which share
# the process) may hold buffers, but never the body.
RSS_GROWTH_LIMIT = 64 * 1024 * 1024


def vm_rss() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


async def test_big_download_streams_in_constant_memory(backends, proxy) -> None:
    b = await backends("big")
    p = await proxy(RouteSpec(servers=(b.server,)))
    reader, writer = await asyncio.open_connection("127.0.0.1", p.port, limit=1 << 20)
    before = vm_rss()
    peak = before
    writer.write(f"GET /stream?size={SIZE} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    head = await reader.readuntil(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200") and b"transfer-encoding: chunked" in head
    received = 0
    while True:
        size = int((await reader.readuntil(b"\r\n")).strip(), 16)
        if size == 0:
            await reader.readuntil(b"\r\n")
            break
        while size:
            data = await reader.read(min(size, 1 << 20))
            size -= len(data)
            received += len(data)
        await reader.readexactly(2)
        if received % (1 << 20) < 65536:
            peak = max(peak, vm_rss())
            await asyncio.sleep(0.001)  # a slow reader: the proxy must wait, not buffer
    writer.close()
    assert received == SIZE
    assert max(peak, vm_rss()) - before < RSS_GROWTH_LIMIT


async def test_big_upload_streams_in_constant_memory(backends, proxy) -> None:
    b = await backends("big")
    p = await proxy(RouteSpec(servers=(b.server,)))
    reader, writer = await asyncio.open_connection("127.0.0.1", p.port)
    before = vm_rss()
    peak = before
    writer.write(
        f"PUT /count?slow=1 HTTP/1.1\r\nHost: x\r\nContent-Length: {SIZE}\r\n\r\n".encode()
    )
    block = b"u" * (1 << 20)
    for i in range(SIZE // len(block)):
        writer.write(block)
        await writer.drain()
        if i % 16 == 0:
            peak = max(peak, vm_rss())
    status, _, body = await asyncio.wait_for(read_response(reader), 30)
    writer.close()
    assert status == 200
    assert body_json(body) == {"received": SIZE}
    assert max(peak, vm_rss()) - before < RSS_GROWTH_LIMIT
