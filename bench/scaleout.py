"""Scale-out on etcd: three etcd members and two interknit nodes on loopback, in one run.

    .venv/bin/python bench/scaleout.py [--seconds 5] [--runs 3]

Prints registrations per second through one node (32 in flight), the time for a registration
made through node A to show in node B's API (p50, p99: B is watched with a blocking query per
registration), and lookups per second from the discovery client library with its cache against
the same client with the cache off (every lookup asks a node).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import aiohttp
import uvloop

from common import free_port, interknit_node, machine, median, percentile, process, wait_http
from interknit.client import AsyncClient

IN_FLIGHT = 32
BODY: dict[str, object] = {"address": "127.0.0.1", "port": 9000}


@contextlib.contextmanager
def etcd_cluster(size: int = 3) -> Iterator[list[str]]:
    etcd = shutil.which("etcd")
    if etcd is None:
        raise SystemExit("etcd is not installed (apt-get install etcd-server)")
    with tempfile.TemporaryDirectory(prefix="etcd-scale-") as tmp, contextlib.ExitStack() as stack:
        ports = [(free_port(), free_port()) for _ in range(size)]
        cluster = ",".join(f"m{i}=http://127.0.0.1:{p}" for i, (_, p) in enumerate(ports))
        for i, (client, peer) in enumerate(ports):
            args = [
                etcd, "--name", f"m{i}", "--data-dir", f"{tmp}/m{i}",
                "--listen-client-urls", f"http://127.0.0.1:{client}",
                "--advertise-client-urls", f"http://127.0.0.1:{client}",
                "--listen-peer-urls", f"http://127.0.0.1:{peer}",
                "--initial-advertise-peer-urls", f"http://127.0.0.1:{peer}",
                "--initial-cluster", cluster, "--initial-cluster-state", "new",
            ]  # fmt: skip
            stack.enter_context(process(args, log=Path(tmp) / f"m{i}.log"))
        endpoints = [f"http://127.0.0.1:{c}" for c, _ in ports]
        for endpoint in endpoints:
            wait_http(endpoint + "/health", timeout=30)
        yield endpoints


async def registrations(url: str, seconds: float) -> float:
    payload = json.dumps(BODY).encode()
    headers = {"Content-Type": "application/json"}
    stop = time.perf_counter() + seconds
    done = 0
    async with aiohttp.ClientSession(url) as http:

        async def worker(w: int) -> None:
            nonlocal done
            i = w
            while time.perf_counter() < stop:
                path = f"/v1/services/reg/instances/i{i}"
                async with http.put(path, data=payload, headers=headers) as r:
                    assert r.status == 200, await r.text()
                done += 1
                i += IN_FLIGHT

        started = time.perf_counter()
        await asyncio.gather(*(worker(w) for w in range(IN_FLIGHT)))
        return done / (time.perf_counter() - started)


async def propagation(a: str, b: str, n: int = 200) -> list[float]:
    """Register through A; time until B's blocking query on the service answers with it."""
    latencies = []
    payload = json.dumps(BODY).encode()
    headers = {"Content-Type": "application/json"}
    async with aiohttp.ClientSession() as http:
        async with http.get(f"{b}/v1/services") as r:
            revision = (await r.json())["revision"]
        for i in range(n):
            query = f"{b}/v1/services/prop?index={revision}&wait=5s"
            waiter = asyncio.create_task(http.get(query))
            await asyncio.sleep(0.005)  # the blocking query is parked at B
            sent = time.perf_counter()
            async with http.put(
                f"{a}/v1/services/prop/instances/p{i}", data=payload, headers=headers
            ) as r:
                assert r.status == 200
            response = await waiter
            body = await response.json()
            latencies.append(time.perf_counter() - sent)
            assert any(inst["id"] == f"p{i}" for inst in body["instances"])
            revision = body["revision"]
    return latencies


async def lookups(nodes: list[str], seconds: float, cache: bool) -> float:
    client = AsyncClient(nodes, cache_ttl=5.0 if cache else 0.0, refresh=cache)
    stop = time.perf_counter() + seconds
    done = 0
    try:
        await client.instances("prop")

        async def worker() -> None:
            nonlocal done
            while time.perf_counter() < stop:
                lookup = await client.instances("prop")
                assert lookup.instances
                done += 1

        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(IN_FLIGHT)))
        return done / (time.perf_counter() - started)
    finally:
        await client.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    print(f"machine: {machine()}")
    print(f"three etcd members and two interknit nodes on loopback; medians of {args.runs} runs")
    results: dict[str, list[float]] = {k: [] for k in ("regs", "p50", "p99", "cached", "uncached")}
    for run in range(args.runs):
        with etcd_cluster() as endpoints:
            etcd = "etcd = [" + ", ".join(f'"{e}"' for e in endpoints) + "]"
            registry = f'backend = "etcd"\n{etcd}'
            with (
                interknit_node(registry_extra=registry) as a,
                interknit_node(registry_extra=registry) as b,
            ):
                regs = uvloop.run(registrations(a, args.seconds))
                lat = uvloop.run(propagation(a, b))
                cached = uvloop.run(lookups([a, b], args.seconds, cache=True))
                uncached = uvloop.run(lookups([a, b], args.seconds, cache=False))
        results["regs"].append(regs)
        results["p50"].append(percentile(lat, 50) * 1000)
        results["p99"].append(percentile(lat, 99) * 1000)
        results["cached"].append(cached)
        results["uncached"].append(uncached)
        print(
            f"run {run + 1}: {regs:,.0f} registrations/s; propagation p50 "
            f"{results['p50'][-1]:.1f} ms p99 {results['p99'][-1]:.1f} ms; lookups "
            f"{cached:,.0f}/s cached, {uncached:,.0f}/s uncached",
            flush=True,
        )
    m = {k: median(v) for k, v in results.items()}
    print()
    print(f"registrations/s through one node     {m['regs']:>10,.0f}")
    print(f"propagation A -> B p50 / p99 (ms)     {m['p50']:>6.1f} / {m['p99']:.1f}")
    print(
        f"client lookups/s, cached / uncached  {m['cached']:>10,.0f} / {m['uncached']:,.0f}"
        f"  ({m['cached'] / m['uncached']:.1f}x)"
    )


if __name__ == "__main__":
    main()
