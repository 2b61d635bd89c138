"""The node's garbage collector: settled after startup, and visible in the metrics."""

from __future__ import annotations

import json
import re
import socket
from pathlib import Path

from tests.nodeproc import NodeProcess


def young_collections(node: NodeProcess) -> int:
    text = node.client.get("/metrics").text
    found = re.search(r'^python_gc_collections_total\{generation="0"\} (\S+)$', text, re.M)
    assert found is not None, "no python_gc_collections_total in /metrics"
    return int(float(found.group(1)))


def test_registrations_wake_the_collector_rarely(tmp_path: Path) -> None:
    # Each registration leaves a handful of new objects behind (the instance, its spec, an
    # event, lease entries); with CPython's default of a young collection every 700 of them,
    # 3,000 registrations ran 15 (and the status page and metrics requests a few more).
    node = NodeProcess(tmp_path).start()
    try:
        assert "process_resident_memory_bytes" in node.client.get("/metrics").text
        before = young_collections(node)
        body = json.dumps({"address": "10.0.0.1", "port": 80}).encode()
        with socket.create_connection(("127.0.0.1", node.api_port), timeout=10) as sock:
            for batch in range(30):
                sock.sendall(
                    b"".join(
                        b"PUT /v1/services/gc/instances/i%d HTTP/1.1\r\nHost: x\r\n"
                        b"Content-Length: %d\r\n\r\n%s" % (batch * 100 + n, len(body), body)
                        for n in range(100)
                    )
                )
                got = b""
                while got.count(b"HTTP/1.1 200") < 100:
                    chunk = sock.recv(1 << 20)
                    assert chunk, got[-300:]
                    got += chunk
        assert len(node.client.get("/v1/services/gc").json()["instances"]) == 3000
        assert young_collections(node) - before < 8
    finally:
        node.stop()
