"""WriteBatch.write_next_turn: a request going upstream waits one more loop turn, in order."""

from __future__ import annotations

import asyncio

from interknit.http1.batch import WriteBatch
from tests.http1.test_batch import Recorder


async def test_next_turn_sends_one_turn_later_with_what_came_meanwhile() -> None:
    log: list[tuple[str, bytes]] = []
    a, b = Recorder(log, "a"), Recorder(log, "b")
    batch = WriteBatch(asyncio.get_running_loop())
    batch.write_next_turn(a, b"1")
    await asyncio.sleep(0)
    assert log == []  # the turn that queued it is over, the next is not
    batch.write_next_turn(b, b"x")  # joins the same run of writes
    batch.write(a, b"2")
    await asyncio.sleep(0)
    await asyncio.sleep(0)
    assert log == [("a", b"1"), ("b", b"x"), ("a", b"2")]


async def test_next_turn_after_an_early_flush_sends_nothing_twice() -> None:
    log: list[tuple[str, bytes]] = []
    a = Recorder(log, "a")
    batch = WriteBatch(asyncio.get_running_loop())
    batch.write_next_turn(a, b"head")
    batch.flush()  # a close flushes at once
    assert log == [("a", b"head")]
    for _ in range(3):
        await asyncio.sleep(0)
    assert log == [("a", b"head")]
