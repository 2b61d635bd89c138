"""The registry API's two paths answer alike: a property test over requests, valid and not.

Two real nodes start empty and get the same requests in the same order: one on fresh
connections, where the fast path reads them (and answers them, or hands them to aiohttp as it
does any other request), the other on connections that already went to aiohttp (a first
request the fast path does not answer), where aiohttp's side reads everything. Their states
stay equal, so every answer must be equal too: status, JSON body and revision. A request
answered otherwise on one path, or a state that drifted, fails the test.

The inputs are a request line (the fast routes, their near misses and other endpoints),
names (labels, near labels, junk), header fields (framing, Expect, Upgrade, junk), bodies
(registrations valid and not, random JSON, random bytes) and now and then raw bytes. Each
connection ends with a request that closes it, so that every answer is read. The counts of
inputs tried are printed (with -s, or on failure).
"""

from __future__ import annotations

import json
import os
import signal
import socket
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from tests.nodeproc import NodeProcess

EXAMPLES = int(os.environ.get("INTERKNIT_FUZZ_EXAMPLES", "250"))
TO_AIOHTTP = b"GET /v1/services HTTP/1.1\r\nHost: x\r\n\r\n"
CLOSER = b"GET /v1/services HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"

Answer = tuple[int, str, str, Any]


class Pair:
    def __init__(self, a: NodeProcess, b: NodeProcess) -> None:
        self.fast = a
        self.aiohttp = b
        self.tried: Counter[str] = Counter()


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pair]:
    base = Path(tmp_path_factory.mktemp("paths"))
    a = NodeProcess(base, name="fast").start()
    b = NodeProcess(base, name="aiohttp").start()
    p = Pair(a, b)
    try:
        yield p
    finally:
        print(f"\nregistry API fuzz: {sum(p.tried.values())} inputs: {dict(p.tried)}")
        for node in (a, b):  # both drain at once
            if node.proc is not None:
                node.proc.send_signal(signal.SIGTERM)
        a.stop()
        b.stop()


def parse_answers(raw: bytes) -> list[Answer]:
    """The responses in ``raw`` (every API answer has a Content-Length); the body as JSON
    without ``output`` (a check's words, which depend on when it ran)."""
    out: list[Answer] = []
    while raw:
        end = raw.find(b"\r\n\r\n")
        if end < 0:
            break
        head = raw[:end].decode("latin-1").split("\r\n")
        fields = {k.lower(): v.strip() for k, _, v in (h.partition(":") for h in head[1:])}
        length = int(fields.get("content-length", "0"))
        body = raw[end + 4 : end + 4 + length]
        raw = raw[end + 4 + length :]
        try:
            parsed: Any = json.loads(body)
        except ValueError:
            parsed = body
        out.append(
            (
                int(head[0].split()[1]),
                fields.get("content-type", ""),
                fields.get("x-interknit-revision", ""),
                _without_output(parsed),
            )
        )
    return out


def _without_output(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _without_output(v) for k, v in value.items() if k != "output"}
    if isinstance(value, list):
        return [_without_output(v) for v in value]
    return value


def exchange(node: NodeProcess, data: bytes, timeout: float = 1.5) -> bytes:
    """Send ``data``, half-close, and read until the node closes: a client that half-closes is
    answered in full and then closed, whatever it sent. A connection left open fails."""
    with socket.create_connection(("127.0.0.1", node.api_port), timeout=timeout) as sock:
        chunks = []
        try:
            sock.sendall(data)
            sock.shutdown(socket.SHUT_WR)
            while chunk := sock.recv(65536):
                chunks.append(chunk)
        except (ConnectionResetError, BrokenPipeError):
            pass
        except TimeoutError:
            raise AssertionError(f"left open after {b''.join(chunks)!r}") from None
        return b"".join(chunks)


# ---------------------------------------------------------------------- inputs

