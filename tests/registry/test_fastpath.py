"""The API's fast path over raw sockets: what it answers itself, what it hands to aiohttp, and
that a connection keeps its order and framing across the handover."""

from __future__ import annotations

import json
import socket
import time

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.nodeproc import NodeProcess

BODY = json.dumps({"address": "10.0.0.1", "port": 8080}).encode()


def put(path: str, body: bytes = BODY, extra: bytes = b"") -> bytes:
    return (
        b"PUT %s HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"%sContent-Length: %d\r\n\r\n%s"
        % (
            path.encode(),
            extra,
            len(body),
            body,
        )
    )


def get(path: str) -> bytes:
    return b"GET %s HTTP/1.1\r\nHost: x\r\n\r\n" % path.encode()


def read_responses(
    sock: socket.socket, count: int, timeout: float = 10.0
) -> list[tuple[int, dict[str, str], bytes]]:
    """``count`` responses framed by Content-Length (what both servers send here)."""
    sock.settimeout(timeout)
    buf = b""
    out: list[tuple[int, dict[str, str], bytes]] = []
    while len(out) < count:
        end = buf.find(b"\r\n\r\n")
        if end >= 0:
            head = buf[:end].decode("latin-1").split("\r\n")
            headers = {k.lower(): v.strip() for k, _, v in (h.partition(":") for h in head[1:])}
            length = int(headers.get("content-length", "0"))
            if len(buf) >= end + 4 + length:
                out.append((int(head[0].split()[1]), headers, buf[end + 4 : end + 4 + length]))
                buf = buf[end + 4 + length :]
                continue
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError(f"closed after {len(out)} responses: {buf[:200]!r}")
        buf += chunk
    return out


def connect(node: NodeProcess) -> socket.socket:
    return socket.create_connection(("127.0.0.1", node.api_port), timeout=10)


def test_pipelined_writes_are_answered_in_order_with_growing_revisions(node: NodeProcess) -> None:
    with connect(node) as sock:
        sock.sendall(b"".join(put(f"/v1/services/api/instances/i{n}") for n in range(5)))
        answers = read_responses(sock, 5)
    assert [status for status, _, _ in answers] == [200] * 5
    ids = [json.loads(body)["id"] for _, _, body in answers]
    revisions = [int(headers["x-interknit-revision"]) for _, headers, _ in answers]
    assert ids == [f"i{n}" for n in range(5)]
    assert revisions == sorted(revisions) and len(set(revisions)) == 5
    # As aiohttp answers JSON; RFC 8259 defines no charset parameter for it.
    assert all(h["content-type"] == "application/json" for _, h, _ in answers)
    assert all("date" in h for _, h, _ in answers)


def test_a_connection_handed_to_aiohttp_mid_pipeline_keeps_order(node: NodeProcess) -> None:
    with connect(node) as sock:
        sock.sendall(
            put("/v1/services/api/instances/a")
            + get("/v1/services")  # not a fast route: aiohttp from here on
            + put("/v1/services/api/instances/b")
            + get("/v1/services/api")
        )
        answers = read_responses(sock, 4)
    assert [status for status, _, _ in answers] == [200, 200, 200, 200]
    assert json.loads(answers[0][2])["id"] == "a"
    assert "api" in json.loads(answers[1][2])["services"]
    assert json.loads(answers[2][2])["id"] == "b"
    assert {i["id"] for i in json.loads(answers[3][2])["instances"]} == {"a", "b"}
    # aiohttp's answers carry its Server header; the fast path's do not.
    assert "server" not in answers[0][1] and "server" in answers[1][1]


def test_a_request_split_into_single_bytes_is_answered(node: NodeProcess) -> None:
    with connect(node) as sock:
        for byte in put("/v1/services/api/instances/slow"):
            sock.send(bytes([byte]))
        ((status, _, body),) = read_responses(sock, 1)
    assert status == 200 and json.loads(body)["id"] == "slow"


def test_chunked_large_and_malformed_requests_get_aiohttps_answers(node: NodeProcess) -> None:
    chunked = (
        b"PUT /v1/services/api/instances/c HTTP/1.1\r\nHost: x\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n"
        b"%x\r\n%s\r\n0\r\n\r\n" % (len(BODY), BODY)
    )
    with connect(node) as sock:
        sock.sendall(put("/v1/services/api/instances/first") + chunked)
        answers = read_responses(sock, 2)
    assert [a[0] for a in answers] == [200, 200]
    assert node.client.get("/v1/services/api/instances/c").status_code == 200

    big = json.dumps({"address": "10.0.0.1", "port": 1, "meta": {"k": "x" * 70_000}}).encode()
    with connect(node) as sock:
        sock.sendall(put("/v1/services/api/instances/big", big))
        ((status, _, body),) = read_responses(sock, 1)
    assert status == 413 and "64 KiB" in json.loads(body)["error"]

    with connect(node) as sock:
        sock.sendall(
            put("/v1/services/api/instances/d")
            + b"PUT /v1/services/api/instances/e HTTP/1.1\r\nContent-Length: x\r\n\r\n"
        )
        answers = read_responses(sock, 2)
    assert [a[0] for a in answers] == [200, 400]
    assert node.client.get("/v1/services/api/instances/e").status_code == 404


