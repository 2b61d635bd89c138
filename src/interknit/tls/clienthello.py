"""The TLS ClientHello, read without terminating: what HAProxy's ``req.ssl_sni`` gives a
``mode tcp`` frontend, so that a TCP listener can route a TLS connection by the name its
client asked for and pass the bytes on untouched.

Sans-IO: ``read_client_hello(data)`` takes every byte received so far and answers ``None``
(not enough yet), a ``ClientHello``, or raises ``NotClientHello`` (these bytes can never begin
one: not TLS, malformed, or over the size limit). Nothing is buffered here; the caller keeps
the bytes, which it forwards as they came once it has chosen.

What is read (RFC 8446 4.1.2, RFC 5246 7.4.1.2, RFC 6066 3, RFC 7301 3.1): TLS records of
type handshake (22), version 3.x, at most 2^14 bytes each; the handshake message they carry,
which may span records, of type client_hello (1); its fixed fields, with every length checked
against what contains it; its extensions, each at most once; in them the server name (the
host_name entry, ASCII, a host name) and the ALPN protocol names. A ClientHello without
extensions (as SSL 3.0 and some TLS 1.0 clients sent) has no name.
"""

from __future__ import annotations

from dataclasses import dataclass

from interknit.names import is_hostname

# A ClientHello with post-quantum key shares is about 1.8 KiB; room for much more, bounded.
MAX_HELLO_BYTES = 16 * 1024
_RECORD_HEADER = 5
_MAX_RECORD = 1 << 14
_HANDSHAKE = 22
_CLIENT_HELLO = 1
_EXT_SERVER_NAME = 0
_EXT_ALPN = 16
_HOST_NAME = 0


class NotClientHello(ValueError):
    """These bytes do not begin a TLS ClientHello (the message says why)."""


@dataclass(frozen=True, slots=True)
class ClientHello:
    sni: str | None  # lower-case, without a trailing dot
    alpn: tuple[str, ...]
    legacy_version: int  # 0x0303 for TLS 1.2 and 1.3 clients
    length: int  # bytes of the records that carried it


class _Reader:
    """Bounds-checked reads over one byte string; every overrun is ``NotClientHello``."""

    __slots__ = ("data", "end", "pos")

    def __init__(self, data: bytes, pos: int = 0, end: int | None = None) -> None:
        self.data = data
        self.pos = pos
        self.end = len(data) if end is None else end

    def left(self) -> int:
        return self.end - self.pos

    def take(self, n: int, what: str) -> bytes:
        if n > self.left():
            raise NotClientHello(f"{what} runs past its container")
        out = self.data[self.pos : self.pos + n]
        self.pos += n
        return out

    def take_all(self) -> bytes:
        return self.take(self.left(), "vector")

    def number(self, n: int, what: str) -> int:
        return int.from_bytes(self.take(n, what), "big")

    def sub(self, length_bytes: int, what: str) -> _Reader:
        """The vector that follows, as a reader of its own (its length prefix checked)."""
        n = self.number(length_bytes, f"{what} length")
        if n > self.left():
            raise NotClientHello(f"{what} runs past its container")
        inner = _Reader(self.data, self.pos, self.pos + n)
        self.pos += n
        return inner


