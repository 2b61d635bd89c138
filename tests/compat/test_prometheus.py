"""Prometheus (Debian's) discovering scrape targets from interknit, with ``http_sd_configs``
and ``dns_sd_configs`` (SRV, then A look-ups of the SRV targets), read back through its own
API.

Debian's Prometheus resolves names only through /etc/resolv.conf, on port 53. So it runs in a
network namespace made here, whose ``/etc/netns/NAME/resolv.conf`` (bind-mounted by
``ip netns exec``) points at interknit's DNS on port 53 of a veth address. The node, its DNS
and the scraped backends stay in the test's namespace on the veth's other end
(198.18.0.0/15, the range set aside for benchmarks and tests). Everything made here is taken
down again, also when the test fails.
"""

from __future__ import annotations

import contextlib
import os
import random
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.backends import Backend
from tests.conftest import STRICT, require_tool
from tests.nodeproc import NodeProcess, free_port, wait_for

pytestmark = pytest.mark.timeout(120)


def _run(*args: str) -> None:
    subprocess.run(args, check=True, capture_output=True, timeout=20)


@contextlib.contextmanager
def namespace() -> Iterator[tuple[str, str, str]]:
    """A network namespace joined to this one by a veth pair: (name, our address, its
    address)."""
    ip = require_tool("ip")
    if os.geteuid() != 0:
        message = "network namespaces need root"
        if STRICT:
            pytest.fail(message)
        pytest.skip(message)
    tag = f"{os.getpid() % 10000:04d}{random.randrange(100):02d}"
    name, outside, inside = f"ikcompat{tag}", f"ikc{tag}a", f"ikc{tag}b"
    for _ in range(20):
        subnet = random.randrange(0, 256)
        host, guest = f"198.18.{subnet}.1", f"198.18.{subnet}.2"
        shown = subprocess.run([ip, "-4", "addr", "show"], capture_output=True, text=True).stdout
        if f" {host}/" not in shown:
            break
    resolv_dir = Path("/etc/netns") / name
    try:
        _run(ip, "netns", "add", name)
        _run(ip, "link", "add", outside, "type", "veth", "peer", "name", inside)
        _run(ip, "link", "set", inside, "netns", name)
        _run(ip, "addr", "add", f"{host}/30", "dev", outside)
        _run(ip, "link", "set", outside, "up")
        _run(ip, "netns", "exec", name, "ip", "addr", "add", f"{guest}/30", "dev", inside)
        _run(ip, "netns", "exec", name, "ip", "link", "set", inside, "up")
        _run(ip, "netns", "exec", name, "ip", "link", "set", "lo", "up")
        resolv_dir.mkdir(parents=True, exist_ok=True)
        (resolv_dir / "resolv.conf").write_text(f"nameserver {host}\noptions ndots:1\n")
        yield name, host, guest
    finally:
        subprocess.run([ip, "link", "del", outside], capture_output=True, timeout=20)
        subprocess.run([ip, "netns", "del", name], capture_output=True, timeout=20)
        shutil.rmtree(resolv_dir, ignore_errors=True)


def active_targets(api: httpx.Client) -> list[dict[str, Any]]:
    r = api.get("/api/v1/targets", params={"state": "active"})
    if r.status_code == 503:
        return []  # Prometheus answers 503 until it is ready (slow on a busy machine)
    targets: list[dict[str, Any]] = r.json()["data"]["activeTargets"]
    return targets


def up(api: httpx.Client, job: str) -> set[str]:
    return {
        t["labels"]["instance"]
        for t in active_targets(api)
        if t["labels"]["job"] == job and t["health"] == "up"
    }


def discovered(api: httpx.Client, job: str) -> set[str]:
    return {t["labels"]["instance"] for t in active_targets(api) if t["labels"]["job"] == job}


def test_prometheus_http_sd_and_dns_sd(tmp_path: Path) -> None:
    prometheus = require_tool("prometheus")
    with namespace() as (name, host, guest):
        node = NodeProcess(tmp_path)
        node.url = f"http://{host}:{node.api_port}"
        node.client = httpx.Client(base_url=node.url, timeout=10)
        node.config_path.write_text(
            f"""
[node]
name = "node-1"
data_dir = "{node.data_dir}"
[registry]
listen = "{host}:{node.api_port}"
allow_anonymous_writes = true
[dns]
listen = "{host}:53"
"""
        )
        backends = [Backend(n, host=host, body=f'ik_test{{b="{n}"}} 1\n'.encode()) for n in "ab"]
        prom_port = free_port()
        config = tmp_path / "prometheus.yml"
        config.write_text(
            f"""
global: {{scrape_interval: 1s, scrape_timeout: 900ms, evaluation_interval: 1m}}
scrape_configs:
  - job_name: http_sd
    http_sd_configs:
      - url: "http://{host}:{node.api_port}/v1/prometheus/targets?service=metrics"
        refresh_interval: 1s
  - job_name: dns_sd
    dns_sd_configs:
      - names: ["_metrics._tcp.ik.internal"]
        type: SRV
        refresh_interval: 1s
"""
        )
        log = (tmp_path / "prometheus.log").open("wb")
        proc = None
        try:
            node.start()
            for backend in backends:
                body = {
                    "Name": "metrics",
                    "ID": f"m-{backend.name}",
                    "Address": host,
                    "Port": backend.port,
                }
                assert node.client.put("/v1/agent/service/register", json=body).status_code == 200
            proc = subprocess.Popen(
                [
                    "ip", "netns", "exec", name, prometheus,
                    f"--config.file={config}",
                    f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                    f"--web.listen-address={guest}:{prom_port}",
                    "--log.level=info",
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
            )  # fmt: skip
            with httpx.Client(base_url=f"http://{guest}:{prom_port}", timeout=5) as api:
                both = {f"{host}:{b.port}" for b in backends}
                dns_both = {f"m-{b.name}.metrics.ik.internal:{b.port}" for b in backends}
                wait_for(lambda: up(api, "http_sd") == both, timeout=40)
                # dns_sd's targets are the SRV targets' names: each scrape resolved its A
                # record through interknit's DNS to reach the backend.
                wait_for(lambda: up(api, "dns_sd") == dns_both, timeout=40)
                labels = next(
                    t["discoveredLabels"]
                    for t in active_targets(api)
                    if t["labels"]["job"] == "http_sd"
                )
                assert labels["__meta_interknit_service"] == "metrics"
                assert labels["__meta_interknit_health"] == "passing"
                assert labels["__meta_interknit_id"] in ("m-a", "m-b")

                # Deregistered: gone from both discoveries.
                r = node.client.put("/v1/agent/service/deregister/m-b")
                assert r.status_code == 200
                wait_for(lambda: discovered(api, "http_sd") == {f"{host}:{backends[0].port}"}, 30)
                wait_for(
                    lambda: (
                        discovered(api, "dns_sd") == {f"m-a.metrics.ik.internal:{backends[0].port}"}
                    ),
                    30,
                )
        finally:
            if proc is not None:
                proc.terminate()
                try:
                    proc.wait(10)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(5)
            log.close()
            node.stop()
            for backend in backends:
                backend.close()
