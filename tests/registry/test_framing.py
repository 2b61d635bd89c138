"""Framing alone: what it gives aiohttp is the bytes it got, cut exactly where requests end,
however the bytes arrive; heads are held until whole and refused past the limits."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from interknit.registry.framing import Framing
from interknit.registry.refusals import HEAD_TOO_LARGE, TOO_MANY_HEADERS, URI_TOO_LONG

REQUESTS = [
    b"GET /v1/services HTTP/1.1\r\nHost: x\r\n\r\n",
    b"PUT /v1/services/a/instances/b HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nhello",
    b"PUT /p HTTP/1.1\r\nContent-Length: 12\r\n\r\nline\nline\r\n\n",
    b"POST /p HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
    b"POST /p HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n3;x=1\r\nabc\r\n0\r\nT: v\r\n\r\n",
    b"GET /q HTTP/1.0\r\nConnection: keep-alive\r\n\r\n",
    b"GET /u HTTP/1.1\r\nUpgrade: foo\r\nConnection: upgrade\r\n\r\n",
    # An upgrade request's body is its own (httptools' llhttp ends the request at its head).
    b"PUT /u HTTP/1.1\r\nUpgrade: h2c\r\nConnection: upgrade\r\nContent-Length: 5\r\n\r\nhello",
    b"PUT /u HTTP/1.1\r\nUpgrade: foo\r\nConnection: upgrade\r\n"
    b"Transfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
]
requests = st.lists(
    st.tuples(st.sampled_from(REQUESTS), st.sampled_from([b"", b"\r\n", b"\r\n\r\n"])),
    min_size=1,
    max_size=5,
)


def cut(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({min(c, len(data)) for c in cuts})
    return [data[a:b] for a, b in zip([0, *points], [*points, len(data)], strict=True) if b > a]


@given(requests, st.lists(st.integers(0, 2000), max_size=8))
def test_pieces_are_the_bytes_cut_at_request_ends(
    pipeline: list[tuple[bytes, bytes]], cuts: list[int]
) -> None:
    data = b"".join(filler + request for request, filler in pipeline)
    ends = set()
    at = 0
    for request, filler in pipeline:
        at += len(filler) + len(request)
        ends.add(at)
    framing = Framing()
    given_out = b""
    for read in cut(data, cuts):
        start = len(given_out)
        pieces, refusal = framing.feed(read)
        assert refusal is None
        for piece in pieces[:-1]:
            # Every cut inside a read falls where a request ends.
            start += len(piece)
            assert start in ends
        given_out += b"".join(pieces)
    assert given_out == data
    assert framing.completed == len(pipeline)
    assert not framing.head_open


@given(requests, st.integers(0, 3))
def test_a_read_holding_requests_then_a_malformed_one_cuts_before_it(
    pipeline: list[tuple[bytes, bytes]], which: int
) -> None:
    good = b"".join(filler + request for request, filler in pipeline)
    bad = [
        b"GET /\x01 HTTP/1.1\r\n\r\n",
        b"G\x00T / HTTP/1.1\r\n\r\n",
        b"GET / HTTP/1.1\r\nA\x01: b\r\n\r\n",
    ]
    pieces, refusal = Framing().feed(good + bad[which % len(bad)])
    assert refusal is not None and refusal.status == 400
    assert b"".join(pieces) == good


def test_an_upgrade_request_that_closes_ends_after_its_body() -> None:
    request = (
        b"PUT /u HTTP/1.1\r\nUpgrade: foo\r\nConnection: upgrade, close\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n2\r\nhi\r\n0\r\n\r\n"
    )
    framing = Framing()
    pieces, refusal = framing.feed(request + b"GET / HTTP/1.1\r\n\r\n")
    assert pieces == [request] and refusal is None
    assert framing.ended and framing.completed == framing.heads == 1


def test_a_head_is_held_until_whole() -> None:
    framing = Framing()
    assert framing.feed(b"GET /v1/services HTTP/1.1\r\nHo") == ([], None)
    assert framing.head_open
    assert framing.feed(b"st: x\r\n") == ([], None)
    pieces, refusal = framing.feed(b"\r\nGET /b HTTP/1.1\r\n")
    assert pieces == [b"GET /v1/services HTTP/1.1\r\nHost: x\r\n\r\n"] and refusal is None
    assert framing.held == b"GET /b HTTP/1.1\r\n"


def test_a_body_goes_out_as_it_comes() -> None:
    framing = Framing()
    head = b"PUT /p HTTP/1.1\r\nContent-Length: 10\r\n\r\n"
    assert framing.feed(head + b"abc") == ([head + b"abc"], None)
    assert framing.feed(b"defg") == ([b"defg"], None)
    assert framing.feed(b"hij" + b"GET") == ([b"hij"], None)
    assert framing.held == b"GET"


@given(st.integers(1, 8192))
def test_an_endless_header_is_refused_within_the_limit(step: int) -> None:
    framing = Framing(max_head=4096)
    pieces, refusal = framing.feed(b"GET / HTTP/1.1\r\nX-A: ")
    assert refusal is None
    fed = 0
    while refusal is None:
        pieces, refusal = framing.feed(b"a" * step)
        assert pieces == []
        fed += step
        assert fed < 4096 + step
    assert refusal == HEAD_TOO_LARGE
    assert len(framing.held) <= 4096


def test_an_endless_request_line_is_414_and_endless_empty_lines_count() -> None:
    framing = Framing(max_head=1024)
    framing.feed(b"GET /")
    assert framing.feed(b"a" * 2000)[1] == URI_TOO_LONG
    assert Framing(max_head=1024).feed(b"\r\n" * 600)[1] is not None


def test_more_fields_than_allowed_are_refused() -> None:
    head = b"GET / HTTP/1.1\r\n" + b"".join(b"F%d: v\r\n" % n for n in range(10))
    assert Framing(max_headers=10).feed(head + b"\r\n")[1] is None
    assert Framing(max_headers=9).feed(head + b"\r\n")[1] == TOO_MANY_HEADERS


def test_a_broken_body_is_aiohttps() -> None:
    framing = Framing()
    head = b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n"
    pieces, refusal = framing.feed(head + b"zz\r\nmore")
    assert refusal is None and b"".join(pieces) == head + b"zz\r\nmore"
    assert framing.feed(b"anything") == ([b"anything"], None)


def test_nothing_after_a_request_that_closes_the_connection_goes_out() -> None:
    for last in (b"GET / HTTP/1.0\r\n\r\n", b"GET / HTTP/1.1\r\nConnection: close\r\n\r\n"):
        framing = Framing()
        assert framing.feed(last + b"GET /more") == ([last], None)
        assert framing.feed(b" HTTP/1.1\r\n\r\n") == ([], None)


def test_a_bare_lf_head_is_malformed_as_the_fast_path_reads_it() -> None:
    refusal = Framing().feed(b"GET /lf HTTP/1.1\nHost: x\n\n")[1]
    assert refusal is not None and refusal.status == 400
