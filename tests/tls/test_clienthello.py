"""The ClientHello reader (req.ssl_sni): real hellos from OpenSSL, every prefix of them,
hellos built field by field and split over records and reads, arbitrary and mutated bytes,
and OpenSSL itself as the oracle for what name a hello carries."""

from __future__ import annotations

import contextlib
import ssl
import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from interknit.tls.clienthello import (
    MAX_HELLO_BYTES,
    ClientHello,
    NotClientHello,
    read_client_hello,
)


def real_hello(
    sni: str | None, alpn: tuple[str, ...] = (), version: ssl.TLSVersion | None = None
) -> bytes:
    """The first flight of OpenSSL's client (through Python's ssl) for ``sni``."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    if alpn:
        ctx.set_alpn_protocols(list(alpn))
    if version is not None:
        ctx.maximum_version = version
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    # An address as server_hostname: OpenSSL sends no SNI for it.
    obj = ctx.wrap_bio(incoming, outgoing, server_hostname=sni or "127.0.0.1")
    with pytest.raises(ssl.SSLWantReadError):
        obj.do_handshake()
    return outgoing.read()


def outcome(data: bytes) -> ClientHello | str | None:
    try:
        return read_client_hello(data)
    except NotClientHello as exc:
        return f"refused: {exc}"


@pytest.mark.parametrize("version", [ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3])
@pytest.mark.parametrize("sni", ["db.example.com", "A.Example.COM", None])
def test_real_hellos_and_every_prefix(sni: str | None, version: ssl.TLSVersion) -> None:
    data = real_hello(sni, ("h2", "http/1.1"), version)
    hello = read_client_hello(data)
    assert hello is not None
    assert hello.sni == (sni.lower() if sni else None)
    assert hello.alpn == ("h2", "http/1.1")
    assert hello.legacy_version == 0x0303
    assert hello.length == len(data)
    for cut in range(len(data)):
        assert read_client_hello(data[:cut]) is None, cut
    # Bytes after the hello (early data, a ChangeCipherSpec) are the caller's business.
    assert read_client_hello(data + b"\x14\x03\x03\x00\x01\x01") == hello


def test_plaintext_is_refused_at_its_first_byte() -> None:
    for first in (b"G", b"GET / HTTP/1.1\r\n", b"SSH-2.0-OpenSSH\r\n", b"\x80\x2e\x01"):
        with pytest.raises(NotClientHello):
            read_client_hello(first)
    with pytest.raises(NotClientHello, match="version"):
        read_client_hello(b"\x16\x02")


def _ext(kind: int, body: bytes) -> bytes:
    return struct.pack("!HH", kind, len(body)) + body


def _sni_ext(*names: tuple[int, bytes]) -> bytes:
    entries = b"".join(struct.pack("!BH", t, len(n)) + n for t, n in names)
    return _ext(0, struct.pack("!H", len(entries)) + entries)


def _alpn_ext(protocols: list[bytes]) -> bytes:
    entries = b"".join(bytes([len(p)]) + p for p in protocols)
    return _ext(16, struct.pack("!H", len(entries)) + entries)


def build_hello(extensions: list[bytes] | None, session_id: bytes = b"") -> bytes:
    body = b"\x03\x03" + bytes(32) + bytes([len(session_id)]) + session_id
    body += b"\x00\x04\x13\x01\xc0\x2f" + b"\x01\x00"
    if extensions is not None:
        joined = b"".join(extensions)
        body += struct.pack("!H", len(joined)) + joined
    return b"\x01" + len(body).to_bytes(3, "big") + body


def records(handshake: bytes, sizes: list[int]) -> bytes:
    """``handshake`` in records of these sizes (the rest in one last record)."""
    out, pos = b"", 0
    for size in sizes:
        if pos >= len(handshake):
            break
        piece = handshake[pos : pos + size]
        out += b"\x16\x03\x01" + struct.pack("!H", len(piece)) + piece
        pos += size
    if pos < len(handshake):
        piece = handshake[pos:]
        out += b"\x16\x03\x01" + struct.pack("!H", len(piece)) + piece
    return out


def test_the_refusals_name_what_is_wrong() -> None:
    name = (0, b"a.example")
    cases = {
        "twice": [_sni_ext(name), _sni_ext(name)],
        "two host names": [_sni_ext(name, (0, b"b.example"))],
        "not a host name": [_sni_ext((0, b"bad name"))],
        "not ASCII": [_sni_ext((0, "é.example".encode()))],
        "empty ALPN": [_alpn_ext([b""])],
    }
    for words, exts in cases.items():
        with pytest.raises(NotClientHello, match=words):
            read_client_hello(records(build_hello(exts), []))
    # An unknown name type is skipped, as OpenSSL does; no extensions at all: no name.
    skipped = read_client_hello(records(build_hello([_sni_ext((7, b"x"), name)]), []))
    assert skipped is not None and skipped.sni == "a.example"
    bare = read_client_hello(records(build_hello(None), []))
    assert bare is not None and bare.sni is None
    with pytest.raises(NotClientHello, match="longer than"):
        read_client_hello(records(build_hello([_ext(21, bytes(MAX_HELLO_BYTES))]), [16384]))
    with pytest.raises(NotClientHello, match="interrupted"):
        hello = records(build_hello([_sni_ext(name)]), [10])
        read_client_hello(hello[:15] + b"\x17\x03\x03\x00\x01\x00" + hello[15:])


host_labels = st.from_regex(r"[a-z0-9]([a-z0-9-]{0,20}[a-z0-9])?", fullmatch=True)
# Under a name with letters: an all-digit name (``999.1.1.1``) is no host name (names.py).
host_names = st.lists(host_labels, max_size=4).map(lambda labels: ".".join([*labels, "test"]))
padding = st.builds(lambda kind, body: _ext(kind, body), st.sampled_from([21, 43, 51, 10, 13]),
                    st.binary(max_size=300))  # fmt: skip


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(
    name=st.none() | host_names,
    protocols=st.lists(st.binary(min_size=1, max_size=12), max_size=4),
    others=st.lists(padding, max_size=4, unique_by=lambda e: e[:2]),
    order=st.randoms(use_true_random=False),
    sizes=st.lists(st.integers(1, 400), max_size=8),
    reads=st.lists(st.integers(1, 300), max_size=10),
    session_id=st.binary(max_size=32),
)
def test_built_hellos_split_anyhow(
    name: str | None,
    protocols: list[bytes],
    others: list[bytes],
    order: object,
    sizes: list[int],
    reads: list[int],
    session_id: bytes,
) -> None:
    exts = list(others)
    if name is not None:
        exts.append(_sni_ext((0, name.encode())))
    if protocols:
        exts.append(_alpn_ext(protocols))
    order.shuffle(exts)  # type: ignore[attr-defined]
    data = records(build_hello(exts, session_id), sizes)
    # Fed as a socket delivers it: each read adds bytes; only the last completes it.
    seen, pos = b"", 0
    for n in [*reads, len(data)]:
        seen += data[pos : pos + n]
        pos += n
        result = read_client_hello(seen)
        if len(seen) < len(data):
            assert result is None
        else:
            break
    hello = read_client_hello(data)
    assert hello is not None
    assert hello.sni == name
    assert hello.alpn == tuple(p.decode("latin-1") for p in protocols)
    assert hello.length == len(data)


@settings(max_examples=500)
@given(st.binary(max_size=600))
def test_arbitrary_bytes_never_break_it(data: bytes) -> None:
    outcome(data)  # None, a ClientHello, or NotClientHello: nothing else escapes
    outcome(b"\x16\x03\x01" + data)


def _openssl_name(data: bytes) -> list[str | None] | None:
    """What OpenSSL's server makes of ``data``: the names its SNI callback was given
    (None: it refused the bytes before)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    names: list[str | None] = []
    ctx.sni_callback = lambda _obj, name, _ctx: names.append(name)  # type: ignore[assignment,func-returns-value]
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    obj = ctx.wrap_bio(incoming, outgoing, server_side=True)
    incoming.write(data)
    with contextlib.suppress(ssl.SSLWantReadError, ssl.SSLError):
        obj.do_handshake()
    return names or None


REAL = real_hello("shop.example.com", ("http/1.1",))


# Python's ssl reports a server name that is not ASCII as an unraisable exception.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(
    flips=st.lists(st.tuples(st.integers(0, len(REAL) - 1), st.integers(0, 255)), max_size=3),
)
def test_mutated_hellos_agree_with_openssl(flips: list[tuple[int, int]]) -> None:
    """Where both OpenSSL and this reader take a mutated hello, they see the same name."""
    data = bytearray(REAL)
    for at, value in flips:
        data[at] = value
    ours = outcome(bytes(data))
    theirs = _openssl_name(bytes(data))
    if isinstance(ours, ClientHello) and theirs is not None:
        (name,) = theirs
        assert ours.sni == (name.rstrip(".").lower() if name else None)
