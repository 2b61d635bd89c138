"""TLS keys in interknit.toml: each unusable file is one sentence naming its full key path."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from interknit.config import ConfigError, parse_config
from tests.tlscerts import TestCA


@pytest.fixture(scope="module")
def ca(tmp_path_factory: pytest.TempPathFactory) -> TestCA:
    return TestCA(tmp_path_factory.mktemp("tls-config"))


def listener(tls: Any = None, *routes: dict[str, Any], protocol: str = "http") -> dict[str, Any]:
    out: dict[str, Any] = {
        "name": "web",
        "listen": "127.0.0.1:0",
        "protocol": protocol,
        "routes": list(routes) or [{"servers": ["127.0.0.1:1"]}],
    }
    if tls is not None:
        out["tls"] = tls
    return {"listeners": [out]}


def error(data: dict[str, Any]) -> str:
    with pytest.raises(ConfigError) as info:
        parse_config(data)
    message = str(info.value)
    assert "\n" not in message
    return message


def test_server_certificate_files(ca: TestCA, tmp_path: Path) -> None:
    web = ca.issue("web", dns=("web.example.com",))
    other = ca.issue("other", dns=("other.example.com",))
    later = ca.issue("later", start="20991231000000Z", end="21000101000000Z")
    expired = ca.issue("old", start="20200101000000Z", end="20200102000000Z")
    encrypted = tmp_path / "enc.key"
    ca.run("pkey", "-in", str(web.key), "-aes256", "-passout", "pass:x", "-out", str(encrypted))
    ok = {"cert": str(web.cert), "key": str(web.key)}
    parse_config(listener(ok))
    cases: list[tuple[dict[str, Any], str]] = [
        ({**ok, "key": str(other.key)}, "listeners[0].tls.key: "),
        ({**ok, "cert": str(tmp_path / "nope.pem")}, "listeners[0].tls.cert: cannot read"),
        ({**ok, "key": str(tmp_path)}, "listeners[0].tls.key: cannot read"),
        ({"cert": str(expired.cert), "key": str(expired.key)}, "expired on 2020-01-02"),
        ({"cert": str(later.cert), "key": str(later.key)}, "is not valid before 2099-12-31"),
        ({**ok, "key": str(encrypted)}, f"listeners[0].tls.key: {encrypted} is encrypted"),
        ({**ok, "cert": str(web.key)}, "holds no PEM certificate"),
        ({"cert": str(web.cert)}, "listeners[0].tls.key: a certificate and its key are required"),
        ({"certs": [ok, {"cert": str(web.cert), "key": str(other.key)}]},
         "listeners[0].tls.certs[1].key: "),
        ({**ok, "certs": [ok]}, "not both"),
        ({**ok, "client_ca": str(ca.cert)}, "verify_client"),
        ({**ok, "client_ca": str(web.key), "verify_client": "required"},
         "listeners[0].tls.client_ca: "),
        ({**ok, "min_version": "1.1"}, "listeners[0].tls.min_version"),
        ({**ok, "ciphers": "NOPE"}, "listeners[0].tls.ciphers: OpenSSL knows none"),
        ({"certs": [{**ok, "names": ["bad name"]}]}, "names: 'bad name' is not a host name"),
    ]  # fmt: skip
    for tls, words in cases:
        assert words in error(listener(tls)), (tls, words)


def test_ocsp_file_is_checked_against_its_certificate(ca: TestCA, tmp_path: Path) -> None:
    web = ca.issue("web", dns=("web.example.com",))
    other = ca.issue("other", dns=("other.example.com",))
    response = ca.ocsp(web.cert, tmp_path / "web.ocsp")
    revoked = ca.issue("revoked", dns=("r.example.com",))
    revoked_response = ca.ocsp(revoked.cert, tmp_path / "revoked.ocsp", revoke=True)
    parse_config(listener({"cert": str(web.cert), "key": str(web.key), "ocsp": str(response)}))
    wrong = {"cert": str(other.cert), "key": str(other.key), "ocsp": str(response)}
    assert "listeners[0].tls.ocsp: " in error(listener(wrong))
    assert "answers for another certificate" in error(listener(wrong))
    bad = {"cert": str(revoked.cert), "key": str(revoked.key), "ocsp": str(revoked_response)}
    assert "says the certificate is revoked" in error(listener(bad))
    junk = {"cert": str(web.cert), "key": str(web.key), "ocsp": str(web.cert)}
    assert "is not a DER OCSP response" in error(listener(junk))


def test_client_tls_and_route_keys(ca: TestCA, tmp_path: Path) -> None:
    client = ca.issue("client", ips=(), usage="clientAuth")
    route = {"servers": ["127.0.0.1:1"], "upstream_tls": {"ca": str(tmp_path / "x.pem")}}
    assert error(listener(None, route)).startswith("listeners[0].routes[0].upstream_tls.ca: ")
    route = {"servers": ["127.0.0.1:1"], "upstream_tls": {"cert": str(client.cert)}}
    assert "go together" in error(listener(None, route))
    good = {"ca": str(ca.cert), "cert": str(client.cert), "key": str(client.key), "sni": "b.ex"}
    parse_config(listener(None, {"servers": ["127.0.0.1:1"], "upstream_tls": good}))
    service = {"name": "s", "upstream_tls": {"ca": str(tmp_path / "x.pem")}}
    assert error({"services": [service]}).startswith("services[0].upstream_tls.ca: cannot read")
    api = {"tls": {"cert": str(client.cert)}}
    assert error({"registry": api}).startswith("registry.tls.key: ")
    # Routes: a redirect names nothing to send to; sni is for tcp listeners.
    parse_config(listener(None, {"redirect_https": True, "hsts": {"max_age": 60}}))
    both = {"redirect_https": True, "servers": ["127.0.0.1:1"]}
    assert "redirect_https" in error(listener(None, both))
    sni = {"match": {"sni": "a.example.com"}, "servers": ["127.0.0.1:1"]}
    assert "match.sni: only tcp listeners" in error(listener(None, sni))
    parse_config(listener(None, sni, {"servers": ["127.0.0.1:2"]}, protocol="tcp"))
    host = {"match": {"host": "a"}, "servers": ["127.0.0.1:1"]}
    assert "a tcp route matches only by sni" in error(listener(None, host, protocol="tcp"))
    spec = (
        parse_config(
            listener(None, {"servers": ["127.0.0.1:1"], "hsts": {"include_subdomains": True}})
        )
        .listeners[0]
        .to_spec()
    )
    assert spec.routes[0].hsts == "max-age=31536000; includeSubDomains"
