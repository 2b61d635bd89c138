"""Bounds on a request head, checked on its bytes as they arrive.

httptools (llhttp) hands a header to its callback only once the header is whole, and keeps the
part it has in a buffer of its own until then: a limit checked in that callback comes after an
endless header line or name has been buffered (measured: one such client took a proxy from 58
to 257 MB in 10 s). So ``HeadGuard`` looks at the bytes before the parser does. While a head is
being read, a read that would take the head past its limit must hold the head's end within the
limit, or the request is refused at once: 414 while the request line has not ended, else 431.

Bytes that arrive together with the end of a head (a body, a pipelined request) are not
counted against it; a pipelined head that begins inside such a read is counted from the next
read on, so what the parser may hold beyond the limit is bounded by one read.
"""

from __future__ import annotations

# A head ends at an empty line; llhttp also takes a bare LF as a line's end.
_ENDS = (b"\n\r\n", b"\n\n")


class HeadGuard:
    """Counts the bytes of the head being read; one per connection."""

    __slots__ = ("limit", "line_done", "seen", "tail")

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.seen = 0
        # The last bytes of the head so far, to find an end split across two reads.
        self.tail = b""
        self.line_done = False

    def reset(self) -> None:
        """A new head begins (or none is being read)."""
        self.seen = 0
        self.tail = b""
        self.line_done = False

    def check(self, data: bytes) -> int:
        """0 if ``data`` may go to the parser, else the status to refuse the request with."""
        room = self.limit - self.seen
        if len(data) <= room:
            self.seen += len(data)
            if not self.line_done and b"\n" in data:
                self.line_done = True
            self.tail = data[-2:]
            return 0
        # An end that lies in the first ``room`` bytes (or began in the last read) is in time.
        probe = self.tail + data[: max(room, 0)]
        if _ENDS[0] in probe or _ENDS[1] in probe:
            # The head ends within its limit; what follows is not this head's.
            self.seen = self.limit
            return 0
        return 431 if self.line_done or b"\n" in probe else 414
