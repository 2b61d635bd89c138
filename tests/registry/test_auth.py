"""Bearer tokens on the API."""

from __future__ import annotations

import json
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.nodeproc import NodeProcess

READ = "read-token-123"
WRITE = "write-token-456"
BODY = {"address": "127.0.0.1", "port": 80}


@pytest.fixture
def secured(tmp_path: Path) -> Iterator[NodeProcess]:
    tokens = f'tokens = {{ read = ["{READ}"], write = ["{WRITE}"] }}'
    node = NodeProcess(tmp_path, registry_config=tokens).start()
    try:
        yield node
    finally:
        node.stop()


def auth(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def test_writes_need_a_write_token(secured: NodeProcess) -> None:
    url = "/v1/services/web/instances/a"
    r = secured.client.put(url, json=BODY)
    assert r.status_code == 401 and "write token" in r.json()["error"]
    r = secured.client.put(url, json=BODY, headers=auth("wrong-token-000"))
    assert r.status_code == 401
    r = secured.client.put(url, json=BODY, headers=auth(READ))
    assert r.status_code == 403
    assert secured.client.get("/v1/services", headers=auth(READ)).json()["revision"] == 0
    r = secured.client.put(url, json=BODY, headers=auth(WRITE))
    assert r.status_code == 200
    r = secured.client.delete(url, headers=auth(READ))
    assert r.status_code == 403


def test_reads_need_a_token_when_read_tokens_are_set(secured: NodeProcess) -> None:
    assert secured.client.get("/v1/services").status_code == 401
    assert secured.client.get("/v1/services", headers=auth(READ)).status_code == 200
    assert secured.client.get("/v1/services", headers=auth(WRITE)).status_code == 200
    # Health stays open so that load balancers in front can probe the node.
    assert secured.client.get("/v1/health").status_code == 200


def test_cli_passes_the_token(secured: NodeProcess) -> None:
    res = secured.cli("register", "web", "a", "--address", "127.0.0.1", "--port", "80")
    assert res.returncode == 1
    assert "write token" in res.stderr
    res = secured.cli(
        "register",
        "web",
        "a",
        "--address",
        "127.0.0.1",
        "--port",
        "80",
        env={"INTERKNIT_TOKEN": WRITE},
    )
    assert res.returncode == 0, res.stderr


def test_no_tokens_means_open(tmp_path: Path) -> None:
    node = NodeProcess(tmp_path).start()
    try:
        assert node.register("web", "a").status_code == 200
    finally:
        node.stop()


def test_the_fast_path_reads_the_authorization_header_as_aiohttp_does(
    secured: NodeProcess,
) -> None:
    # Registrations are answered by the API's fast path, which reads the header from the raw
    # head; a query string sends the same request through aiohttp. Both must decide alike.
    body = json.dumps(BODY).encode()
    heads = [
        b"Authorization: Bearer " + WRITE.encode() + b"\r\n",
        b"authorization:Bearer " + WRITE.encode() + b"  \r\n",
        b"AUTHORIZATION: Bearer " + READ.encode() + b"\r\n",
        b"Authorization: Bearer " + WRITE.encode() + b"\r\nAuthorization: Bearer x\r\n",
        b"Authorization: Bearer x\r\nAuthorization: Bearer " + WRITE.encode() + b"\r\n",
        b"X-Authorization: Bearer " + WRITE.encode() + b"\r\n",
        b"X-Note: Authorization: Bearer " + WRITE.encode() + b"\r\n",
    ]

    def status(path: bytes, head: bytes) -> int:
        with socket.create_connection(("127.0.0.1", secured.api_port), timeout=10) as sock:
            sock.sendall(
                b"PUT %s HTTP/1.1\r\nHost: x\r\n%sContent-Length: %d\r\n\r\n%s"
                % (path, head, len(body), body)
            )
            return int(sock.recv(65536).split(b" ", 2)[1])

    seen = []
    for n, head in enumerate(heads):
        fast = status(b"/v1/services/web/instances/f%d" % n, head)
        slow = status(b"/v1/services/web/instances/s%d?via=aiohttp" % n, head)
        assert fast == slow, head
        seen.append(fast)
    assert seen == [200, 200, 403, 200, 401, 401, 401]
