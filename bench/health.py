"""Failure detection: an interknit node beside HAProxy 2.6 checking the same backend, and the
check lag of one node checking 5,000 instances.

    .venv/bin/python bench/health.py [--trials 10] [--modes hang,refuse] [--instances 5000]
        [--lag-seconds 15] [--in-process] [--no-dns] [--skip-detection] [--skip-lag]

**Detection.** One backend (bench/backend.py, in this process) is checked by an interknit node
(``check = {http = "/health", interval = "1s", timeout = "1s", rise = 2, fall = 3}``) and by
HAProxy (``check inter 1s fall 3 rise 2``, ``timeout check 1s``, ``option httpchk GET
/health``) at the same time. Then, ``trials`` times for each mode (each time with a fresh
backend, HAProxy and node, so that the two checkers' schedules have a new random offset), at a
random moment the backend stops answering: ``hang`` (connections are accepted and read, never
answered; when it recovers it answers what it held) or ``refuse`` (its listener closes:
connection refused). The time from that moment to each one taking the backend out of rotation
is printed, then the same from the recovery to each one putting it back. interknit's view
comes from its watch stream (``GET /v1/watch?service=S``, a push); HAProxy's from ``show
stat`` on its stats socket, polled every 5 ms. Out of rotation means ``health`` is not
passing/warning for interknit, and a status that is not ``UP...`` for HAProxy (``UP 1/3``,
going down, still takes traffic).

**Lag.** nginx (one worker, ``return 200``) serves ``/health`` on a few ports; ``instances``
HTTP-checked instances (1 s interval) are registered with the node through the API, spread over
those ports with distinct ids (several instances share each address: a Python backend cannot
answer 5,000 checks a second on a shared machine, nginx can). Once every instance is passing
(each one's first passing check is a registry change, which the node's DNS zone and proxy
pools also follow), the node's ``interknit_health_check_lag_seconds`` histogram is read from
``/metrics`` twice, ``lag-seconds`` apart (15 s: one scrape per window, like a Prometheus
scraping every 15 s), and the p99 of the difference is printed (interpolated within its
bucket), with the checks run per second in that window: the scheduler skips missed slots
rather than piling them up, so the check rate is what shows a node falling behind. The time a
scrape takes is printed too: a scrape that blocks the node's event loop delays the checks due
meanwhile, and that delay is in the window. ``--in-process`` runs the node on this process's
event loop instead and reads the histogram object directly, without a scrape: the checker's
own lag. ``--no-dns`` runs the node with ``[dns] enabled = false``, to tell the checker's cost
from the DNS zone's (which re-indexes a whole service on each change).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib
import json
import math
import os
import random
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import aiohttp
import uvloop

from backend import Backend
from common import (
    free_port,
    haproxy,
    interknit_process,
    machine,
    median,
    nginx,
)

SERVICE = "hb"
INSTANCE = "b1"
CHECK = {"http": "/health", "interval": "1s", "timeout": "1s", "rise": 2, "fall": 3}
MODES = ("hang", "refuse")
POLL = 0.005  # HAProxy stats polling period


def haproxy_config(frontend: int, backend: int) -> str:
    return f"""
global
    stats socket {{dir}}/stats.sock mode 600 level admin

defaults
    mode http
    timeout connect 1s
    timeout client 5s
    timeout server 5s
    timeout check 1s

frontend web
    bind 127.0.0.1:{frontend}
    default_backend {SERVICE}

backend {SERVICE}
    option httpchk GET /health
    server {INSTANCE} 127.0.0.1:{backend} check inter 1s fall 3 rise 2
"""


# Watching each side


@dataclass
class Side:
    """When a checker's view of the backend changed: (time.monotonic(), in rotation)."""

    name: str
    changes: list[tuple[float, bool]] = field(default_factory=list)
    current: bool | None = None

    def see(self, in_rotation: bool) -> None:
        if in_rotation != self.current:
            self.current = in_rotation
            self.changes.append((time.monotonic(), in_rotation))

    def first_change_to(self, in_rotation: bool, after: float) -> float | None:
        for when, state in self.changes:
            if when >= after and state == in_rotation:
                return when
        return None


