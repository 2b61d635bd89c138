"""Virtual IP failover: three interknit nodes beside three keepalived (VRRP) in the same
network namespaces, a client probing every VIP every 5 ms.

    .venv/bin/python bench/vip.py [--trials 10] [--systems interknit,keepalived]
        [--advert-int 0.2] [--vrrp-version 3]

Topology (tests/vip/lab.py): three node namespaces and a client on one bridge, five VIPs
(10.77.0.100-103 and fd00:77::100); interknit's nodes reach a three-member etcd over a
second bridge. keepalived runs one VRRP instance per VIP, masters spread over the nodes
(priorities 150/100/50, rotated), ``advert_int`` 0.2 s with VRRPv3 by default (the fastest
setting measured for the issue; ``--advert-int 1 --vrrp-version 2`` for the classic one);
interknit runs with its defaults (adverts 50 ms, dead after 150 ms, fence 150 ms).

Each trial picks the node holding the most VIPs (rotating ties) and either

* **crash**: kills it with SIGKILL (interknit's node; every keepalived process of the node)
  and at the same instant deletes its data interface, as a machine that dies takes its
  addresses and its link with it; or
* **graceful**: sends SIGTERM (interknit hands over before it exits; keepalived sends a
  priority-0 advert).

The gap is, for each VIP the node held, the longest time the client went without an answer
for it from the moment of the kill; a trial's figure is its worst VIP. After each trial the
node comes back and the cluster settles before the next one. Two owners are counted from the
kernel's own address events in every namespace (every add and remove, in order), so a moment
with one VIP on two nodes cannot slip between samples. Needs root, iproute2, etcd and
keepalived (Debian packages etcd-server, keepalived).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from tests.vip.lab import (  # noqa: E402
    VIPS,
    AddressLog,
    Lab,
    NsEtcd,
    Traffic,
    VipNode,
    node_config,
)

from common import INTERKNIT, percentile  # noqa: E402


def wait(what: Callable[[], bool], timeout: float, why: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if what():
            return
        time.sleep(0.05)
    raise RuntimeError(f"timed out: {why}")


class System:
    name = ""

    def __init__(self, lab: Lab, workdir: Path, traffic: Traffic, log: AddressLog) -> None:
        self.lab, self.workdir, self.traffic, self.log = lab, workdir, traffic, log

    def start(self, node: str) -> None: ...

    def crash(self, node: str) -> None: ...

    def stop(self, node: str) -> None: ...

    def close(self) -> None: ...

    def settled(self) -> bool:
        holders = self.log.holders()
        answering = self.traffic.owners(time.monotonic() - 0.1)
        return all(len(holders[v]) == 1 and answering[v] in holders[v] for v in VIPS)


class Interknit(System):
    name = "interknit"

    def __init__(self, *args: object, etcd_binary: str) -> None:
        super().__init__(*args)  # type: ignore[arg-type]
        self.etcd = NsEtcd(self.lab, self.workdir, etcd_binary).start()
        self.nodes = {
            n: VipNode(
                self.lab, n, self.workdir,
                node_config(self.lab, n, self.etcd.endpoints, self.workdir), INTERKNIT,
            )
            for n in self.lab.nodes
        }  # fmt: skip

    def start(self, node: str) -> None:
        self.nodes[node].start()

    def crash(self, node: str) -> None:
        self.nodes[node].kill9()

    def stop(self, node: str) -> None:
        self.nodes[node].terminate()

    def close(self) -> None:
        for node in self.nodes.values():
            if node.running:
                node.kill9()
        self.etcd.stop()


class Keepalived(System):
    name = "keepalived"

    def __init__(self, *args: object, advert_int: float, version: int) -> None:
        super().__init__(*args)  # type: ignore[arg-type]
        self.binary = shutil.which("keepalived") or "/usr/sbin/keepalived"
        self.advert_int = advert_int
        self.version = version
        self.procs: dict[str, subprocess.Popen[bytes]] = {}

    def config(self, node: str) -> str:
        i = int(node[1:]) - 1
        blocks = [
            f"global_defs {{\n  vrrp_version {self.version}\n  vrrp_garp_master_repeat 5\n"
            "  vrrp_garp_master_delay 5\n  script_user root\n}\n"
        ]
        for k, vip in enumerate(VIPS):
            priority = (150, 100, 50)[(i - k) % 3]
            family = "native_ipv6\n" if ":" in vip else ""
            plen = 128 if ":" in vip else 32
            blocks.append(
                f"vrrp_instance V{k} {{\n  state BACKUP\n  interface eth0\n  {family}"
                f"  virtual_router_id {51 + k}\n  priority {priority}\n"
                f"  advert_int {self.advert_int}\n"
                f"  virtual_ipaddress {{\n    {vip}/{plen}\n  }}\n}}\n"
            )
        return "".join(blocks)

    def start(self, node: str) -> None:
        ns = self.lab.ns(node)
        cfg = self.workdir / f"keepalived-{node}.conf"
        cfg.write_text(self.config(node))
        pids = self.workdir / f"keepalived-{node}"
        for stale in (f"{pids}.pid", f"{pids}-vrrp.pid"):  # left by a SIGKILL
            Path(stale).unlink(missing_ok=True)
        log = (self.workdir / f"keepalived-{node}.log").open("ab")
        self.procs[node] = subprocess.Popen(
            ["ip", "netns", "exec", ns, self.binary, "--dont-fork", "--log-console",
             "--vrrp", "-f", str(cfg), "-p", f"{pids}.pid", "-r", f"{pids}-vrrp.pid"],
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip

    def _signal(self, node: str, sig: int) -> None:
        proc = self.procs.pop(node)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, sig)
        proc.wait(20)

    def crash(self, node: str) -> None:
        self._signal(node, signal.SIGKILL)

    def stop(self, node: str) -> None:
        self._signal(node, signal.SIGTERM)

    def close(self) -> None:
        for node in list(self.procs):
            self._signal(node, signal.SIGKILL)


def trial(system: System, kind: str, victim: str) -> tuple[float, int]:
    """One failure: the worst client gap over the victim's VIPs, and two-owner moments."""
    lab, log, traffic = system.lab, system.log, system.traffic
    wait(system.settled, 30, "settled before the trial")
    lost = [v for v, h in log.holders().items() if h == {victim}]
    before = len(log.violations)
    start = time.monotonic()
    if kind == "crash":
        system.crash(victim)
        lab.unplug(victim)
    else:
        system.stop(victim)
    wait(
        lambda: all(traffic.owner(v, time.monotonic() - 0.02) not in (None, victim) for v in lost),
        30,
        "the VIPs answer from the others",
    )
    end = time.monotonic()
    gap = max(traffic.gap(v, start, end) for v in lost)
    if kind == "crash":
        lab.replug(victim)
    system.start(victim)
    wait(system.settled, 30, "settled after the node came back")
    time.sleep(0.5)
    return gap, len(log.violations) - before


