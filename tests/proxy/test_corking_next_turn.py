"""WriteBatch.next_turn: the HTTP fast path's writes wait one more loop turn, in order."""

from __future__ import annotations

import asyncio

from interknit.proxy.corking import WriteBatch
from tests.proxy.test_corking import Recorder


def queue(batch: WriteBatch, transport: asyncio.WriteTransport, data: bytes) -> None:
    """What the fast path does inline (http.Exchange.fast_start, on_response_whole)."""
    if not batch.pending:
        batch.loop.call_soon(batch.next_turn)
    batch.pending.append((transport, data))


async def test_next_turn_sends_one_turn_later_with_what_came_meanwhile() -> None:
    log: list[tuple[str, bytes]] = []
    a, b = Recorder(log, "a"), Recorder(log, "b")
    batch = WriteBatch(asyncio.get_running_loop())
    queue(batch, a, b"1")
    await asyncio.sleep(0)
    assert log == []  # the turn that queued it is over, the next is not
    queue(batch, b, b"x")  # joins the same run of writes
    batch.write(a, b"2")
    await asyncio.sleep(0)
    await asyncio.sleep(0)
    assert log == [("a", b"1"), ("b", b"x"), ("a", b"2")]


async def test_next_turn_after_an_early_flush_sends_nothing_twice() -> None:
    log: list[tuple[str, bytes]] = []
    a = Recorder(log, "a")
    batch = WriteBatch(asyncio.get_running_loop())
    queue(batch, a, b"head")
    batch.flush()  # a close flushes at once
    assert log == [("a", b"head")]
    for _ in range(3):
        await asyncio.sleep(0)
    assert log == [("a", b"head")]
