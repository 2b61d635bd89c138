"""Automatic registration: how soon a new instance takes traffic and answers in DNS, how soon a
dead one is gone, and how many requests a rolling restart loses.

    .venv/bin/python bench/agent.py [--trials 20] [--rounds 3] [--clients 4]
        [--skip-run] [--skip-containers] [--skip-rolling] [--engine podman|docker]
        [--docker-bin DIR]

One interknit node with a proxy listener (a route per service, retries off, so that no
retry hides a request sent to an instance on its way out) and its DNS server.

**run.** ``trials`` times: ``interknit run --port 0 -- python tests/agent/child.py`` whose
child opens its port after a short random delay and prints the wall-clock time it did. Two
threads poll, every 2 ms, the proxy (``GET /svc`` until this child answers) and the DNS server
(SRV until its port is in the answer). Printed: the time from the port opening to each. Then
the child is killed with SIGKILL, and the time from the kill to the registry no longer listing
it (polled every 2 ms) is printed too.

**containers.** ``trials`` times against Podman's Docker API (a private service, storage and
network, as the tests use: ``tests/agent/podman.py``) with ``interknit agent containers``
running: ``podman run -d -p 127.0.0.1:P:80 --label interknit.service=web ...`` (busybox httpd),
then the time from the container's start (its ``State.StartedAt``) to the first proxied answer
and the first DNS answer; then ``podman kill`` and the time from its death (``FinishedAt``) to
the registry dropping it, and to DNS answering NXDOMAIN. Goals (issue 14): start to first
request and DNS answer under 1 s p99; die to removal under 200 ms. ``--engine docker`` does the
same against a private Docker Engine (``bench/dockerd.py``: Debian's dockerd and containerd,
which need not be installed, ``--docker-bin`` names their folder), which sends its events as
they happen where Podman's API polls its event file.

**rolling.** Three supervised instances behind the proxy; ``clients`` threads send requests
back to back (keep-alive) while each instance in turn is replaced ``rounds`` times: start the
replacement, wait for DNS to list it, SIGTERM the old one (``--drain 300ms``), wait for it to
exit. Printed: requests sent, and every one that did not answer 200 (goal: 0).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

# bench/dns.py would shadow dnspython: import it before this folder is on the path.
HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != HERE]
import dns.exception  # noqa: E402
import dns.message  # noqa: E402
import dns.query  # noqa: E402
import dns.rcode  # noqa: E402
import httpx  # noqa: E402

sys.path.insert(0, str(HERE))

from common import (  # noqa: E402
    INTERKNIT,
    ROOT,
    free_port,
    free_udp_tcp_port,
    interknit_process,
    machine,
    percentile,
)

sys.path.insert(0, str(ROOT))
CHILD = str(ROOT / "tests" / "agent" / "child.py")
SERVICES = ("fresh", "web", "roll")
POLL = 0.002


def proxy_config(port: int) -> str:
    routes = "".join(
        f'\n[[listeners.routes]]\nmatch = {{ path_prefix = "/{s}" }}\nservice = "{s}"\n'
        "retries = { attempts = 0 }\n"
        for s in SERVICES
    )
    return f'[[listeners]]\nname = "web"\nlisten = "127.0.0.1:{port}"\n{routes}'


# One client, its connection kept alive: a new client per poll costs more than the proxy does.
web = httpx.Client(timeout=2)


class Node:
    def __init__(self, url: str, dns_port: int, proxy_port: int) -> None:
        self.url = url
        self.dns_port = dns_port
        self.proxy = f"http://127.0.0.1:{proxy_port}"
        self.api = httpx.Client(base_url=url, timeout=5)

    def srv(self, service: str) -> dns.message.Message:
        q = dns.message.make_query(f"_{service}._tcp.ik.internal.", "SRV")
        return dns.query.udp(q, "127.0.0.1", port=self.dns_port, timeout=2)

    def srv_ports(self, service: str) -> list[int]:
        return [rr.port for rrset in self.srv(service).answer for rr in rrset]

    def listed(self, service: str) -> list[int]:
        r = self.api.get(f"/v1/services/{service}")
        return [] if r.status_code == 404 else [i["port"] for i in r.json()["instances"]]


def until(fn: Callable[[], bool], timeout: float = 20.0) -> float:
    """Poll ``fn`` every 2 ms; the wall-clock time it first held."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(httpx.HTTPError, OSError, dns.exception.DNSException):
            if fn():
                return time.time()
        time.sleep(POLL)
    raise RuntimeError("condition not reached")