async def watch_interknit(api: str, side: Side) -> None:
    """Follow the watch stream; an instance is in rotation while passing or warning."""
    timeout = aiohttp.ClientTimeout(total=None, sock_read=None)
    async with (
        aiohttp.ClientSession(timeout=timeout) as http,
        http.get(f"{api}/v1/watch?service={SERVICE}") as response,
    ):
        async for raw in response.content:
            if not raw.startswith(b"data: "):
                continue
            data = json.loads(raw[6:])
            if "instances" in data:  # a resync: the full state
                found = [i for i in data["instances"] if i["id"] == INSTANCE]
                if found:
                    side.see(found[0]["health"] in ("passing", "warning"))
            elif data.get("id") == INSTANCE:
                if data["type"] == "delete":
                    side.see(False)
                else:
                    side.see(data["instance"]["health"] in ("passing", "warning"))


async def haproxy_status(socket_path: str) -> str:
    reader, writer = await asyncio.open_unix_connection(socket_path)
    try:
        writer.write(f"show stat {SERVICE} 4 -1\n".encode())
        await writer.drain()
        text = (await reader.read()).decode()
    finally:
        writer.close()
    lines = text.splitlines()
    columns = lines[0].lstrip("# ").split(",")
    for line in lines[1:]:
        values = line.split(",")
        if len(values) >= len(columns) and values[1] == INSTANCE:
            return values[columns.index("status")]
    raise RuntimeError(f"no server {INSTANCE} in HAProxy's stats: {text!r}")


async def watch_haproxy(socket_path: str, side: Side) -> None:
    while True:
        status = await haproxy_status(socket_path)
        side.see(status.startswith("UP"))
        await asyncio.sleep(POLL)


# Detection trials


@dataclass
class Trial:
    mode: str
    down: dict[str, float]  # seconds from the failure to out of rotation, by side
    up: dict[str, float]  # seconds from the recovery to back in rotation, by side


async def wait_for(sides: list[Side], in_rotation: bool, after: float, limit: float) -> None:
    deadline = time.monotonic() + limit
    while any(s.first_change_to(in_rotation, after) is None for s in sides):
        if time.monotonic() > deadline:
            states = ", ".join(f"{s.name}: {s.current}" for s in sides)
            raise RuntimeError(f"no change to in_rotation={in_rotation} within {limit}s ({states})")
        await asyncio.sleep(0.01)


async def one_trial(api: str, socket_path: str, backend: Backend, mode: str) -> Trial:
    ik, ha = Side("interknit"), Side("haproxy")
    sides = [ik, ha]
    watchers = [
        asyncio.create_task(watch_interknit(api, ik)),
        asyncio.create_task(watch_haproxy(socket_path, ha)),
    ]
    body = {"address": "127.0.0.1", "port": backend.port, "check": CHECK}
    async with (
        aiohttp.ClientSession() as http,
        http.put(f"{api}/v1/services/{SERVICE}/instances/{INSTANCE}", json=body) as r,
    ):
        if r.status != 200:
            raise RuntimeError(f"registration failed: {r.status} {await r.text()}")
    try:
        await wait_for(sides, True, 0.0, 15)
        # Both must have passed enough checks to need ``fall`` failures (HAProxy starts a
        # server one failure from down); then a random moment, so the failure falls anywhere
        # on both checkers' schedules.
        await asyncio.sleep(3 + random.random())
        failed = time.monotonic()
        if mode == "hang":
            backend.hang()
        else:
            await backend.refuse()
        await wait_for(sides, False, failed, 20)
        await asyncio.sleep(1 + random.random())
        recovered = time.monotonic()
        await backend.recover()
        await wait_for(sides, True, recovered, 20)
    finally:
        for task in watchers:
            task.cancel()
        await asyncio.gather(*watchers, return_exceptions=True)
    return Trial(
        mode,
        {s.name: _since(s, False, failed) for s in sides},
        {s.name: _since(s, True, recovered) for s in sides},
    )


