"""WriteBatch: writes of one loop turn go out together, in order, and never after a close."""

from __future__ import annotations

import asyncio
from typing import Any

from interknit.http1.batch import WriteBatch


class Recorder(asyncio.WriteTransport):
    def __init__(self, log: list[tuple[str, bytes]], name: str) -> None:
        super().__init__()
        self.log = log
        self.name = name
        self.closing = False

    def write(self, data: Any) -> None:
        self.log.append((self.name, bytes(data)))

    def is_closing(self) -> bool:
        return self.closing

    def close(self) -> None:
        self.closing = True


async def test_writes_wait_for_the_end_of_the_turn_and_keep_their_order() -> None:
    log: list[tuple[str, bytes]] = []
    a, b = Recorder(log, "a"), Recorder(log, "b")
    batch = WriteBatch(asyncio.get_running_loop())
    batch.write(a, b"1")
    batch.write(b, b"x")
    batch.write(a, b"2")
    assert log == []  # nothing is sent within the turn
    await asyncio.sleep(0)
    assert log == [("a", b"1"), ("b", b"x"), ("a", b"2")]


async def test_an_early_flush_sends_before_a_close_and_closed_transports_drop() -> None:
    log: list[tuple[str, bytes]] = []
    a, b = Recorder(log, "a"), Recorder(log, "b")
    batch = WriteBatch(asyncio.get_running_loop())
    batch.write(a, b"head")
    batch.flush()  # what a close does first
    a.close()
    assert log == [("a", b"head")]
    batch.write(b, b"gone")
    b.close()  # closed before the turn ended: its queued bytes are dropped
    batch.write(a, b"late")
    await asyncio.sleep(0)
    assert log == [("a", b"head")]