def race(**polls: Callable[[], bool]) -> dict[str, float]:
    """Run the polls side by side; each one's time."""
    out: dict[str, float] = {}
    errors: list[BaseException] = []

    def run(name: str, fn: Callable[[], bool]) -> None:
        try:
            out[name] = until(fn)
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=run, args=item) for item in polls.items()]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return out


def in_background(**polls: Callable[[], bool]) -> tuple[threading.Thread, dict[str, float]]:
    seen: dict[str, float] = {}
    thread = threading.Thread(target=lambda: seen.update(race(**polls)))
    thread.start()
    return thread, seen


def summary(label: str, values: list[float]) -> None:
    ms = [v * 1000 for v in values]
    print(
        f"  {label:<34} p50 {percentile(ms, 50):7.1f} ms   p99 {percentile(ms, 99):7.1f} ms"
        f"   max {max(ms):7.1f} ms   (n={len(ms)})"
    )


@contextlib.contextmanager
def supervised(
    node: Node, service: str, *args: str, child: list[str]
) -> Iterator[subprocess.Popen[bytes]]:
    env = {**os.environ, "INTERKNIT_API": node.url}
    proc = subprocess.Popen(
        [INTERKNIT, "run", "--service", service, "--log-level", "warning", *args, "--", *child],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)


def bench_run(node: Node, trials: int) -> None:
    print(f"interknit run: child ready -> proxied request / DNS answer ({trials} trials)")
    to_proxy, to_dns, to_gone = [], [], []
    for n in range(trials):
        name = f"c{n}"
        delay = f"{random.uniform(0.05, 0.3):.3f}"
        cmd = [sys.executable, CHILD, name, "--listen-after", delay]
        with supervised(node, "fresh", "--port", "0", "--id", name, child=cmd) as proc:
            assert proc.stdout is not None
            line = proc.stdout.readline().decode()
            while "listening on" not in line:
                if not line:
                    raise RuntimeError("the supervisor ended before its child listened")
                line = proc.stdout.readline().decode()
            port = int(line.split("listening on ")[1].split()[0])
            opened = float(line.rsplit(" at ", 1)[1])
            seen = race(
                proxy=lambda name=name: web.get(f"{node.proxy}/fresh").text == name,
                dns=lambda port=port: port in node.srv_ports("fresh"),
            )
            to_proxy.append(seen["proxy"] - opened)
            to_dns.append(seen["dns"] - opened)
            child_pid = int(
                subprocess.run(
                    ["pgrep", "-P", str(proc.pid)], capture_output=True, text=True
                ).stdout.split()[0]
            )
            killed = time.time()
            os.kill(child_pid, signal.SIGKILL)
            gone = until(lambda port=port: port not in node.listed("fresh"))
            to_gone.append(gone - killed)
            proc.wait(10)
    summary("port open -> first proxied answer", to_proxy)
    summary("port open -> in DNS (SRV)", to_dns)
    summary("SIGKILL of the child -> deregistered", to_gone)


def started_at(text: str) -> float:
    """Podman's RFC 3339 times with nanoseconds, as seconds since the epoch."""
    text = text.strip().strip('"')
    head, _, frac = text.partition(".")
    frac, zone = frac[:-1], "Z" if text.endswith("Z") else ""
    digits = "".join(c for c in frac if c.isdigit())
    base = datetime.datetime.strptime(head, "%Y-%m-%dT%H:%M:%S").replace(tzinfo=datetime.UTC)
    assert zone == "Z", text
    return base.timestamp() + float("0." + (digits or "0"))