def _since(side: Side, in_rotation: bool, after: float) -> float:
    when = side.first_change_to(in_rotation, after)
    assert when is not None
    return when - after


def run_detection(modes: list[str], trials: int) -> list[Trial]:
    """Each trial has a fresh backend, HAProxy and node: two checkers that ran side by side
    keep their schedules' offset for good, so trials in one run would all favour the same
    side in the same way."""
    results: list[Trial] = []
    for n in range(trials):
        for mode in modes:
            backend_port, frontend = free_port(), free_port()

            async def inside(
                api: str, haproxy_dir: Path, mode: str = mode, port: int = backend_port
            ) -> Trial:
                backend = Backend(port=port)
                await backend.start()
                try:
                    socket_path = str(haproxy_dir / "stats.sock")
                    return await one_trial(api, socket_path, backend, mode)
                finally:
                    await backend.stop()

            with (
                haproxy(haproxy_config(frontend, backend_port), frontend) as haproxy_dir,
                interknit_process() as (api, _proc),
            ):
                trial = uvloop.run(inside(api, haproxy_dir))
            results.append(trial)
            print(
                f"  {mode:<7}{n + 1:>3}   out: interknit {trial.down['interknit']:5.2f}s"
                f"  haproxy {trial.down['haproxy']:5.2f}s   back: interknit "
                f"{trial.up['interknit']:5.2f}s  haproxy {trial.up['haproxy']:5.2f}s",
                flush=True,
            )
    return results


def report_detection(trials: list[Trial]) -> None:
    modes = sorted({t.mode for t in trials}, key=MODES.index)
    print()
    print(
        f"{'seconds, ' + str(len(trials) // len(modes)) + ' trial(s) per mode':<30}"
        f"{'interknit':>20}{'HAProxy':>20}{'ratio':>14}"
    )
    print(f"{'':<30}{'median':>10}{'mean':>10}{'median':>10}{'mean':>10}{'median':>8}{'mean':>6}")
    for mode in modes:
        mine = [t for t in trials if t.mode == mode]
        for label, pick in (("out of rotation", _down), ("back in rotation", _up)):
            ik = [pick(t)["interknit"] for t in mine]
            ha = [pick(t)["haproxy"] for t in mine]
            ik_mean, ha_mean = sum(ik) / len(ik), sum(ha) / len(ha)
            print(
                f"{mode + ': ' + label:<30}{median(ik):>10.2f}{ik_mean:>10.2f}"
                f"{median(ha):>10.2f}{ha_mean:>10.2f}{median(ik) / median(ha):>6.2f}x"
                f"{ik_mean / ha_mean:>6.2f}x"
            )
    print(
        "(each time depends on where the failure falls in each checker's interval, uniform "
        "over one interval: compare means over many trials, not single trials)"
    )


def _down(t: Trial) -> dict[str, float]:
    return t.down


def _up(t: Trial) -> dict[str, float]:
    return t.up


# Check lag with many instances


def nginx_health(ports: list[int]) -> str:
    listens = "".join(f"    listen 127.0.0.1:{p} backlog=4096;\n" for p in ports)
    return (
        "server {\n" + listens + "    keepalive_timeout 0;\n"
        '    location / { return 200 "ok\\n"; }\n}\n'
    )


