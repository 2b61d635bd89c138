"""testssl.sh (Debian's package) against a terminating listener: no HIGH or CRITICAL finding.

A focused set of checks, so that the run fits the suite (about 35 s on a busy machine; the
full run takes about 100 s, and its only findings beyond these are about the test
certificate, see docs/tls.md): protocols (-p), cipher categories (-s), server preference
(-P), server defaults: certificate, tickets, resumption, OCSP stapling (-S), HTTP headers:
HSTS (-h), and the vulnerabilities that apply to TLS 1.2/1.3 with AEAD suites: Heartbleed
(-H), CCS injection (-I), renegotiation (-R), CRIME (-C), POODLE (-O), fallback SCSV (-Z),
SWEET32 (-W), RC4 (-4).
"""

from __future__ import annotations

import asyncio
import json
import subprocess
from pathlib import Path
from typing import Any

from interknit.proxy import RouteSpec
from interknit.tls.server import CertSpec, ServerTlsSpec
from tests.conftest import require_tool
from tests.proxy.conftest import ProxyFactory
from tests.tlscerts import TestCA

CHECKS = ("-p", "-s", "-P", "-S", "-h", "-H", "-I", "-R", "-C", "-O", "-Z", "-W", "-4")


async def test_testssl_finds_nothing_high_or_critical(
    backends: Any, proxy: ProxyFactory, tmp_path: Path
) -> None:
    testssl = require_tool("testssl")
    ca = TestCA(tmp_path / "ca")
    # A leaf as a public CA issues it (90 days, revocation URLs), so that what is rated is
    # the listener and not a test certificate's shortcuts.
    leaf = ca.issue("localhost", dns=("localhost",), days=90, revocation_urls=True)
    ocsp = ca.ocsp(leaf.cert, tmp_path / "leaf.ocsp")
    b = await backends("a")
    listener = await proxy(
        RouteSpec(servers=(b.server,), hsts="max-age=31536000"),
        tls=ServerTlsSpec(certs=(CertSpec(str(leaf.cert), str(leaf.key), ocsp=str(ocsp)),)),
    )
    report = tmp_path / "testssl.json"
    proc = await asyncio.create_subprocess_exec(
        testssl, "--quiet", "--color", "0", "--warnings", "off", "--add-ca", str(ca.cert),
        "--jsonfile", str(report), *CHECKS, f"localhost:{listener.port}",
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
    )  # fmt: skip
    out, _ = await asyncio.wait_for(proc.communicate(), 240)
    findings = {f["id"]: f for f in json.loads(report.read_text())}
    bad = [f"{f['id']}: {f['finding']}" for f in findings.values()
           if f["severity"] in ("HIGH", "CRITICAL")]  # fmt: skip
    assert bad == [], out.decode(errors="replace")
    expected = {
        "SSLv3": "not offered",
        "TLS1": "not offered",
        "TLS1_1": "not offered",
        "TLS1_2": "offered",
        "TLS1_3": "offered",
        "cipher_order": "server",
        "cert_chain_of_trust": "passed",
        "OCSP_stapling": "offered",
        "HSTS_time": "365 days",
        "secure_client_renego": "not vulnerable",
        "heartbleed": "not vulnerable",
    }
    for key, words in expected.items():
        assert words in findings[key]["finding"], (key, findings[key])
