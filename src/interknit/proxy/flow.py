"""Reading paused for any of several reasons, resumed when none is left.

A client connection stops reading while a pipelined request waits its turn, while the
upstream's socket buffer is full, and while the request waits for an upstream connection; an
upstream connection stops reading while the client's buffer is full. Each reason is one bit,
so that resuming for one reason cannot undo a pause for another.
"""

from __future__ import annotations

import asyncio

PIPELINE = 1  # a later request is parsed while an earlier one is answered
PEER_FULL = 2  # the other side's write buffer is above its high-water mark
WAITING = 4  # the request body has nowhere to go yet (no upstream connection)


class FlowControl:
    __slots__ = ("_transport", "reasons")

    def __init__(self, transport: asyncio.Transport) -> None:
        self._transport = transport
        # The bits of the reasons reading is paused for; read-only outside (a caller on a hot
        # path may test a bit before calling resume_reading).
        self.reasons = 0

    @property
    def read_paused(self) -> bool:
        return self.reasons != 0

    def pause_reading(self, reason: int) -> None:
        if not self.reasons:
            self._transport.pause_reading()
        self.reasons |= reason

    def resume_reading(self, reason: int) -> None:
        if self.reasons & reason:
            self.reasons &= ~reason
            if not self.reasons and not self._transport.is_closing():
                self._transport.resume_reading()
