"""Health checks as an amplifier (issue 13, item 5): any API client could register instances
with a 10 ms check at any host and port. A floor on the interval that only the operator can
lower, and a registry API open to the network only with write tokens (or said so)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from interknit.config import ConfigError, parse_config
from tests.nodeproc import NodeProcess, free_port, running_node
from tests.registry.test_cli import run_up
from tests.registry.test_fastpath import connect, put, read_responses
from tests.tlscerts import TestCA


def body(interval: str, kind: dict[str, object] | None = None) -> bytes:
    check = {**(kind or {"http": "/health"}), "interval": interval}
    return json.dumps({"address": "10.0.0.1", "port": 9, "check": check}).encode()


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NodeProcess]:
    proc = NodeProcess(Path(tmp_path_factory.mktemp("bounds"))).start()
    try:
        yield proc
    finally:
        proc.stop()


@pytest.mark.parametrize("path", ["/v1/services/amp/instances/a", "/v1/services/amp/instances/a?x"])
@pytest.mark.parametrize("kind", [{"http": "/health"}, {"tcp": True}], ids=["http", "tcp"])
def test_the_api_refuses_a_check_more_often_than_a_second(
    node: NodeProcess, path: str, kind: dict[str, object]
) -> None:
    """On the fast path and on aiohttp's (a query string)."""
    for interval in ("10ms", "999ms"):
        with connect(node) as sock:
            sock.sendall(put(path, body(interval, kind)))
            ((status, _, answer),) = read_responses(sock, 1)
        assert status == 400
        error = json.loads(answer)["error"]
        assert error.startswith("check.interval: must be at least 1s"), error
    assert node.client.get("/v1/services/amp").status_code == 404
    with connect(node) as sock:
        sock.sendall(put(path, body("1s", kind)))
        ((status, _, _),) = read_responses(sock, 1)
    assert status == 200
    node.client.delete("/v1/services/amp/instances/a")


def test_the_consul_api_refuses_it_too(node: NodeProcess) -> None:
    r = node.client.put(
        "/v1/agent/service/register",
        json={"Name": "amp", "Port": 9, "Check": {"TCP": "127.0.0.1:9", "Interval": "10ms"}},
    )
    assert r.status_code == 400
    assert "Check.Interval: must be at least 1s" in r.text


def test_a_ttl_check_has_no_interval_to_refuse(node: NodeProcess) -> None:
    r = node.client.put(
        "/v1/services/ttl/instances/a",
        content=body("10ms", {"ttl": "10s"}),
    )
    assert r.status_code == 200
    node.client.delete("/v1/services/ttl/instances/a")


def test_the_operator_may_lower_the_floor_to_100ms(tmp_path: Path) -> None:
    with running_node(tmp_path, '[health]\nmin_interval = "100ms"\n') as lowered:
        ok = lowered.client.put("/v1/services/a/instances/a", content=body("100ms"))
        assert ok.status_code == 200
        low = lowered.client.put("/v1/services/a/instances/b", content=body("50ms"))
        assert low.status_code == 400
        assert "at least 100ms" in low.json()["error"]


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"health": {"min_interval": "50ms"}}, "health.min_interval:"),
        ({"health": {"min_interval": "5s"}}, "health.min_interval:"),
        ({"health": {"max_checks_per_second": 0}}, "health.max_checks_per_second:"),
        (
            {"services": [{"name": "a", "check": {"http": "/", "interval": "500ms"}}]},
            "services[0].check.interval: must be at least 1s",
        ),
        ({"registry": {"listen": "0.0.0.0:7470"}}, "registry.listen: 0.0.0.0:7470 is not"),
        ({"registry": {"listen": "[::]:7470"}}, "registry.listen:"),
        ({"registry": {"listen": "10.1.2.3:7470"}}, "registry.allow_anonymous_writes"),
        ({"registry": {"listen": "api.example:7470"}}, "registry.tokens.write"),
    ],
)
def test_config_errors_name_the_key(data: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError) as err:
        parse_config(data)
    assert message in str(err.value)


@pytest.mark.parametrize(
    "data",
    [
        {"health": {"min_interval": "100ms"}},
        {
            "health": {"min_interval": "100ms"},
            "services": [{"name": "a", "check": {"http": "/", "interval": "100ms"}}],
        },
        {"registry": {"listen": "127.0.0.2:7470"}},
        {"registry": {"listen": "localhost:7470"}},
        {"registry": {"listen": "[::1]:7470"}},
        {"registry": {"listen": "0.0.0.0:7470", "allow_anonymous_writes": True}},
        {"registry": {"listen": "0.0.0.0:7470", "tokens": {"write": ["a-long-token"]}}},
    ],
)
def test_what_the_operator_may_say(data: dict[str, object]) -> None:
    parse_config(data)


def test_an_open_api_that_requires_client_certificates_has_no_anonymous_writers(
    tmp_path: Path,
) -> None:
    ca = TestCA(tmp_path / "ca")
    api = ca.issue("api")
    tls: dict[str, object] = {"cert": str(api.cert), "key": str(api.key), "client_ca": str(ca.cert)}
    listen = "0.0.0.0:7470"
    parse_config({"registry": {"listen": listen, "tls": {**tls, "verify_client": "required"}}})
    with pytest.raises(ConfigError, match=r"registry\.listen"):
        parse_config({"registry": {"listen": listen, "tls": {**tls, "verify_client": "optional"}}})


def test_an_open_api_without_write_tokens_does_not_start(tmp_path: Path) -> None:
    res = run_up(tmp_path, f'[registry]\nlisten = "0.0.0.0:{free_port()}"\n')
    assert res.returncode == 2
    assert "registry.listen" in res.stderr and "allow_anonymous_writes" in res.stderr