LABELS = st.sampled_from(["web", "api", "a", "x-1", "Bad_Name", "", "a" * 64, "%41", "é"])
ROUTES = st.sampled_from(
    [
        ("PUT", "/v1/services/{s}/instances/{i}"),
        ("DELETE", "/v1/services/{s}/instances/{i}"),
        ("PUT", "/v1/services/{s}/instances/{i}/heartbeat"),
        ("GET", "/v1/services/{s}"),
        ("GET", "/v1/services/{s}/instances/{i}"),
        ("PUT", "/v1/services/{s}/instances/{i}/health"),
        ("POST", "/v1/services/{s}/instances/{i}"),
        ("GET", "/v1/services/{s}?healthy=1"),
        ("GET", "/v1/services/{s}?index=%C2%B2"),
        ("PATCH", "/v1/services/{s}"),
        ("GET", "/v1/services/{s}/"),
        ("GET", "/nope"),
    ]
)
FAST_ROUTES = {
    ("PUT", "/v1/services/{s}/instances/{i}"),
    ("DELETE", "/v1/services/{s}/instances/{i}"),
    ("PUT", "/v1/services/{s}/instances/{i}/heartbeat"),
    ("GET", "/v1/services/{s}"),
}
# Valid TTLs are long (a lease that ran out during the test would end at another moment on
# each node, and their states would differ by when, not by how they answered).
TTLS = st.sampled_from(["5m", "1h", "9ms", "0s", "abc", "\u0665s", "1ms", 10])
ADDRESSES = st.sampled_from(["10.0.0.1", "192.0.2.7", "::1", "host.example", "1.2.3", "", 7])
registration = st.fixed_dictionaries(
    {"address": ADDRESSES, "port": st.sampled_from([1, 80, 65535, 0, 70000, "80"])},
    optional={
        "tags": st.lists(LABELS, max_size=3),
        "weight": st.sampled_from([1, 1000, 0, 1001, 2.5]),
        "meta": st.dictionaries(st.sampled_from(["k", "v.1", "bad key"]), st.text(max_size=5)),
        "check": st.one_of(
            st.fixed_dictionaries({"ttl": TTLS}, optional={"deregister_after": TTLS}),
            st.fixed_dictionaries(
                {"http": st.sampled_from(["/health", "health", "/" + "x" * 1100])},
                optional={"interval": st.sampled_from(["1s", "2s", "500ms", "10ms"])},
            ),
            st.fixed_dictionaries({"tcp": st.sampled_from([True, False, "yes"])}),
            st.just({}),
        ),
        "zone": st.sampled_from(["z1", "Z1", None]),
        "bogus": st.just(1),
    },
)
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=8),
    lambda children: (
        st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=5), children)
    ),
    max_leaves=8,
)
BODIES = st.one_of(
    registration.map(lambda d: json.dumps(d).encode()),
    registration.map(lambda d: json.dumps(d).encode()),
    st.just(b'{"status": "draining"}'),
    json_values.map(lambda v: json.dumps(v).encode()),
    st.just(b"[" * 1000 + b"]" * 1000),
    st.binary(max_size=40),
    st.just(b""),
)
FIELDS = st.lists(
    st.sampled_from(
        [
            b"Expect: 100-continue\r\n",
            b"Content-Type: application/json\r\n",
            b"Authorization: Bearer nothing-here\r\n",
            b"X-Junk: \x01\r\n",
            b"Bad Field: x\r\n",
            b"Content-Length: 5\r\n",
            b"Transfer-Encoding: gzip, chunked\r\n",
            b"X-Ok: 1\r\n",
            b"X-Ok: 2\r\n",
            b"X-Ok: 3\r\n",
            b"X-Ok: 4\r\n",
            b"X-Ok: 5\r\n",
            b"Upgrade: foo\r\nConnection: upgrade\r\n",
        ]
    ),
    max_size=2,
)


@st.composite
def requests(draw: st.DrawFn) -> tuple[str, bytes]:
    if draw(st.integers(0, 9)) == 0:
        return "raw", draw(st.binary(min_size=1, max_size=60))
    method, template = draw(ROUTES)
    target = template.format(s=draw(LABELS), i=draw(LABELS))
    body = draw(BODIES) if method in ("PUT", "POST", "PATCH") else b""
    fields = b"".join(draw(FIELDS))
    framing = draw(st.sampled_from(["length", "length", "chunked", "none"]))
    if framing == "chunked" and b"Transfer-Encoding" not in fields:
        frame = b"Transfer-Encoding: chunked\r\n"
        payload = (b"%x\r\n%s\r\n" % (len(body), body) if body else b"") + b"0\r\n\r\n"
    elif framing == "none" or b"Content-Length" in fields:
        frame, payload = b"", body if b"Content-Length" in fields else b""
    else:
        frame, payload = b"Content-Length: %d\r\n" % len(body), body
    head = b"%s %s HTTP/1.1\r\nHost: x\r\n" % (method.encode(), target.encode())
    kind = "fast route" if (method, template) in FAST_ROUTES else "other"
    return f"{method} {kind}", head + fields + frame + b"\r\n" + payload


@settings(
    max_examples=EXAMPLES,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
    # Each input is two nodes' answers: shrinking takes minutes. A failure shows its bytes.
    phases=[Phase.explicit, Phase.reuse, Phase.generate],
)
@pytest.mark.timeout(600)
@given(batch=st.lists(requests(), min_size=1, max_size=3))
def test_both_paths_answer_alike(pair: Pair, batch: list[tuple[str, bytes]]) -> None:
    data = b"".join(raw for _, raw in batch) + CLOSER
    fast = parse_answers(exchange(pair.fast, data))
    handed = parse_answers(exchange(pair.aiohttp, TO_AIOHTTP + data))
    assert handed, "aiohttp's side did not answer its first request"
    handed = handed[1:]
    for kind, _ in batch:
        pair.tried[kind] += 1
    pair.tried[f"{len(fast)} answers"] += 1
    for status, *_ in fast:
        pair.tried[f"status {status}"] += 1
        assert status < 500, (data, fast)
    assert fast == handed, (data, fast, handed)
    # And the two nodes still hold the same: a write done on one path only shows here.
    states = [n.client.get("/v1/services").json() for n in (pair.fast, pair.aiohttp)]
    assert states[0] == states[1], (data, fast, states)
    for status, content_type, _, _ in fast:
        if status >= 200:  # (a 100 Continue has no body)
            assert content_type.startswith("application/json"), (data, fast)
