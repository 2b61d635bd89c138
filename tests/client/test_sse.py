"""The SSE parser, fed the registry's stream in arbitrary pieces."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from interknit.client.sse import SseEvent, SseParser

STREAM = (
    b'id: 3\nevent: resync\ndata: {"revision":3,"instances":[]}\n\n'
    b": keepalive\n\n"
    b'id: 4\r\nevent: put\r\ndata: {"a":1}\r\n\r\n'
    b"data: one\ndata: two\n\n"
)
EXPECTED = [
    SseEvent("resync", '{"revision":3,"instances":[]}', "3"),
    SseEvent("put", '{"a":1}', "4"),
    SseEvent("message", "one\ntwo", "4"),
]


def test_whole_stream() -> None:
    parser = SseParser()
    assert parser.feed(STREAM) == EXPECTED
    assert parser.comments == 1


@given(st.lists(st.integers(0, len(STREAM)), max_size=10))
def test_any_split_gives_the_same_events(cuts: list[int]) -> None:
    parser = SseParser()
    events: list[SseEvent] = []
    last = 0
    for cut in [*sorted(cuts), len(STREAM)]:
        events += parser.feed(STREAM[last:cut])
        last = cut
    assert events == EXPECTED


def test_incomplete_event_is_held() -> None:
    parser = SseParser()
    assert parser.feed(b"event: put\ndata: x\n") == []
    assert parser.feed(b"\n") == [SseEvent("put", "x")]