@dataclass
class Histogram:
    buckets: list[tuple[float, float]]  # (upper bound, cumulative count)
    count: float
    total: float

    def minus(self, earlier: Histogram) -> Histogram:
        before = dict(earlier.buckets)
        return Histogram(
            [(le, c - before.get(le, 0.0)) for le, c in self.buckets],
            self.count - earlier.count,
            self.total - earlier.total,
        )

    def quantile(self, q: float) -> float:
        """Prometheus' histogram_quantile: linear within the bucket that holds the rank."""
        rank = q * self.count
        lower, below = 0.0, 0.0
        for le, cumulative in self.buckets:
            if cumulative >= rank:
                if math.isinf(le):
                    return lower
                inside = cumulative - below
                return lower + (le - lower) * ((rank - below) / inside if inside else 0.0)
            lower, below = le, cumulative
        return math.nan

    def share_at_most(self, bound: float) -> float:
        for le, cumulative in self.buckets:
            if le == bound:
                return cumulative / self.count if self.count else math.nan
        raise ValueError(f"no bucket at {bound}")


def parse_histogram(text: str, name: str) -> Histogram:
    buckets: list[tuple[float, float]] = []
    count = total = 0.0
    for line in text.splitlines():
        if line.startswith(name + "_bucket{"):
            le = line.split('le="', 1)[1].split('"', 1)[0]
            buckets.append((float(le), float(line.rsplit(" ", 1)[1])))
        elif line.startswith(name + "_count"):
            count = float(line.rsplit(" ", 1)[1])
        elif line.startswith(name + "_sum"):
            total = float(line.rsplit(" ", 1)[1])
    if not buckets:
        raise RuntimeError(f"{name} is not in /metrics")
    return Histogram(sorted(buckets), count, total)


def sum_counter(text: str, name: str, label: str) -> dict[str, float]:
    """A counter's samples summed by one label's value."""
    out: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith(name + "{") and f'{label}="' in line:
            value = line.split(f'{label}="', 1)[1].split('"', 1)[0]
            out[value] = out.get(value, 0.0) + float(line.rsplit(" ", 1)[1])
    return out


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@dataclass
class LagResult:
    instances: int
    registered_per_second: float
    settled: float  # seconds from the last registration to every instance passing
    window: float
    lag: Histogram
    checks_per_second: float
    results: dict[str, float]
    cpu_share: float  # of one core, the node's process, during the window
    read_seconds: float  # the slower of the two readings (a /metrics scrape, or in-process)


LAG = "interknit_health_check_lag_seconds"

# One reading of the node: the lag histogram and the check results so far (empty when not read).
Reading = tuple[Histogram, dict[str, float]]


async def lag(
    api: str,
    pid: int,
    ports: list[int],
    instances: int,
    seconds: float,
    settle_limit: float,
    read: Callable[[aiohttp.ClientSession], Awaitable[Reading]],
) -> LagResult:
    connector = aiohttp.TCPConnector(limit=64)
    async with aiohttp.ClientSession(api, connector=connector) as http:
        queue = list(range(instances))

        async def register_worker() -> None:
            while queue:
                i = queue.pop()
                body = {"address": "127.0.0.1", "port": ports[i % len(ports)], "check": CHECK}
                async with http.put(f"/v1/services/many/instances/i{i}", json=body) as r:
                    if r.status != 200:
                        raise RuntimeError(f"registration failed: {r.status} {await r.text()}")

        started = time.monotonic()
        await asyncio.gather(*(register_worker() for _ in range(32)))
        registered = instances / (time.monotonic() - started)
        # Measure the steady state: every instance checked and passing, so that the first
        # checks' transitions (each one a registry change) are over.
        settle_started = time.monotonic()
        while True:
            async with http.get("/v1/services") as r:
                passing = (await r.json())["services"].get("many", {}).get("passing", 0)
            if passing >= instances:
                break
            if time.monotonic() - settle_started > settle_limit:
                raise RuntimeError(f"only {passing} of {instances} instances passing")
            await asyncio.sleep(0.5)
        settled = time.monotonic() - settle_started
        await asyncio.sleep(2.0)

        (lag0, results0), readings = await timed(read(http))
        cpu0, t0 = cpu_seconds(pid), time.monotonic()
        await asyncio.sleep(seconds)
        (lag1, results1), second = await timed(read(http))
        cpu1, t1 = cpu_seconds(pid), time.monotonic()
    window = lag1.minus(lag0)
    results = {k: v - results0.get(k, 0.0) for k, v in results1.items()}
    return LagResult(
        instances,
        registered,
        settled,
        t1 - t0,
        window,
        window.count / (t1 - t0),
        results,
        (cpu1 - cpu0) / (t1 - t0),
        max(readings, second),
    )


