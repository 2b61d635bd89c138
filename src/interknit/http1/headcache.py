"""Whole request heads by their bytes: what handling one gave, given again for the same bytes.

A client on a kept-alive connection tends to send the same head again and again. When a read
holds exactly one whole head (nothing before or after it) and the parser rests between two
messages, the same bytes would make the parser produce the same callbacks, and the head's
handling the same result, so that result can be looked up instead. Only the result of the one
function that handles every head goes in (the caller's business), so a rule added to head
handling cannot be skipped for a repeated head.

An entry is kept from the second time its bytes come: heads never repeated (every request
different) cost one set entry, not a kept result each. Both tables are bounded and are emptied
when full, which costs a few heads parsed again.
"""

from __future__ import annotations

from typing import TypeVar

T = TypeVar("T")

MAX_BYTES = 2048  # longer heads are rare and not worth keeping
MAX_ENTRIES = 128
MAX_SEEN = 256


class HeadCache(dict[bytes, T]):
    """The kept entries, by their bytes (a dict: a lookup is one C call on the hot path)."""

    __slots__ = ("max_bytes", "seen")

    def __init__(self, max_bytes: int = MAX_BYTES) -> None:
        super().__init__()
        self.max_bytes = max_bytes
        self.seen: set[bytes] = set()

    def offer(self, data: bytes, value: T) -> None:
        """``value`` is what handling the head ``data`` gave; keep it if ``data`` came before."""
        if len(data) > self.max_bytes:
            return
        seen = self.seen
        if data not in seen:
            if len(seen) >= MAX_SEEN:
                seen.clear()
            seen.add(data)
            return
        if len(self) >= MAX_ENTRIES:
            super().clear()
        self[data] = value

    def clear(self) -> None:
        super().clear()
        self.seen.clear()
