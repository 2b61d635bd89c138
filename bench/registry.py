"""Registry throughput and watch latency, interknit beside a single-member etcd, in one run.

    .venv/bin/python bench/registry.py [--seconds 5] [--runs 3]

Each figure is measured with 32 requests in flight: registrations through interknit's HTTP API
(aiohttp client) against etcd puts (aetcd); lookups of one service of 100 instances against an
etcd range over the same 100 keys; and the time from just before a registration is sent to the
event reaching a watcher (p50, p99). Medians of the runs are printed with the ratio to etcd.

``--ceiling`` also measures the aiohttp client against a server that answers every request at
once with the bytes of a registration's answer and does nothing else: what the client can send
at all on this machine, the most any server could show here.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import socket
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import cast

sys.path.insert(0, str(Path(__file__).resolve().parent))

import aetcd
import aiohttp
import uvloop

from common import etcd_member, free_port, interknit_node, machine, median, percentile

IN_FLIGHT = 32
BODY = {"address": "127.0.0.1", "port": 9000, "tags": ["bench"], "check": {"ttl": "30s"}}


async def closed_loop(seconds: float, op: Callable[[int], Awaitable[None]]) -> float:
    """Ops per second with IN_FLIGHT workers issuing ``op`` back to back for ``seconds``."""
    stop = time.perf_counter() + seconds
    done = 0

    async def worker(w: int) -> None:
        nonlocal done
        i = w
        while time.perf_counter() < stop:
            await op(i)
            done += 1
            i += IN_FLIGHT

    started = time.perf_counter()
    await asyncio.gather(*(worker(w) for w in range(IN_FLIGHT)))
    return done / (time.perf_counter() - started)


async def bench_interknit(url: str, seconds: float) -> dict[str, float]:
    conn = aiohttp.TCPConnector(limit=IN_FLIGHT * 2)
    async with aiohttp.ClientSession(url, connector=conn) as http:
        payload = json.dumps(BODY).encode()
        headers = {"Content-Type": "application/json"}

        async def register(i: int) -> None:
            body = payload.replace(b"9000", str(1 + i % 60000).encode())
            async with http.put(
                f"/v1/services/reg/instances/i{i}", data=body, headers=headers
            ) as r:
                assert r.status == 200, await r.text()
                await r.read()

        regs = await closed_loop(seconds, register)
        for i in range(100):
            async with http.put(
                f"/v1/services/look/instances/i{i}", data=payload, headers=headers
            ) as r:
                assert r.status == 200

        async def lookup(i: int) -> None:
            async with http.get("/v1/services/look") as r:
                assert r.status == 200
                await r.read()

        looks = await closed_loop(seconds, lookup)
        latencies = await watch_latency_interknit(http)
    return {
        "writes": regs,
        "reads": looks,
        "watch_p50": percentile(latencies, 50),
        "watch_p99": percentile(latencies, 99),
    }


async def watch_latency_interknit(http: aiohttp.ClientSession, n: int = 300) -> list[float]:
    sent: dict[str, float] = {}
    latencies: list[float] = []
    got_all = asyncio.Event()

    async def reader() -> None:
        async with http.get("/v1/watch?service=lat", timeout=aiohttp.ClientTimeout(total=120)) as r:
            async for raw in r.content:
                line = raw.decode().strip()
                if line.startswith("data: ") and '"type":"put"' in line:
                    now = time.perf_counter()
                    iid = json.loads(line[6:])["id"]
                    if iid in sent:
                        latencies.append(now - sent[iid])
                    if len(latencies) >= n:
                        got_all.set()
                        return

    task = asyncio.create_task(reader())
    await asyncio.sleep(0.3)
    headers = {"Content-Type": "application/json"}
    payload = json.dumps(BODY).encode()
    for i in range(n):
        sent[f"w{i}"] = time.perf_counter()
        async with http.put(f"/v1/services/lat/instances/w{i}", data=payload, headers=headers) as r:
            await r.read()
        await asyncio.sleep(0.002)
    await asyncio.wait_for(got_all.wait(), 30)
    task.cancel()
    return latencies


class _Answerer(asyncio.Protocol):
    """Answers each request (head plus Content-Length body) with a registration's answer."""

    ANSWER = (
        b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 253\r\n"
        b"Date: Fri, 27 Nov 2026 10:24:19 GMT\r\nX-Interknit-Revision: 1\r\n\r\n" + b"x" * 253
    )

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass
        self.buf = b""

    def data_received(self, data: bytes) -> None:
        self.buf += data
        while (end := self.buf.find(b"\r\n\r\n")) >= 0:
            at = self.buf.find(b"Content-Length: ", 0, end)
            length = int(self.buf[at + 16 : self.buf.index(b"\r\n", at)]) if at >= 0 else 0
            if len(self.buf) < end + 4 + length:
                return
            self.buf = self.buf[end + 4 + length :]
            self.transport.write(self.ANSWER)


def _serve_answers(port: int) -> None:
    async def serve() -> None:
        loop = asyncio.get_running_loop()
        server = await loop.create_server(_Answerer, "127.0.0.1", port)
        async with server:
            await server.serve_forever()

    uvloop.run(serve())