async def timed(reading: Awaitable[Reading]) -> tuple[Reading, float]:
    began = time.monotonic()
    got = await reading
    return got, time.monotonic() - began


async def scrape(http: aiohttp.ClientSession) -> Reading:
    async with http.get("/metrics") as r:
        text = await r.text()
    return parse_histogram(text, LAG), sum_counter(text, "interknit_health_checks_total", "result")


def run_lag(instances: int, seconds: float, ports: int, dns: bool, settle: float) -> LagResult:
    port_list = [free_port() for _ in range(ports)]
    # interknit_process puts ``extra`` right after the [dns] table's listen key.
    extra = "" if dns else "enabled = false"
    with (
        nginx(nginx_health(port_list), port_list[0]),
        interknit_process(extra, options=["--log-level", "warning"]) as (api, proc),
    ):
        return uvloop.run(lag(api, proc.pid, port_list, instances, seconds, settle, scrape))


def run_lag_in_process(
    instances: int, seconds: float, ports: int, dns: bool, settle: float
) -> LagResult:
    """The node runs on this process's event loop and its lag histogram is read from the
    object, so no /metrics scrape (and no exposition of every instance's series) takes place."""
    _import_dnspython()
    from interknit.config import Config
    from interknit.node import Node

    port_list = [free_port() for _ in range(ports)]
    api = free_port()

    async def inside(data_dir: str) -> LagResult:
        config = Config.model_validate(
            {
                "node": {"data_dir": data_dir},
                "registry": {"listen": f"127.0.0.1:{api}"},
                "dns": {"listen": f"127.0.0.1:{free_port()}", "enabled": dns},
                # Above the default cap (1,000 a second): the instances here are all due.
                "health": {"max_checks_per_second": max(1000, 2 * instances)},
            }
        )
        node = Node(config)
        up = asyncio.Event()
        running = asyncio.create_task(node.run(lambda _node: up.set()))
        await asyncio.wait([running, asyncio.create_task(up.wait())], return_when="FIRST_COMPLETED")
        if running.done():
            running.result()

        async def read(_http: aiohttp.ClientSession) -> Reading:
            assert node.health is not None
            return histogram_of(node.health.metrics.lag), {}

        try:
            return await lag(
                f"http://127.0.0.1:{api}", os.getpid(), port_list, instances, seconds, settle, read
            )
        finally:
            running.cancel()
            await asyncio.gather(running, return_exceptions=True)

    with (
        tempfile.TemporaryDirectory(prefix="ik-bench-") as tmp,
        nginx(nginx_health(port_list), port_list[0]),
    ):
        return uvloop.run(inside(f"{tmp}/data"))


def _import_dnspython() -> None:
    """Import dnspython's ``dns`` before the node needs it: for a script run from bench/,
    bench/dns.py (the DNS benchmark) would shadow it."""
    here = Path(__file__).resolve().parent
    saved = sys.path[:]
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != here]
    try:
        sys.modules.pop("dns", None)
        importlib.import_module("dns.edns")
    finally:
        sys.path[:] = saved


def histogram_of(metric: Any) -> Histogram:
    buckets: list[tuple[float, float]] = []
    count = total = 0.0
    for family in metric.collect():
        for sample in family.samples:
            if sample.name.endswith("_bucket"):
                buckets.append((float(sample.labels["le"]), sample.value))
            elif sample.name.endswith("_count"):
                count = sample.value
            elif sample.name.endswith("_sum"):
                total = sample.value
    return Histogram(sorted(buckets), count, total)


