"""Blocking queries: Consul's ``/v1/health/service`` on interknit beside interknit's own
blocking lookup (``/v1/services/{service}?index=``), on the same node and the same changes.

    .venv/bin/python bench/compat.py [--watchers 2000] [--rounds 10] [--runs 2]

Two scenarios, each with ``--watchers`` long-polling clients (one connection each, every one
asking again at once with the index it was given, as Consul clients do):

* one service: every watcher waits on the same service; each round changes it once;
* 100 services: the watchers are spread evenly over 100 services; each round changes all 100
  (100 registrations sent together).

A round starts once the node's ``interknit_registry_watchers`` gauge shows every watcher
blocked; it is timed from just before the change is sent to each watcher's answer arriving.
Printed per API: answers per second (watchers / time until the last one was answered, median
of the rounds), the wake-up p50 and p99 over all answers, and the node's CPU time per answer
(user + system, over the measured rounds, answering and taking the next blocking request),
with Consul's against interknit's own as a ratio. The CPU figure depends least on what else
runs on the machine. Both APIs run on a fresh node per run, interleaved (which goes first
alternates). The client is one uvloop process; on two cores or more the node is pinned to
core 1 and the client to core 0 (``taskset``, as ``proxy.py`` pins), so that neither takes
the other's core (``--no-pin``: both float, and on a small machine the client's cost is in
the node's figures).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import resource
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import aiohttp
import uvloop

from common import interknit_process, machine, median, percentile
from proxy import pinning

SERVICES = 100
INSTANCES = 3
WAIT = "60s"


@dataclass
class Round:
    started: float = 0.0
    expected: int = 0
    latencies: list[float] = field(default_factory=list)
    done: asyncio.Event = field(default_factory=asyncio.Event)


class Api:
    """How one API is asked and what its gauge is called."""

    def __init__(self, consul: bool) -> None:
        self.consul = consul
        self.gauge = f'interknit_registry_watchers{{kind="{"consul" if consul else "blocking"}"}}'
        # Where the index to ask with next comes back.
        self.index_header = "X-Consul-Index" if consul else "X-Interknit-Revision"
        self.index_field = re.compile(rf"(?im)^{self.index_header}:\s*(\d+)".encode())

    def path(self, service: str, index: int) -> str:
        if self.consul:
            return f"/v1/health/service/{service}?index={index}&wait={WAIT}"
        return f"/v1/services/{service}?index={index}&wait={WAIT}"

    def request(self, service: str, index: int) -> bytes:
        return f"GET {self.path(service, index)} HTTP/1.1\r\nHost: bench\r\n\r\n".encode()


_LENGTH = re.compile(rb"(?im)^content-length:\s*(\d+)")


class Watcher(asyncio.Protocol):
    """One long-polling client on a connection of its own, asking again at once with the index
    it was given. It reads of each answer only its status, length and index: an HTTP client
    library costs more per answer than the node does, and on a small machine the benchmark
    would measure the client (see ``--client``)."""

    def __init__(self, api: Api, service: str, state: dict[str, Round]) -> None:
        self.api = api
        self.service = service
        self.state = state
        self.index_field = api.index_field
        self.index = 0
        self.buffer = b""
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.ask()

    def ask(self) -> None:
        assert self.transport is not None
        self.transport.write(self.api.request(self.service, self.index))

    def data_received(self, data: bytes) -> None:
        buffer = self.buffer + data if self.buffer else data
        while (end := buffer.find(b"\r\n\r\n")) >= 0:
            head = buffer[:end]
            length = _LENGTH.search(head)
            assert length is not None, head
            size = end + 4 + int(length.group(1))
            if len(buffer) < size:
                break
            arrived = time.perf_counter()
            assert head.startswith(b"HTTP/1.1 200 "), head
            found = self.index_field.search(head)
            assert found is not None, head
            self.index = int(found.group(1))
            buffer = buffer[size:]
            answered(self.state["round"], arrived)
            self.ask()
        self.buffer = buffer


def answered(current: Round, arrived: float) -> None:
    if current.started and arrived >= current.started:
        current.latencies.append(arrived - current.started)
        if len(current.latencies) >= current.expected:
            current.done.set()


async def watcher(
    session: aiohttp.ClientSession, api: Api, service: str, state: dict[str, Round]
) -> None:
    """``Watcher`` through aiohttp's client (``--client aiohttp``)."""
    index = 0
    while True:
        async with session.get(api.path(service, index)) as r:
            await r.read()
            arrived = time.perf_counter()
            index = int(r.headers[api.index_header])
        answered(state["round"], arrived)


async def blocked(session: aiohttp.ClientSession, api: Api) -> int:
    async with session.get("/metrics") as r:
        text = await r.text()
    for line in text.splitlines():
        if line.startswith(api.gauge):
            return int(float(line.split()[-1]))
    return 0


async def all_blocked(session: aiohttp.ClientSession, api: Api, watchers: int) -> None:
    deadline = time.monotonic() + 60
    while await blocked(session, api) < watchers:
        if time.monotonic() > deadline:
            raise RuntimeError("watchers did not all block within 60s")
        await asyncio.sleep(0.02)


async def change(session: aiohttp.ClientSession, service: str, weight: int) -> None:
    body = {"address": "127.0.0.1", "port": 9000, "weight": weight}
    async with session.put(f"/v1/services/{service}/instances/i0", json=body) as r:
        assert r.status == 200, await r.text()