def run(system: System, trials: int) -> dict[str, list[float]]:
    results: dict[str, list[float]] = {"crash": [], "graceful": []}
    duals = 0
    for n in system.lab.nodes:
        system.start(n)
    for t in range(trials):
        for kind in ("crash", "graceful"):
            holders = system.log.holders()
            loads = {n: sum(1 for h in holders.values() if h == {n}) for n in system.lab.nodes}
            most = max(loads.values())
            victim = [n for n in system.lab.nodes if loads[n] == most][t % 3 % max(1, list(
                loads.values()).count(most))]  # fmt: skip
            gap, dual = trial(system, kind, victim)
            duals += dual
            results[kind].append(gap)
            print(f"  {system.name:10s} {kind:8s} trial {t + 1}: gap {gap * 1000:6.0f} ms"
                  f"  (node {victim}){'  TWO OWNERS' if dual else ''}", flush=True)  # fmt: skip
    results["duals"] = [float(duals)]
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trials", type=int, default=10)
    parser.add_argument("--systems", default="interknit,keepalived")
    parser.add_argument("--advert-int", type=float, default=0.2)
    parser.add_argument("--vrrp-version", type=int, default=3)
    args = parser.parse_args()
    if os.geteuid() != 0:
        sys.exit("bench/vip.py needs root (network namespaces)")
    etcd_binary = shutil.which("etcd") or "/usr/bin/etcd"
    summary = []
    for name in args.systems.split(","):
        workdir = Path(tempfile.mkdtemp(prefix=f"ik-vip-{name}-"))
        lab = Lab().open()
        traffic = log = system = None
        try:
            log = AddressLog(lab).start()
            traffic = Traffic(lab).start()
            if name == "interknit":
                system = Interknit(lab, workdir, traffic, log, etcd_binary=etcd_binary)
            else:
                system = Keepalived(
                    lab, workdir, traffic, log,
                    advert_int=args.advert_int, version=args.vrrp_version,
                )  # fmt: skip
            results = run(system, args.trials)
            summary.append((name, results, log.overflowed))
        finally:
            if system is not None:
                system.close()
            for part in (traffic, log):
                if part is not None:
                    part.stop()
            lab.close()
    print()
    print(f"{'system':12s} {'crash p50':>10s} {'crash p99':>10s} {'graceful p50':>13s} "
          f"{'graceful p99':>13s} {'two owners':>11s}")  # fmt: skip
    for name, r, overflowed in summary:
        label = name if name == "interknit" else (
            f"keepalived (v{args.vrrp_version}, {args.advert_int:g}s)")  # fmt: skip
        duals = int(r["duals"][0])
        crash = [percentile(r["crash"], q) * 1000 for q in (50, 99)]
        graceful = [percentile(r["graceful"], q) * 1000 for q in (50, 99)]
        print(
            f"{label:12s} {crash[0]:8.0f}ms {crash[1]:8.0f}ms {graceful[0]:11.0f}ms "
            f"{graceful[1]:11.0f}ms {duals:>11d}"
            + ("  (address log overflowed)" if overflowed else "")
        )


if __name__ == "__main__":
    main()
