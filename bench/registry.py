"""Registry throughput and watch latency, interknit beside a single-member etcd, in one run.

    .venv/bin/python bench/registry.py [--seconds 5] [--runs 3] [--ceiling]

Each figure is measured with 32 requests in flight from one Python process (one event loop):
registrations through interknit's HTTP API (aiohttp client) against etcd puts (aetcd); lookups
of one service of 100 instances against an etcd range over the same 100 keys, both kinds of
etcd read: linearizable (etcd's default: the leader confirms it is still the leader, a round
of its consensus, before it answers) and serializable (answered from the member's own copy, as
interknit answers from its memory; ``etcdctl get --consistency=s``); and the time from just
before a registration is sent to the event reaching a watcher (p50, p99). Medians of the runs
are printed with the ratio to etcd.

Where the client is the limit: for each figure the client's CPU (the benchmark process, all
its threads) and the server's (the node's or etcd's process) over the run are printed as a
share of one core; a client near 100% is the limit, and the server's share says how much room
it had left. ``--ceiling`` also measures the aiohttp client against a server that answers
every request at once with the bytes of interknit's answer (a registration's, a lookup's) and
does nothing else: what the client can send at all on this machine, the most any server could
show here.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import resource
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
from aetcd import utils as aetcd_utils

from common import (
    cpu_seconds,
    etcd_process,
    free_port,
    interknit_process,
    machine,
    median,
    percentile,
)

IN_FLIGHT = 32
BODY = {"address": "127.0.0.1", "port": 9000, "tags": ["bench"], "check": {"ttl": "30s"}}


def own_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


async def measured(
    out: dict[str, float],
    name: str,
    seconds: float,
    op: Callable[[int], Awaitable[None]],
    server: int,
) -> None:
    """``closed_loop`` into ``out[name]``, with the client's and the server's (``server``: its
    pid) CPU over the run as shares of one core in ``out[name + "_client"]`` and
    ``out[name + "_server"]``."""
    client_before, server_before = own_cpu(), cpu_seconds(server)
    started = time.perf_counter()
    out[name] = await closed_loop(seconds, op)
    took = time.perf_counter() - started
    out[name + "_client"] = (own_cpu() - client_before) / took
    out[name + "_server"] = (cpu_seconds(server) - server_before) / took


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


async def bench_interknit(url: str, seconds: float, pid: int) -> dict[str, float]:
    out: dict[str, float] = {}
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

        await measured(out, "writes", seconds, register, pid)
        for i in range(100):
            async with http.put(
                f"/v1/services/look/instances/i{i}", data=payload, headers=headers
            ) as r:
                assert r.status == 200

        async def lookup(i: int) -> None:
            async with http.get("/v1/services/look") as r:
                assert r.status == 200
                await r.read()

        await measured(out, "reads", seconds, lookup, pid)
        latencies = await watch_latency_interknit(http)
    out["watch_p50"] = percentile(latencies, 50)
    out["watch_p99"] = percentile(latencies, 99)
    return out


def raw_answer(url: str, request: bytes) -> bytes:
    """The node's whole answer to ``request`` (head and body), for the ceiling's server."""
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(request)
        data = b""
        while b"\r\n\r\n" not in data:
            data += sock.recv(65536)
        head, _, body = data.partition(b"\r\n\r\n")
        length = int(head.lower().split(b"content-length:", 1)[1].split(b"\r\n", 1)[0])
        while len(body) < length:
            body += sock.recv(65536)
    return head + b"\r\n\r\n" + body


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
    """Answers each request (head plus Content-Length body) with the same bytes."""

    ANSWER = (
        b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 253\r\n"
        b"Date: Fri, 27 Nov 2026 10:24:19 GMT\r\nX-Interknit-Revision: 1\r\n\r\n" + b"x" * 253
    )

    def __init__(self, answer: bytes) -> None:
        self.answer = answer

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
            self.transport.write(self.answer)


def _serve_answers(port: int, answer: bytes) -> None:
    async def serve() -> None:
        loop = asyncio.get_running_loop()
        server = await loop.create_server(lambda: _Answerer(answer), "127.0.0.1", port)
        async with server:
            await server.serve_forever()

    uvloop.run(serve())


def client_ceiling(seconds: float, lookup_answer: bytes) -> tuple[float, float]:
    """Registrations and lookups per second the aiohttp client reaches against ``_Answerer``
    (answering a registration's bytes, then ``lookup_answer``)."""
    return (
        _ceiling(seconds, _Answerer.ANSWER, lookups=False),
        _ceiling(seconds, lookup_answer, lookups=True),
    )


def _ceiling(seconds: float, answer: bytes, lookups: bool) -> float:
    port = free_port()
    server = multiprocessing.Process(target=_serve_answers, args=(port, answer), daemon=True)
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

                async def lookup(i: int) -> None:
                    async with http.get("/v1/services/look") as r:
                        assert r.status == 200
                        await r.read()

                return await closed_loop(seconds, lookup if lookups else register)

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


async def bench_etcd(endpoint: str, seconds: float, pid: int) -> dict[str, float]:
    out: dict[str, float] = {}
    host, port = endpoint.split(":")
    async with aetcd.Client(host=host, port=int(port)) as client:
        value = json.dumps({"service": "reg", **BODY}).encode()

        async def put(i: int) -> None:
            await client.put(f"/bench/reg/i{i}".encode(), value)

        await measured(out, "writes", seconds, put, pid)
        for i in range(100):
            await client.put(f"/bench/look/i{i:03d}".encode(), value)

        async def rng(i: int) -> None:
            result = await client.get_prefix(b"/bench/look/")
            assert len(result) == 100

        await measured(out, "reads", seconds, rng, pid)

        # aetcd's get_prefix has no serializable flag; its own request builder has, and the
        # Range call is the same one get_prefix makes.
        serial = client._build_get_range_request(
            b"/bench/look/",
            range_end=aetcd_utils.prefix_range_end(b"/bench/look/"),
            serializable=True,
        )

        async def serializable(i: int) -> None:
            result = await client.kvstub.Range(
                serial, timeout=client._timeout, metadata=client.metadata
            )
            assert len(result.kvs) == 100

        await measured(out, "serial", seconds, serializable, pid)
        latencies = await watch_latency_etcd(client, value)
    out["watch_p50"] = percentile(latencies, 50)
    out["watch_p99"] = percentile(latencies, 99)
    return out


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
    lookup_answer = b""
    for run in range(args.runs):
        with etcd_process() as (endpoint, etcd):
            etcd_runs.append(uvloop.run(bench_etcd(endpoint, args.seconds, etcd.pid)))
        with interknit_process() as (url, node):
            ik_runs.append(uvloop.run(bench_interknit(url, args.seconds, node.pid)))
            request = b"GET /v1/services/look HTTP/1.1\r\nHost: bench\r\n\r\n"
            lookup_answer = raw_answer(url, request)
        print(
            f"run {run + 1}: interknit {fmt(ik_runs[-1])} | etcd {fmt(etcd_runs[-1])}", flush=True
        )
    ik = {k: median([r[k] for r in ik_runs]) for k in ik_runs[0]}
    et = {k: median([r[k] for r in etcd_runs]) for k in etcd_runs[0]}
    print()
    print(
        f"{'figure':<44}{'interknit':>10}{'etcd 3.4':>10}{'ratio':>7}   "
        "CPU of one core: client / server"
    )

    def row(label: str, ours: str, theirs: str) -> None:
        print(
            f"{label:<44}{ik[ours]:>10,.0f}{et[theirs]:>10,.0f}{ik[ours] / et[theirs]:>6.2f}x   "
            f"interknit {ik[ours + '_client']:.0%} / {ik[ours + '_server']:.0%}, "
            f"etcd {et[theirs + '_client']:.0%} / {et[theirs + '_server']:.0%}"
        )

    row("registrations/s vs puts/s", "writes", "writes")
    row("lookups/s vs linearizable ranges/s (100 keys)", "reads", "reads")
    row("lookups/s vs serializable ranges/s (100 keys)", "reads", "serial")
    for q in ("p50", "p99"):
        a, b = ik[f"watch_{q}"] * 1000, et[f"watch_{q}"] * 1000
        print(f"{'watch propagation ' + q + ' (ms)':<44}{a:>10.2f}{b:>10.2f}{a / b:>6.2f}x")
    print(
        "(a client near 100% of its core is the limit of that figure: the server could do more "
        "than it shows)"
    )
    if args.ceiling:
        ceilings = [client_ceiling(args.seconds, lookup_answer) for _ in range(args.runs)]
        top_writes = median([c[0] for c in ceilings])
        top_reads = median([c[1] for c in ceilings])
        print()
        print(
            f"aiohttp client against a null server: {top_writes:,.0f} registrations/s, "
            f"{top_reads:,.0f} lookups/s (interknit's answer bytes)"
        )
        print(
            f"interknit's registrations are {ik['writes'] / top_writes:.0%} of it, its lookups "
            f"{ik['reads'] / top_reads:.0%}; etcd's puts, reads with another client (aetcd), "
            f"show their client's CPU above"
        )


def fmt(r: dict[str, float]) -> str:
    serial = f" serializable {r['serial']:,.0f}/s" if "serial" in r else ""
    return (
        f"writes {r['writes']:,.0f}/s reads {r['reads']:,.0f}/s{serial} "
        f"watch p50 {r['watch_p50'] * 1000:.2f}ms p99 {r['watch_p99'] * 1000:.2f}ms"
    )


if __name__ == "__main__":
    main()