def client_ceiling(seconds: float) -> float:
    """Registrations per second the aiohttp client reaches against ``_Answerer``."""
    port = free_port()
    server = multiprocessing.Process(target=_serve_answers, args=(port,), daemon=True)
    server.start()
    try:
        wait_port(port)

        async def measure() -> float:
            conn = aiohttp.TCPConnector(limit=IN_FLIGHT * 2)
            async with aiohttp.ClientSession(f"http://127.0.0.1:{port}", connector=conn) as http:
                payload = json.dumps(BODY).encode()
                headers = {"Content-Type": "application/json"}

                async def register(i: int) -> None:
                    async with http.put(
                        f"/v1/services/reg/instances/i{i}", data=payload, headers=headers
                    ) as r:
                        assert r.status == 200
                        await r.read()

                return await closed_loop(seconds, register)

        return uvloop.run(measure())
    finally:
        server.kill()
        server.join()


def wait_port(port: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing listens on port {port}")


async def bench_etcd(endpoint: str, seconds: float) -> dict[str, float]:
    host, port = endpoint.split(":")
    async with aetcd.Client(host=host, port=int(port)) as client:
        value = json.dumps({"service": "reg", **BODY}).encode()

        async def put(i: int) -> None:
            await client.put(f"/bench/reg/i{i}".encode(), value)

        puts = await closed_loop(seconds, put)
        for i in range(100):
            await client.put(f"/bench/look/i{i:03d}".encode(), value)

        async def rng(i: int) -> None:
            result = await client.get_prefix(b"/bench/look/")
            assert len(result) == 100

        ranges = await closed_loop(seconds, rng)
        latencies = await watch_latency_etcd(client, value)
    return {
        "writes": puts,
        "reads": ranges,
        "watch_p50": percentile(latencies, 50),
        "watch_p99": percentile(latencies, 99),
    }


async def watch_latency_etcd(client: aetcd.Client, value: bytes, n: int = 300) -> list[float]:
    sent: dict[bytes, float] = {}
    latencies: list[float] = []
    watch = await client.watch_prefix(b"/bench/lat/")
    await asyncio.sleep(0.3)

    async def reader() -> None:
        async for event in watch:
            now = time.perf_counter()
            key = event.kv.key
            if key in sent:
                latencies.append(now - sent[key])
            if len(latencies) >= n:
                return

    task = asyncio.create_task(reader())
    for i in range(n):
        key = f"/bench/lat/w{i}".encode()
        sent[key] = time.perf_counter()
        await client.put(key, value)
        await asyncio.sleep(0.002)
    await asyncio.wait_for(task, 30)
    await watch.cancel()
    return latencies


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument(
        "--ceiling", action="store_true", help="also measure the client against a null server"
    )
    args = parser.parse_args()
    print(f"machine: {machine()}")
    print(f"{IN_FLIGHT} requests in flight; {args.runs} runs of {args.seconds:g}s; medians")
    ik_runs: list[dict[str, float]] = []
    etcd_runs: list[dict[str, float]] = []
    for run in range(args.runs):
        with etcd_member() as endpoint:
            etcd_runs.append(uvloop.run(bench_etcd(endpoint, args.seconds)))
        with interknit_node() as url:
            ik_runs.append(uvloop.run(bench_interknit(url, args.seconds)))
        print(
            f"run {run + 1}: interknit {fmt(ik_runs[-1])} | etcd {fmt(etcd_runs[-1])}", flush=True
        )
    ik = {k: median([r[k] for r in ik_runs]) for k in ik_runs[0]}
    et = {k: median([r[k] for r in etcd_runs]) for k in etcd_runs[0]}
    print()
    print(f"{'figure':<34}{'interknit':>12}{'etcd 3.4':>12}{'ratio':>8}")
    print(
        f"{'registrations/s vs puts/s':<34}{ik['writes']:>12,.0f}{et['writes']:>12,.0f}"
        f"{ik['writes'] / et['writes']:>7.2f}x"
    )
    print(
        f"{'lookups/s (100 instances)':<34}{ik['reads']:>12,.0f}{et['reads']:>12,.0f}"
        f"{ik['reads'] / et['reads']:>7.2f}x"
    )
    for q in ("p50", "p99"):
        a, b = ik[f"watch_{q}"] * 1000, et[f"watch_{q}"] * 1000
        print(f"{'watch propagation ' + q + ' (ms)':<34}{a:>12.2f}{b:>12.2f}{a / b:>7.2f}x")
    if args.ceiling:
        ceilings = [client_ceiling(args.seconds) for _ in range(args.runs)]
        top = median(ceilings)
        print()
        print(f"client ceiling (null server): {top:,.0f} registrations/s;")
        print(
            f"etcd's puts are {et['writes'] / top:.0%} of it, interknit's registrations "
            f"{ik['writes'] / top:.0%}"
        )


def fmt(r: dict[str, float]) -> str:
    return (
        f"writes {r['writes']:,.0f}/s reads {r['reads']:,.0f}/s "
        f"watch p50 {r['watch_p50'] * 1000:.2f}ms p99 {r['watch_p99'] * 1000:.2f}ms"
    )


if __name__ == "__main__":
    main()