def report_lag(r: LagResult) -> None:
    h = r.lag
    print(
        f"{r.instances:,} HTTP instances, 1s interval (registered at {r.registered_per_second:,.0f}"
        f"/s, all passing {r.settled:.1f}s after the last one); window {r.window:.1f}s"
    )
    results = ", ".join(f"{k} {v:,.0f}" for k, v in sorted(r.results.items()))
    print(
        f"  checks run: {r.checks_per_second:,.0f}/s (due: {r.instances:,}/s); results: "
        + (results or "not read")
    )
    mean = h.total / h.count * 1000 if h.count else math.nan
    print(
        f"  check lag: p50 {h.quantile(0.5) * 1000:.1f} ms, p99 {h.quantile(0.99) * 1000:.1f} ms "
        f"(interpolated in its bucket), mean {mean:.1f} ms; "
        f"{h.share_at_most(0.1):.2%} of checks started within 100 ms of due"
    )
    print(f"  node CPU: {r.cpu_share:.0%} of one core")
    delayed = r.read_seconds * r.instances
    print(
        f"  reading the histogram took up to {r.read_seconds * 1000:.0f} ms: if that blocks the "
        f"node's event loop, the reading at the window's start delays about {delayed:,.0f} "
        f"checks ({delayed / h.count:.1%} of the window's)"
    )
    ok = h.quantile(0.99) < 0.1 and r.checks_per_second >= 0.95 * r.instances
    print(f"  [{'ok' if ok else 'MISSED'}] p99 lag < 100 ms while running >= 95% of due checks")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trials", type=int, default=10, help="failures per mode")
    parser.add_argument("--modes", default=",".join(MODES))
    parser.add_argument("--instances", type=int, default=5000)
    parser.add_argument("--lag-seconds", type=float, default=15.0)
    parser.add_argument("--ports", type=int, default=10, help="nginx ports for the instances")
    parser.add_argument(
        "--no-dns", action="store_true", help="lag: run the node with [dns] enabled = false"
    )
    parser.add_argument(
        "--in-process",
        action="store_true",
        help="lag: run the node in this process and read its histogram without /metrics",
    )
    parser.add_argument(
        "--settle-timeout", type=float, default=600.0, help="lag: wait this long for passing"
    )
    parser.add_argument("--skip-detection", action="store_true")
    parser.add_argument("--skip-lag", action="store_true")
    args = parser.parse_args()
    modes = [m for m in args.modes.split(",") if m]
    for m in modes:
        if m not in MODES:
            parser.error(f"--modes: {m!r} is not one of {', '.join(MODES)}")
    print(f"machine: {machine()}")
    steps: list[Callable[[], None]] = []
    if not args.skip_detection:

        def detect() -> None:
            print(
                "detection: interknit check {http=/health, interval=1s, timeout=1s, rise=2, "
                "fall=3} vs HAProxy check inter 1s fall 3 rise 2, timeout check 1s; "
                f"{args.trials} trial(s) per mode"
            )
            report_detection(run_detection(modes, args.trials))

        steps.append(detect)
    if not args.skip_lag:

        def lag_step() -> None:
            print(
                f"lag: {args.instances:,} instances over {args.ports} nginx ports "
                "(distinct ids, shared addresses); node DNS "
                + ("off (--no-dns)" if args.no_dns else "on")
                + "; histogram read "
                + ("in-process" if args.in_process else "from /metrics")
            )
            run = run_lag_in_process if args.in_process else run_lag
            result = run(
                args.instances, args.lag_seconds, args.ports, not args.no_dns, args.settle_timeout
            )
            report_lag(result)

        steps.append(lag_step)
    for step in steps:
        print()
        step()


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        main()
