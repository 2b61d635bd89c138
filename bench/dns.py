"""DNS queries per second: interknit beside dnsmasq, both measured by dnsperf, in one run.

    .venv/bin/python bench/dns.py [--seconds 5] [--runs 3]

dnsmasq serves three A records for ``web.ik.internal`` from a hosts file; an interknit node
(``interknit up``, on uvloop) serves a service ``web`` of three instances. Both get the same
query file. interknit is then asked for the SRV name of the service and for a GSLB name
(``geo.global.ik.internal``: three instances in the client's region, three in another). Each
server is pinned to core 0 and dnsperf to core 1 (taskset), so the figure is what one core of
server answers. Every case runs ``--runs`` times, interleaved so that noise from other work on
the machine spreads over all of them; the medians are printed with the ratio to dnsmasq.

Before measuring, every case is asked once with dnspython and the answer checked, and every
dnsperf run must get only NOERROR: a fast wrong answer does not count.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import free_udp_tcp_port, interknit_node, machine, median, process

WEB = ["10.0.0.1", "10.0.0.2", "10.0.0.3"]
GEO_NEAR = ["10.1.0.1", "10.1.0.2", "10.1.0.3"]  # region eu: the client (127.0.0.1) is there
GEO_FAR = ["10.2.0.1", "10.2.0.2", "10.2.0.3"]  # region us
DNS_CONFIG = """
[dns.regions]
"127.0.0.0/8" = "eu"
"192.0.2.0/24" = "us"
"""


@dataclass(frozen=True)
class Case:
    label: str
    server: str  # "dnsmasq" or "interknit"
    qname: str
    qtype: str
    expect: frozenset[str]  # the addresses (A) or ports (SRV) every answer must hold


CASES = [
    Case("dnsmasq A (3 records)", "dnsmasq", "web.ik.internal.", "A", frozenset(WEB)),
    Case("interknit A (3 instances)", "interknit", "web.ik.internal.", "A", frozenset(WEB)),
    Case(
        "interknit SRV (3 instances)",
        "interknit",
        "_web._tcp.ik.internal.",
        "SRV",
        frozenset({"9001", "9002", "9003"}),
    ),
    Case(
        "interknit GSLB A (nearest)",
        "interknit",
        "geo.global.ik.internal.",
        "A",
        frozenset(GEO_NEAR),
    ),
]


def pins() -> tuple[list[str], list[str]]:
    """taskset prefixes for (servers, dnsperf); none on a one-core machine."""
    taskset = shutil.which("taskset")
    if taskset is None or (os.cpu_count() or 1) < 2:
        print("note: not pinned (needs taskset and two cores)")
        return [], []
    return [taskset, "-c", "0"], [taskset, "-c", "1"]


@contextlib.contextmanager
def dnsmasq(port: int, prefix: Sequence[str], tmp: Path) -> Iterator[None]:
    hosts = tmp / "hosts"
    hosts.write_text("".join(f"{address} web.ik.internal\n" for address in WEB))
    args = [
        *prefix,
        "dnsmasq",
        "--no-daemon",
        "--conf-file=/dev/null",  # the system's dnsmasq.conf has no say
        f"--port={port}",
        "--listen-address=127.0.0.1",
        "--bind-interfaces",
        "--no-resolv",
        "--no-hosts",
        f"--addn-hosts={hosts}",
        "--pid-file=",  # none: it would need /run and root
        "--user=",  # stay who we are
    ]
    with process(args, log=tmp / "dnsmasq.log"):
        yield


def ask(port: int, case: Case, timeout: float = 10.0) -> set[str]:
    """The addresses (A) or ports (SRV) in the answer, asked until the server is up.

    dig, not dnspython: the answers are checked the way an operator would check them.
    """
    args = ["dig", "+short", "+tries=1", "+time=1", "-p", str(port), "@127.0.0.1"]
    deadline = time.monotonic() + timeout
    while True:
        out = subprocess.run(
            [*args, case.qname, case.qtype], capture_output=True, text=True, timeout=10
        )
        lines = out.stdout.split("\n")
        if out.returncode == 0 or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    if case.qtype == "SRV":  # priority weight port target
        return {line.split()[2] for line in lines if line.strip()}
    return {line.strip() for line in lines if line.strip()}


def register(api: str, service: str, iid: str, address: str, port: int, region: str) -> None:
    body = json.dumps({"address": address, "port": port, "region": region}).encode()
    request = urllib.request.Request(
        f"{api}/v1/services/{service}/instances/{iid}",
        data=body,
        method="PUT",
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=10) as r:
        assert r.status == 200, r.read()


def dnsperf(
    port: int, queries: Path, seconds: float, prefix: Sequence[str], clients: int, outstanding: int
) -> float:
    """Queries per second of one dnsperf run; fails on lost queries or a non-NOERROR answer."""
    args = [
        *prefix,
        "dnsperf",
        "-s",
        "127.0.0.1",
        "-p",
        str(port),
        "-d",
        str(queries),
        "-l",
        f"{seconds:g}",
        "-c",
        str(clients),
        "-q",
        str(outstanding),
    ]
    out = subprocess.run(args, capture_output=True, text=True, timeout=seconds + 60, check=True)
    text = out.stdout
    qps = re.search(r"Queries per second:\s+([\d.]+)", text)
    codes = re.search(r"Response codes:\s+(.*)", text)
    if qps is None or codes is None:
        raise RuntimeError(f"cannot read dnsperf's output:\n{text}\n{out.stderr}")
    if not codes.group(1).startswith("NOERROR") or "," in codes.group(1):
        raise RuntimeError(f"answers other than NOERROR: {codes.group(1)}")
    return float(qps.group(1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seconds", type=float, default=5.0, help="length of one dnsperf run")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--clients", type=int, default=1, help="dnsperf -c")
    parser.add_argument("--outstanding", type=int, default=100, help="dnsperf -q")
    args = parser.parse_args()
    for tool, package in (
        ("dnsperf", "dnsperf"),
        ("dnsmasq", "dnsmasq"),
        ("dig", "bind9-dnsutils"),
    ):
        if shutil.which(tool) is None:
            raise SystemExit(f"{tool} is not installed (apt-get install {package})")
    print(f"machine: {machine()}")
    server_pin, client_pin = pins()
    print(
        f"dnsperf -c {args.clients} -q {args.outstanding} -l {args.seconds:g}, UDP, no EDNS; "
        f"{args.runs} runs per case, interleaved; medians"
    )
    masq_port, ik_port = free_udp_tcp_port(), free_udp_tcp_port()
    ports = {"dnsmasq": masq_port, "interknit": ik_port}
    results: dict[str, list[float]] = {case.label: [] for case in CASES}
    with (
        tempfile.TemporaryDirectory(prefix="ik-bench-dns-") as tmpdir,
        dnsmasq(masq_port, server_pin, Path(tmpdir)),
        interknit_node(DNS_CONFIG, dns_port=ik_port, prefix=server_pin) as api,
    ):
        tmp = Path(tmpdir)
        for n, address in enumerate(WEB, start=1):
            register(api, "web", f"w{n}", address, 9000 + n, "eu")
        for n, address in enumerate(GEO_NEAR, start=1):
            register(api, "geo", f"eu{n}", address, 8080, "eu")
        for n, address in enumerate(GEO_FAR, start=1):
            register(api, "geo", f"us{n}", address, 8080, "us")
        files = {}
        for i, case in enumerate(CASES):
            got = ask(ports[case.server], case)
            if got != case.expect:
                raise SystemExit(f"{case.label}: answered {sorted(got)}, not {sorted(case.expect)}")
            files[case.label] = tmp / f"queries-{i}.txt"
            files[case.label].write_text(f"{case.qname.rstrip('.')} {case.qtype}\n")
        # The two A cases ask exactly the same thing: one query file.
        files[CASES[1].label] = files[CASES[0].label]
        for run in range(args.runs):
            line = []
            for case in CASES:
                qps = dnsperf(
                    ports[case.server],
                    files[case.label],
                    args.seconds,
                    client_pin,
                    args.clients,
                    args.outstanding,
                )
                results[case.label].append(qps)
                line.append(f"{case.label.split(' (')[0]} {qps:,.0f}")
            print(f"run {run + 1}: " + " | ".join(line), flush=True)
    base = median(results[CASES[0].label])
    print()
    print(f"{'case':<32}{'queries/s':>12}{'vs dnsmasq':>12}")
    for case in CASES:
        qps = median(results[case.label])
        print(f"{case.label:<32}{qps:>12,.0f}{qps / base:>11.2f}x")


if __name__ == "__main__":
    main()