def cpu_seconds(pid: int) -> float:
    """User and system CPU time of a process so far (/proc/PID/stat)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def scenario(
    url: str,
    pid: int,
    api: Api,
    watchers: int,
    services: list[str],
    rounds: int,
    client: str = "raw",
) -> dict[str, list[float]]:
    connector = aiohttp.TCPConnector(limit=0, force_close=False)
    timeout = aiohttp.ClientTimeout(total=None, sock_read=120)
    async with (
        aiohttp.ClientSession(url, connector=connector, timeout=timeout) as session,
        aiohttp.ClientSession(url) as control,
    ):
        for name in services:
            for i in range(INSTANCES):
                body = {"address": "127.0.0.1", "port": 9000 + i}
                async with control.put(f"/v1/services/{name}/instances/i{i}", json=body) as r:
                    assert r.status == 200
        state = {"round": Round()}
        tasks: list[asyncio.Task[None]] = []
        transports: list[asyncio.BaseTransport] = []
        if client == "aiohttp":
            tasks = [
                asyncio.create_task(watcher(session, api, services[w % len(services)], state))
                for w in range(watchers)
            ]
        else:
            loop = asyncio.get_running_loop()
            host, port = url.removeprefix("http://").rsplit(":", 1)
            for start in range(0, watchers, 200):
                opened = await asyncio.gather(
                    *(
                        loop.create_connection(
                            lambda w=w: Watcher(api, services[w % len(services)], state),
                            host,
                            int(port),
                        )
                        for w in range(start, min(watchers, start + 200))
                    )
                )
                transports += [transport for transport, _ in opened]
        rates: list[float] = []
        latencies: list[float] = []
        cpu = mine = 0.0
        try:
            for n in range(rounds + 1):  # the first round warms up and is not counted
                if n == 1:
                    cpu = cpu_seconds(pid)
                    mine = time.process_time()
                await all_blocked(control, api, watchers)
                current = Round(expected=watchers)
                state["round"] = current
                current.started = time.perf_counter()
                await asyncio.gather(*(change(control, s, 2 + n % 2) for s in services))
                await asyncio.wait_for(current.done.wait(), 120)
                if n:
                    rates.append(watchers / max(current.latencies))
                    latencies.extend(current.latencies)
            # Every watcher has asked again: the node's CPU for answering and re-blocking them.
            await all_blocked(control, api, watchers)
            cpu = cpu_seconds(pid) - cpu
            mine = time.process_time() - mine
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            for transport in transports:
                transport.close()
    answers = rounds * watchers
    return {
        "rates": rates,
        "latencies": latencies,
        "cpu": [cpu / answers],
        "client_cpu": [mine / answers],
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--watchers", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--runs", type=int, default=2)
    parser.add_argument("--no-pin", action="store_true", help="let node and client float")
    parser.add_argument(
        "--client",
        choices=("raw", "aiohttp"),
        default="raw",
        help="the watchers: a protocol that reads only what it needs, or aiohttp's client",
    )
    args = parser.parse_args()
    pin = pinning()
    node_prefix: tuple[str, ...] = ()
    if not args.no_pin and pin.proxy:
        node_prefix = pin.proxy
        os.sched_setaffinity(0, {int(pin.load[-1])})
        print("pinning: the node on core 1, this client on core 0")
    else:
        print("pinning: none (node and client float)")
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    print(f"machine: {machine()}")
    print(
        f"{args.watchers} watchers ({args.client} client); {args.rounds} rounds x {args.runs} "
        "runs per API and scenario"
    )
    cases = {"one service": ["hot"], "100 services": [f"svc{i}" for i in range(SERVICES)]}
    results: dict[tuple[str, bool], dict[str, list[float]]] = {}
    for run in range(args.runs):
        for label, services in cases.items():
            # Which API goes first alternates: the second node of a pair starts while the
            # first one's 2,000 connections are still closing.
            for consul in (run % 2 == 1, run % 2 == 0):
                with interknit_process(prefix=node_prefix) as (url, proc):
                    got = uvloop.run(
                        scenario(
                            url,
                            proc.pid,
                            Api(consul),
                            args.watchers,
                            services,
                            args.rounds,
                            args.client,
                        )
                    )
                key = (label, consul)
                merged = results.setdefault(
                    key, {"rates": [], "latencies": [], "cpu": [], "client_cpu": []}
                )
                for figure, values in got.items():
                    merged[figure] += values
                name = "consul" if consul else "native"
                print(
                    f"run {run + 1} {label:<13} {name:<7} "
                    f"{median(got['rates']):>9,.0f} answers/s  "
                    f"p99 {percentile(got['latencies'], 99) * 1000:7.1f} ms  "
                    f"node CPU {got['cpu'][0] * 1e6:6.0f} us/answer  "
                    f"client CPU {got['client_cpu'][0] * 1e6:6.0f} us/answer",
                    flush=True,
                )
    print()
    print(f"{'scenario':<14}{'API':<32}{'answers/s':>10}{'p50 ms':>8}{'p99 ms':>8}{'CPU us':>8}")
    for label in cases:
        row = {}
        for consul in (False, True):
            r = results[(label, consul)]
            row[consul] = (
                median(r["rates"]),
                percentile(r["latencies"], 50),
                percentile(r["latencies"], 99),
                median(r["cpu"]),
            )
            api = "Consul /v1/health/service" if consul else "interknit /v1/services?index="
            rate, p50, p99, cpu = row[consul]
            print(
                f"{label:<14}{api:<32}{rate:>10,.0f}{p50 * 1000:>8.1f}{p99 * 1000:>8.1f}"
                f"{cpu * 1e6:>8.0f}"
            )
        (nr, _, n99, ncpu), (cr, _, c99, ccpu) = row[False], row[True]
        print(
            f"{'':<14}{'Consul / interknit':<32}{cr / nr:>9.2f}x{'':>8}{c99 / n99:>7.2f}x"
            f"{ccpu / ncpu:>7.2f}x"
        )


if __name__ == "__main__":
    main()
