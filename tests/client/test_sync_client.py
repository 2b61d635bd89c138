"""The blocking Client: the same rules as AsyncClient, from plain threads."""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Callable

import pytest

from interknit.client import Client, DiscoveryUnavailable, NoInstances, Query
from tests.clock import ManualClock
from tests.nodeproc import NodeProcess


def eventually(predicate: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.02)


def test_sync_basics(node: NodeProcess) -> None:
    node.register("web", "a", port=9001).raise_for_status()
    node.register("web", "b", port=9002).raise_for_status()
    clock = ManualClock()  # cache ages; the node's leases run on real time
    with Client(node.url, cache_ttl=0.2, max_stale=1.0, refresh_wait=0.5, clock=clock) as client:
        lookup = client.instances("web")
        assert sorted(i.id for i in lookup) == ["a", "b"] and not lookup.stale
        counts = Counter(client.pick("web").id for _ in range(10))
        assert counts == {"a": 5, "b": 5}
        with pytest.raises(NoInstances):
            client.pick("nothing-here")

        # Many threads at once.
        results: list[str] = []

        def worker() -> None:
            for _ in range(20):
                results.append(client.pick("web", key="k", balance="ring_hash").id)

        threads = [threading.Thread(target=worker) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert len(results) == 80 and len(set(results)) == 1

        with client.register("me", "m1", address="127.0.0.1", port=1234, ttl="1s") as reg:
            started = time.monotonic()
            eventually(lambda: reg.heartbeats >= 4, timeout=20)  # more than a TTL of them
            assert time.monotonic() - started > 1.0
            assert node.client.get("/v1/services/me/instances/m1").json()["health"] == "passing"
        assert node.client.get("/v1/services/me/instances/m1").status_code == 404

        stream = client.watch("web")
        first = next(stream)
        assert sorted(i.id for i in first) == ["a", "b"]
        node.client.delete("/v1/services/web/instances/b")
        assert [i.id for i in next(stream)] == ["a"]
        stream.close()

        node.kill9()
        eventually(lambda: not any(e.live for e in [client.aio.cache.entry(Query("web"))] if e))
        clock.advance(0.3)
        stale = client.instances("web")
        assert stale.stale and [i.id for i in stale] == ["a"]
        clock.advance(1.0)
        with pytest.raises(DiscoveryUnavailable):
            client.instances("web")
    with pytest.raises(RuntimeError):
        client.instances("web")
