"""The chunked body of an upgrade request, read to the byte: what follows it is the tunnel's."""

from __future__ import annotations

import httptools
import pytest
from hypothesis import given
from hypothesis import strategies as st

from interknit.proxy.upgrade import UpgradeBody

chunks = st.lists(st.binary(min_size=1, max_size=40), max_size=5)
extensions = st.sampled_from([b"", b";x=1", b";name"])
trailers = st.sampled_from([b"", b"Digest: x\r\n", b"A: 1\r\nB: 2\r\n"])


def encode(parts: list[bytes], extension: bytes, trailer: bytes) -> bytes:
    out = b"".join(b"%x%s\r\n%s\r\n" % (len(p), extension, p) for p in parts)
    return out + b"0\r\n" + trailer + b"\r\n"


def cut(data: bytes, points: list[int]) -> list[bytes]:
    marks = sorted({min(p, len(data)) for p in points})
    return [data[a:b] for a, b in zip([0, *marks], [*marks, len(data)], strict=True) if b > a]


@given(chunks, extensions, trailers, st.binary(max_size=30), st.lists(st.integers(0, 400)))
def test_the_body_ends_to_the_byte_however_it_arrives(
    parts: list[bytes], extension: bytes, trailer: bytes, tail: bytes, points: list[int]
) -> None:
    body = encode(parts, extension, trailer)
    content: list[bytes] = []
    reader = UpgradeBody(content.append, True, 0)
    used = 0
    rest = b""
    for read in cut(body + tail, points):
        if reader.done:
            rest += read
            continue
        n = reader.feed(read)
        used += n
        rest += read[n:]
    assert reader.done
    assert used == len(body)
    assert rest == tail
    assert b"".join(content) == b"".join(parts)


@pytest.mark.parametrize(
    "data", [b"zz\r\nhello\r\n", b"5\r\nhelloX\r\n", b"5 5\r\nhello\r\n", b"-1\r\n"]
)
def test_broken_chunks_raise(data: bytes) -> None:
    with pytest.raises(httptools.HttpParserError):
        UpgradeBody(lambda _: None, True, 0).feed(data)


def test_until_it_ends_every_byte_is_the_bodys() -> None:
    reader = UpgradeBody(lambda _: None, True, 0)
    assert reader.feed(b"5\r\nhel") == 6
    assert not reader.done
    assert reader.feed(b"lo\r\n0\r\n\r\nPRI * HTTP/2.0") == 9
    assert reader.done
