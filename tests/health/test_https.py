"""HTTP checks over https: a service's upstream_tls (its CA, the name to verify, a client
certificate) applies to its health checks too."""

from __future__ import annotations

import ssl
from pathlib import Path

import pytest

from interknit.health.probes import http_probe
from interknit.tls.client import ClientTls, ClientTlsSpec
from tests.backends import Backend
from tests.tlscerts import TestCA


@pytest.fixture(scope="module")
def ca(tmp_path_factory: pytest.TempPathFactory) -> TestCA:
    return TestCA(tmp_path_factory.mktemp("health-tls"))


async def test_https_checks_verify_the_certificate(ca: TestCA, tmp_path: Path) -> None:
    leaf = ca.issue("backend", dns=("backend.example.com",))
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(str(leaf.cert), str(leaf.key))
    backend = Backend("b", tls=ctx)
    try:
        good = ClientTls(ClientTlsSpec(ca=str(ca.cert), sni="backend.example.com"))
        result = await http_probe("127.0.0.1", backend.port, "/health", 5, tls=good)
        assert result.status == "passing", result.output
        assert result.output.startswith(f"HTTP GET https://127.0.0.1:{backend.port}/health: 200")
        wrong_name = ClientTls(ClientTlsSpec(ca=str(ca.cert), sni="other.example.com"))
        result = await http_probe("127.0.0.1", backend.port, "/health", 5, tls=wrong_name)
        assert result.status == "critical"
        assert "TLS handshake failed: Hostname mismatch" in result.output, result.output
        other = TestCA(tmp_path / "other", name="other-ca")
        untrusting = ClientTls(ClientTlsSpec(ca=str(other.cert), sni="backend.example.com"))
        result = await http_probe("127.0.0.1", backend.port, "/health", 5, tls=untrusting)
        assert result.status == "critical"
        assert "TLS handshake failed: unable to get local issuer" in result.output, result.output
        lax = ClientTls(ClientTlsSpec(verify=False))
        result = await http_probe("127.0.0.1", backend.port, "/health", 5, tls=lax)
        assert result.status == "passing", result.output
        # Plaintext to an https backend is no pass.
        result = await http_probe("127.0.0.1", backend.port, "/health", 2)
        assert result.status == "critical"
    finally:
        backend.close()