class DieEvents:
    """The time the engine gives each container's ``die`` event (``timeNano``): how much of
    die -> removal is the engine's own delay in saying so."""

    def __init__(self, sock: Path) -> None:
        self.stamped: dict[str, float] = {}
        filters = urllib.parse.quote(json.dumps({"event": ["die", "died"]}))
        self.conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.conn.connect(str(sock))
        self.conn.sendall(f"GET /events?filters={filters} HTTP/1.1\r\nHost: d\r\n\r\n".encode())
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        buffer = b""
        pattern = rb'"id":"([0-9a-f]{64})".*?"timeNano":(\d+)'
        with contextlib.suppress(OSError):
            while chunk := self.conn.recv(65536):
                buffer += chunk
                *lines, buffer = buffer.split(b"\n")
                for line in lines:
                    m = re.search(pattern, line)
                    if m:
                        self.stamped[m.group(1).decode()] = int(m.group(2)) / 1e9

    def close(self) -> None:
        self.conn.close()


def state(engine: Any, name: str) -> dict[str, Any]:
    return dict(json.loads(engine.cmd("inspect", name))[0]["State"])


def open_engine(kind: str, workdir: Path, docker_bin: Path | None) -> Any:
    """A private Podman (as the tests use) or Docker Engine, or ``None`` if its tools are
    missing (said)."""
    busybox = shutil.which("busybox")
    if kind == "docker":
        from dockerd import Docker

        docker = shutil.which("docker")
        bindir = docker_bin or Path(shutil.which("dockerd") or "/usr/bin/dockerd").parent
        if docker is None or busybox is None or not (bindir / "dockerd").exists():
            print("containers: skipped (the docker CLI, busybox-static and --docker-bin DIR)")
            return None
        return Docker(workdir, bindir, docker, busybox)
    from tests.agent.podman import Podman

    podman_bin = shutil.which("podman")
    if podman_bin is None or busybox is None:
        print("containers: skipped (apt-get install podman runc netavark iptables busybox-static)")
        return None
    return Podman(workdir, podman_bin, busybox)


def bench_containers(node: Node, trials: int, kind: str, docker_bin: Path | None) -> None:
    print(
        f"interknit agent containers on {kind}: container start -> proxied request / DNS "
        f"({trials} trials)"
    )
    with tempfile.TemporaryDirectory(prefix=f"ik-bench-{kind}-") as tmp:
        engine = open_engine(kind, Path(tmp), docker_bin)
        if engine is None:
            return
        agent_log = Path(tmp) / "agent.log"
        agent: subprocess.Popen[bytes] | None = None
        try:
            engine.start_service()
            env = {**os.environ, "INTERKNIT_API": node.url}
            agent = subprocess.Popen(
                [
                    INTERKNIT,
                    "agent",
                    "containers",
                    "--socket",
                    str(engine.socket),
                    "--address",
                    "127.0.0.1",
                    "--log-level",
                    "debug",
                ],
                env=env,
                stderr=agent_log.open("wb"),
            )
            time.sleep(1.0)
            events = DieEvents(engine.socket)
            to_proxy, to_dns, to_gone, to_nx, after_event = [], [], [], [], []
            for n in range(trials):
                port = free_port()
                name = f"b{n}"
                # Polling starts before the container does: podman run returns after it.
                poller, seen = in_background(
                    proxy=lambda: web.get(f"{node.proxy}/web").status_code == 200,
                    dns=lambda port=port: port in node.srv_ports("web"),
                )
                engine.run(name, "-p", f"127.0.0.1:{port}:80", "--label", "interknit.service=web")
                poller.join()
                started = started_at(state(engine, name)["StartedAt"])
                to_proxy.append(seen["proxy"] - started)
                to_dns.append(seen["dns"] - started)
                poller, gone = in_background(
                    registry=lambda port=port: port not in node.listed("web"),
                    dns=lambda: node.srv("web").rcode() == dns.rcode.NXDOMAIN,
                )
                engine.cmd("kill", name)
                poller.join()
                info = json.loads(engine.cmd("inspect", name))[0]
                died = started_at(info["State"]["FinishedAt"])
                until(lambda cid=info["Id"]: cid in events.stamped, 5)
                after_event.append(gone["registry"] - events.stamped[info["Id"]])
                to_gone.append(gone["registry"] - died)
                to_nx.append(gone["dns"] - died)
                engine.cmd("rm", "-f", name)
            summary("started -> first proxied answer", to_proxy)
            summary("started -> in DNS (SRV)", to_dns)
            summary("died -> deregistered", to_gone)
            summary("died -> NXDOMAIN", to_nx)
            summary("die event (engine's time) -> dereg.", after_event)
            # The agent's own account: how late each event reached it, how long acting took
            # (for a start, that includes asking the engine about the container).
            for action in ("start", "die"):
                told, took = [], []
                for line in agent_log.read_text().splitlines():
                    m = re.search(rf"action={action} .*told_ms=([\d.]+) took_ms=([\d.]+)", line)
                    if m:
                        told.append(float(m.group(1)) / 1000)
                        took.append(float(m.group(2)) / 1000)
                if told:
                    summary(f"{action} event: reached the agent after", told)
                    summary(f"{action} event: the agent acted in", took)
        finally:
            if agent is not None:
                agent.kill()
                agent.wait(10)
            engine.close()


