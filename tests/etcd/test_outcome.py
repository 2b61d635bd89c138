"""A write etcd did not confirm (issue 13, item 9): after a leader kill, 18 of 39 writes
answered 503 "nothing changed" were in etcd afterwards.

The node talks to etcd through a relay here that can hold etcd's answers back: the
transaction reaches etcd and is applied, and its answer does not come back in time. That is
the write whose outcome the node cannot know when it answers; a leader killed between commit
and answer makes the same, by chance."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest

from interknit.registry.model import Check, InstanceSpec
from interknit.registry.registry import OutcomeUnknown, Unavailable
from tests.etcd.cluster import EtcdCluster
from tests.etcd.conftest import MakeRegistry
from tests.etcd.helpers import eventually, ids
from tests.nodeproc import NodeProcess

PLAIN = InstanceSpec(address="10.0.0.1", port=80)
_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
_RST_STREAM = 0x3


class Relay:
    """A TCP relay to one etcd member. While ``holding``, what etcd sends is kept back;
    ``release()`` sends it on. With ``until_cancel``, it is sent on by itself when the client
    cancels a call (an HTTP/2 RST_STREAM frame: gRPC's deadline passed)."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.holding = False
        self.until_cancel = False
        self.held: list[tuple[asyncio.StreamWriter, bytes]] = []
        self.server: asyncio.Server | None = None
        self.tasks: set[asyncio.Task[None]] = set()

    @property
    def url(self) -> str:
        assert self.server is not None
        return f"http://127.0.0.1:{self.server.sockets[0].getsockname()[1]}"

    async def start(self) -> Relay:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        return self

    def release(self) -> None:
        self.holding = False
        held, self.held = self.held, []
        for writer, data in held:
            if not writer.is_closing():
                writer.write(data)

    async def _serve(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        etcd_r, etcd_w = await asyncio.open_connection("127.0.0.1", self.target_port)

        async def up() -> None:  # client -> etcd, read as HTTP/2 frames on the way
            seen = b""
            preface = True
            while data := await client_r.read(65536):
                etcd_w.write(data)
                seen += data
                if preface:
                    if len(seen) < len(_PREFACE):
                        continue
                    seen, preface = seen[len(_PREFACE) :], False
                while len(seen) >= 9:
                    length = int.from_bytes(seen[:3])
                    if len(seen) < 9 + length:
                        break
                    if seen[3] == _RST_STREAM and self.holding and self.until_cancel:
                        self.release()
                    seen = seen[9 + length :]
            etcd_w.close()

        async def down() -> None:  # etcd -> client
            while data := await etcd_r.read(65536):
                if self.holding:
                    self.held.append((client_w, data))
                else:
                    client_w.write(data)
            client_w.close()

        for coro in (up(), down()):
            task = asyncio.create_task(coro)
            self.tasks.add(task)
            task.add_done_callback(self.tasks.discard)

    async def stop(self) -> None:
        if self.server is not None:
            self.server.close()
        for task in list(self.tasks):
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)


@pytest.fixture
async def relay(own_etcd: EtcdCluster) -> AsyncIterator[Relay]:
    port = int(own_etcd.endpoints[0].rsplit(":", 1)[1])
    relay = await Relay(port).start()
    try:
        yield relay
    finally:
        await relay.stop()


async def test_an_unconfirmed_write_says_its_outcome_is_unknown_and_a_retry_converges(
    own_etcd: EtcdCluster, relay: Relay, make_registry: MakeRegistry
) -> None:
    registry = await make_registry(own_etcd, "a", endpoints=[relay.url], request_timeout=0.5)
    await registry.register("web", "before", PLAIN)
    relay.holding = True
    with pytest.raises(Unavailable) as info:
        await registry.register("web", "x", PLAIN)
    assert isinstance(info.value, OutcomeUnknown)
    assert info.value.status == 503 and info.value.outcome == "unknown"
    assert "may have been applied" in info.value.message
    relay.release()
    # etcd had applied it: the write was not "nothing changed".
    await eventually(lambda: "x" in ids(registry), timeout=15)
    created = registry.state.get("web", "x")
    assert created is not None
    revision = registry.state.revision
    # The same registration again is done, and changes nothing.
    inst, _ = await registry.register("web", "x", PLAIN)
    assert inst.create_revision == created.create_revision
    assert registry.state.revision == revision


async def test_an_unconfirmed_ttl_registration_keeps_its_lease(
    own_etcd: EtcdCluster, relay: Relay, make_registry: MakeRegistry
) -> None:
    """The TTL lease granted for the write was revoked when the write failed; applied after
    all, the instance lost its TTL key with the lease and turned critical at once."""
    registry = await make_registry(own_etcd, "a", endpoints=[relay.url], request_timeout=0.5)
    await registry.register("web", "warmup", PLAIN)
    ttl = InstanceSpec(address="10.0.0.1", port=80, check=Check(ttl=30.0))
    # The lease grant goes through; the transaction's answer is held back.
    await registry._grant(30)  # the lease RPC path is warm
    original_grant = registry._grant

    async def grant_then_hold(seconds: int) -> int:
        lease = await original_grant(seconds)
        relay.holding = True
        return lease

    registry._grant = grant_then_hold  # type: ignore[method-assign]
    with pytest.raises(OutcomeUnknown):
        await registry.register("web", "t", ttl)
    registry._grant = original_grant  # type: ignore[method-assign]
    relay.release()
    await eventually(lambda: "t" in ids(registry), timeout=15)
    # A revoke sent when the write failed reaches etcd with the answers: give it time to land.
    await registry.register("web", "probe", PLAIN)
    await asyncio.sleep(1.0)
    inst = registry.state.get("web", "t")
    assert inst is not None and inst.health == "passing", inst


async def test_a_write_etcd_holds_is_answered_as_done(
    own_etcd: EtcdCluster, relay: Relay, make_registry: MakeRegistry
) -> None:
    """The transaction's answer is lost, and the node can read the keys back: they hold what
    the write would have left, so the write is done, and answered so."""
    registry = await make_registry(own_etcd, "a", endpoints=[relay.url], request_timeout=0.5)
    await registry.register("web", "before", PLAIN)
    relay.holding = True
    relay.until_cancel = True
    inst, revision = await registry.register("web", "y", PLAIN)
    assert inst.id == "y" and revision >= inst.mod_revision > 0
    assert "y" in ids(registry)


async def test_etcd_that_cannot_be_reached_at_all_changed_nothing(
    own_etcd: EtcdCluster, make_registry: MakeRegistry
) -> None:
    """A member that is gone (connection refused): the request never left the node."""
    registry = await make_registry(own_etcd, "a", request_timeout=0.5)
    await registry.register("web", "before", PLAIN)
    own_etcd.kill_all()
    with pytest.raises(Unavailable) as info:
        await registry.register("web", "never", PLAIN)
    assert info.value.outcome == "none"


async def test_the_api_answers_503_with_the_outcome_and_a_retry_is_done(
    tmp_path: Path, own_etcd: EtcdCluster, relay: Relay
) -> None:
    node = NodeProcess(
        tmp_path,
        registry_config=f'backend = "etcd"\netcd = ["{relay.url}"]\netcd_timeout = "500ms"',
    )
    node.start(wait=False)
    try:
        async with httpx.AsyncClient(base_url=node.url, timeout=10) as client:
            for _ in range(300):
                with contextlib.suppress(httpx.HTTPError):
                    if (await client.get("/v1/health")).status_code == 200:
                        break
                await asyncio.sleep(0.05)
            body = {"address": "10.0.0.1", "port": 80}
            assert (await client.put("/v1/services/web/instances/a", json=body)).status_code == 200
            relay.holding = True
            r = await client.put("/v1/services/web/instances/b", json=body)
            assert r.status_code == 503
            answer = r.json()
            assert answer["outcome"] == "unknown", answer
            assert set(answer) == {"error", "detail", "outcome"}
            relay.release()
            for _ in range(300):
                if (await client.get("/v1/services/web/instances/b")).status_code == 200:
                    break
                await asyncio.sleep(0.05)
            again = await client.put("/v1/services/web/instances/b", json=body)
            assert again.status_code == 200
    finally:
        await asyncio.to_thread(node.stop)