def test_bad_names_bodies_and_unknown_instances_answer_like_the_api(node: NodeProcess) -> None:
    with connect(node) as sock:
        sock.sendall(
            put("/v1/services/Bad_Name/instances/a")
            + put("/v1/services/api/instances/a", b'{"address": "10.0.0.1", "port": 0}')
            + put("/v1/services/api/instances/a", b"{nope")
            + put("/v1/services/api/instances/ghost/heartbeat", b"")
            + b"DELETE /v1/services/api/instances/ghost HTTP/1.1\r\nHost: x\r\n\r\n"
        )
        answers = read_responses(sock, 5)
    statuses = [a[0] for a in answers]
    errors = [json.loads(a[2])["error"] for a in answers]
    assert statuses == [400, 400, 400, 404, 404]
    assert errors[0].startswith("service:") and errors[1].startswith("port:")
    assert "malformed JSON" in errors[2]
    assert node.client.get("/v1/services").json()["services"] == {}


def test_an_empty_name_is_no_route_as_in_aiohttp(node: NodeProcess) -> None:
    with connect(node) as sock:
        sock.sendall(get("/v1/services/") + put("/v1/services/api/instances/"))
        answers = read_responses(sock, 2)
    assert [a[0] for a in answers] == [404, 404]
    assert "no such endpoint" in json.loads(answers[0][2])["error"]


def test_connection_close_and_http10_close_after_the_answer(node: NodeProcess) -> None:
    with connect(node) as sock:
        sock.sendall(put("/v1/services/api/instances/a", extra=b"Connection: close\r\n"))
        ((status, headers, _),) = read_responses(sock, 1)
        assert status == 200 and headers["connection"] == "close"
        assert sock.recv(1) == b""
    with connect(node) as sock:
        sock.sendall(get("/v1/services/api").replace(b"HTTP/1.1", b"HTTP/1.0"))
        ((status, _, _),) = read_responses(sock, 1)
        assert status == 200 and sock.recv(1) == b""


def test_fast_requests_are_counted_in_metrics(node: NodeProcess) -> None:
    with connect(node) as sock:
        sock.sendall(put("/v1/services/api/instances/a") + get("/v1/services/nope"))
        read_responses(sock, 2)
    text = node.client.get("/metrics").text
    instance, lookup = "/v1/services/{service}/instances/{id}", "/v1/services/{service}"
    assert f'requests_total{{code="200",endpoint="{instance}",method="PUT"}} 1.0' in text
    assert f'requests_total{{code="404",endpoint="{lookup}",method="GET"}} 1.0' in text
    assert (
        'interknit_http_request_duration_seconds_count{endpoint="/v1/services/{service}/instances/{id}"}'
        in text
    )


def test_a_write_is_durable_before_the_fast_path_answers_it(node: NodeProcess) -> None:
    with connect(node) as sock:
        sock.sendall(b"".join(put(f"/v1/services/api/instances/k{n}") for n in range(20)))
        read_responses(sock, 20)
    node.kill9()
    node.start()
    listed = node.client.get("/v1/services/api").json()["instances"]
    assert {i["id"] for i in listed} == {f"k{n}" for n in range(20)}


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    prefix=st.sampled_from([b"", put("/v1/services/api/instances/f")]),
    junk=st.binary(max_size=300)
    | st.sampled_from(
        [
            b"PUT /v1/services/api/instances/x HTTP/1.1\nContent-Length: 2\n\n{}",
            b"PUT /v1/services/api/instances/x HTTP/1.1\r\nContent-Length: 5\r\n"
            b"Content-Length: 6\r\n\r\n",
            b"GET /v1/services/api HTTP/9.9\r\n\r\n",
            b"\r\n\r\nGET /v1/services/api HTTP/1.1\r\n\r\n",
        ]
    ),
)
def test_garbage_never_breaks_the_node(node: NodeProcess, prefix: bytes, junk: bytes) -> None:
    with connect(node) as sock:
        sock.settimeout(2)
        sock.sendall(prefix + junk)
        sock.shutdown(socket.SHUT_WR)
        deadline = time.monotonic() + 2
        while time.monotonic() < deadline:
            try:
                if not sock.recv(65536):
                    break
            except (TimeoutError, ConnectionResetError):
                break
    assert node.client.get("/v1/health").status_code == 200


def test_framing_fields_are_found_in_any_case_and_only_as_field_names(node: NodeProcess) -> None:
    # aiohttp names itself in a Server header; the fast path does not.
    chunked = (
        b"PUT /v1/services/api/instances/lc HTTP/1.1\r\nHost: x\r\n"
        b"transfer-encoding: chunked\r\n\r\n%x\r\n%s\r\n0\r\n\r\n" % (len(BODY), BODY)
    )
    mention = put("/v1/services/api/instances/m", extra=b"X-Note: Transfer-Encoding: chunked\r\n")
    length = (
        b"PUT /v1/services/api/instances/l HTTP/1.1\r\nHost: x\r\ncontent-length: %d\r\n\r\n%s"
        % (
            len(BODY),
            BODY,
        )
    )
    for request, by_aiohttp in ((chunked, True), (mention, False), (length, False)):
        with connect(node) as sock:
            sock.sendall(request)
            ((status, headers, _),) = read_responses(sock, 1)
        assert status == 200, request
        assert ("server" in headers) == by_aiohttp, request
    ids = {i["id"] for i in node.client.get("/v1/services/api").json()["instances"]}
    assert {"lc", "m", "l"} <= ids