def bench_rolling(node: Node, rounds: int, clients: int) -> None:
    print(f"rolling restart: 3 supervised instances, {rounds} rounds, {clients} clients")
    serial = iter(range(10_000))

    def start() -> tuple[subprocess.Popen[bytes], str]:
        name = f"r{next(serial)}"
        env = {**os.environ, "INTERKNIT_API": node.url}
        proc = subprocess.Popen(
            [
                INTERKNIT, "run", "--service", "roll", "--port", "0", "--id", name,
                "--drain", "300ms", "--log-level", "warning", "--",
                sys.executable, CHILD, name,
            ],
            env=env,
            stdout=subprocess.DEVNULL,
        )  # fmt: skip
        return proc, name

    live = [start() for _ in range(3)]
    until(lambda: len(node.srv_ports("roll")) == 3)
    answers: Counter[str] = Counter()
    stop = threading.Event()

    def hammer() -> None:
        with httpx.Client(base_url=node.proxy, timeout=5) as c:
            while not stop.is_set():
                try:
                    r = c.get("/roll")
                    answers["ok" if r.status_code == 200 else f"HTTP {r.status_code}"] += 1
                except httpx.HTTPError as exc:
                    answers[type(exc).__name__] += 1

    threads = [threading.Thread(target=hammer) for _ in range(clients)]
    for t in threads:
        t.start()
    began = time.monotonic()
    try:
        for _ in range(rounds):
            for i in range(3):
                new = start()
                until(lambda: len(node.srv_ports("roll")) == 4)
                old, _ = live[i]
                old.send_signal(signal.SIGTERM)
                old.wait(20)
                live[i] = new
                until(lambda: len(node.srv_ports("roll")) == 3)
    finally:
        stop.set()
        for t in threads:
            t.join()
        for proc, _ in live:
            proc.send_signal(signal.SIGTERM)
        for proc, _ in live:
            proc.wait(20)
    took = time.monotonic() - began
    total = sum(answers.values())
    failed = {k: v for k, v in answers.items() if k != "ok"}
    print(
        f"  {total} requests in {took:.1f} s over {rounds * 3} replacements: "
        f"{sum(failed.values())} failed {dict(failed) or ''}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trials", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--skip-run", action="store_true")
    parser.add_argument("--skip-containers", action="store_true")
    parser.add_argument("--skip-rolling", action="store_true")
    parser.add_argument(
        "--engine",
        choices=("podman", "docker"),
        default="podman",
        help="the container engine of the containers part (see bench/dockerd.py for docker)",
    )
    parser.add_argument(
        "--docker-bin", type=Path, help="the folder of dockerd, containerd and docker-proxy"
    )
    args = parser.parse_args()
    print(machine())
    print(f"load average: {os.getloadavg()[0]:.2f} {os.getloadavg()[1]:.2f}")
    proxy_port = free_port()
    dns_port = free_udp_tcp_port()
    with interknit_process(proxy_config(proxy_port), dns_port=dns_port) as (url, _):
        node = Node(url, dns_port, proxy_port)
        if not args.skip_run:
            bench_run(node, args.trials)
        if not args.skip_containers:
            bench_containers(node, args.trials, args.engine, args.docker_bin)
        if not args.skip_rolling:
            bench_rolling(node, args.rounds, args.clients)
    print(f"load average after: {os.getloadavg()[0]:.2f}")
    print(json.dumps({"done": True}))


if __name__ == "__main__":
    main()