def read_client_hello(data: bytes, limit: int = MAX_HELLO_BYTES) -> ClientHello | None:
    """The ClientHello that ``data`` begins with; None while it is incomplete."""
    # Gather the handshake bytes from as many records as it takes.
    handshake = bytearray()
    pos = 0
    need: int | None = None  # the whole handshake message's length, once known
    while need is None or len(handshake) < need:
        if len(data) - pos < _RECORD_HEADER:
            if pos == 0 and data:
                _check_record_start(data)
            return None
        content_type = data[pos]
        major, minor = data[pos + 1], data[pos + 2]
        length = int.from_bytes(data[pos + 3 : pos + 5], "big")
        if content_type != _HANDSHAKE:
            if pos == 0:
                raise NotClientHello("not a TLS handshake record")
            raise NotClientHello("the ClientHello is interrupted by another record type")
        if major != 3 or minor > 4:
            raise NotClientHello(f"record version {major}.{minor} is not TLS")
        if length == 0 or length > _MAX_RECORD:
            raise NotClientHello(f"a handshake record of {length} bytes")
        if pos + _RECORD_HEADER + length > limit:
            raise NotClientHello(f"the ClientHello is longer than {limit} bytes")
        body_end = pos + _RECORD_HEADER + length
        handshake += data[pos + _RECORD_HEADER : body_end]
        if need is None and len(handshake) >= 4:
            if handshake[0] != _CLIENT_HELLO:
                raise NotClientHello(f"handshake message type {handshake[0]}, not client_hello")
            need = 4 + int.from_bytes(handshake[1:4], "big")
            if need > limit:
                raise NotClientHello(f"the ClientHello is longer than {limit} bytes")
        if len(data) < body_end:
            return None  # this record is still arriving
        pos = body_end
    if len(handshake) > need:
        raise NotClientHello("bytes after the ClientHello in its last record")
    sni, alpn, version = _parse_body(bytes(handshake[4:need]))
    return ClientHello(sni=sni, alpn=alpn, legacy_version=version, length=pos)


def _check_record_start(data: bytes) -> None:
    """Refuse early what cannot become a handshake record (a plaintext client, say)."""
    if data[0] != _HANDSHAKE:
        raise NotClientHello("not a TLS handshake record")
    if len(data) > 1 and data[1] != 3:
        raise NotClientHello(f"record version {data[1]}.x is not TLS")


def _parse_body(body: bytes) -> tuple[str | None, tuple[str, ...], int]:
    r = _Reader(body)
    version = r.number(2, "legacy_version")
    if version >> 8 != 3:
        raise NotClientHello(f"client version {version:#06x} is not TLS")
    r.take(32, "random")
    session_id = r.sub(1, "session_id")
    if session_id.left() > 32:
        raise NotClientHello("a session_id longer than 32 bytes")
    suites = r.sub(2, "cipher_suites")
    if suites.left() < 2 or suites.left() % 2:
        raise NotClientHello("cipher_suites of odd or zero length")
    if r.sub(1, "compression_methods").left() < 1:
        raise NotClientHello("no compression method")
    sni: str | None = None
    alpn: tuple[str, ...] = ()
    if r.left() == 0:
        return sni, alpn, version  # no extensions at all
    extensions = r.sub(2, "extensions")
    if r.left():
        raise NotClientHello("bytes after the extensions")
    seen: set[int] = set()
    while extensions.left():
        kind = extensions.number(2, "extension type")
        data = extensions.sub(2, "extension")
        if kind in seen:
            raise NotClientHello(f"extension {kind} appears twice")
        seen.add(kind)
        if kind == _EXT_SERVER_NAME:
            sni = _server_name(data)
        elif kind == _EXT_ALPN:
            alpn = _alpn(data)
    return sni, alpn, version


def _server_name(ext: _Reader) -> str | None:
    names = ext.sub(2, "server_name_list")
    if ext.left():
        raise NotClientHello("bytes after the server_name_list")
    found: str | None = None
    while names.left():
        name_type = names.number(1, "server name type")
        value = names.sub(2, "server name").take_all()
        if name_type != _HOST_NAME:
            continue  # no other type is defined; unknown ones are skipped, as OpenSSL does
        if found is not None:
            raise NotClientHello("two host names in server_name")
        try:
            text = value.decode("ascii")
        except UnicodeDecodeError:
            raise NotClientHello("a server name that is not ASCII") from None
        if not is_hostname(text):
            raise NotClientHello("a server name that is not a host name")
        found = text.rstrip(".").lower()
    return found


def _alpn(ext: _Reader) -> tuple[str, ...]:
    protocols = ext.sub(2, "protocol_name_list")
    if ext.left():
        raise NotClientHello("bytes after the protocol_name_list")
    out = []
    while protocols.left():
        name = protocols.sub(1, "protocol name").take_all()
        if not name:
            raise NotClientHello("an empty ALPN protocol name")
        out.append(name.decode("latin-1"))
    return tuple(out)
