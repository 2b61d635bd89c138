"""A Server-Sent Events parser (sans-IO): bytes in, complete events out.

Only what the registry's ``/v1/watch`` sends is needed (``id``, ``event``, ``data``, comment
lines), but the parser follows the SSE rules for those fields: an event ends at a blank line,
multi-line ``data`` is joined with newlines, ``\\r\\n`` and ``\\n`` both end a line.
"""

from __future__ import annotations

from dataclasses import dataclass

# A watch event carries one instance (a few KiB at most); a resync the whole service. Anything
# far bigger is not the registry talking.
MAX_EVENT_BYTES = 64 * 1024 * 1024


@dataclass(frozen=True, slots=True)
class SseEvent:
    event: str
    data: str
    id: str | None = None


class SseParser:
    def __init__(self) -> None:
        self._buffer = b""
        self._event = ""
        self._data: list[str] = []
        self._id: str | None = None
        # Comment lines seen (keepalives); the caller uses them as proof of life.
        self.comments = 0

    def feed(self, chunk: bytes) -> list[SseEvent]:
        self._buffer += chunk
        if len(self._buffer) > MAX_EVENT_BYTES:
            raise ValueError("an event is larger than the parser accepts")
        events: list[SseEvent] = []
        while True:
            end = self._buffer.find(b"\n")
            if end < 0:
                break
            raw = self._buffer[:end]
            self._buffer = self._buffer[end + 1 :]
            line = raw[:-1] if raw.endswith(b"\r") else raw
            event = self._line(line.decode("utf-8", errors="replace"))
            if event is not None:
                events.append(event)
        return events

    def _line(self, line: str) -> SseEvent | None:
        if not line:
            if not self._data and not self._event:
                return None
            event = SseEvent(self._event or "message", "\n".join(self._data), self._id)
            self._event, self._data = "", []
            return event
        if line.startswith(":"):
            self.comments += 1
            return None
        name, _, value = line.partition(":")
        if value.startswith(" "):
            value = value[1:]
        if name == "event":
            self._event = value
        elif name == "data":
            self._data.append(value)
        elif name == "id":
            self._id = value
        return None
