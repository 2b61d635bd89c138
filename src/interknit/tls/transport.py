"""A listener's TLS connection: OpenSSL over a plain transport, through two memory BIOs.

The listener gives the event loop a factory of these instead of ``ssl=`` (uvloop's
``SSLProtocol``). Each is the socket's protocol and the transport its application protocol
(``HttpProxyProtocol``, ``TcpProxyProtocol``) sees once the handshake is done. It does what
that protocol needs and no more: a new connection costs about 12% less CPU than under uvloop's
(a kept-alive request the same; docs/benchmarks.md), and an idle one holds about 19 KiB, not 26:

- no ``ssl.SSLObject`` Python method per read or write: ``_ssl``'s connection object is
  called directly (the ``SSLObject`` is still there: the SNI callback, ``get_extra_info`` and
  ``sni_of`` see it);
- a read decrypts records until the incoming BIO is empty and stops there, not at the
  ``SSLWantReadError`` that ``_ssl`` raises;
- ``close()`` sends close_notify and closes, as HAProxy and nginx do; it does not wait for the
  client's (uvloop waits up to its shutdown timeout, holding the connection's slot);
- a TLS 1.3 session ticket leaves with the first answer, not in a write of its own.

The handshake has ``handshake_timeout`` from the accept (the listener gives it its
header_timeout); a client that has not finished by then is cut. A handshake that fails sends
OpenSSL's alert (the client learns why: "certificate required", "protocol version") and
closes. A client's close_notify or a plain EOF from its socket is the application protocol's
``eof_received`` (TLS 1.3 lets a client close its side and still read the answer).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
from collections.abc import Callable, Iterable
from typing import Any

log = logging.getLogger("interknit.tls")

# What one read may decrypt: more than a record holds (16 KiB), so one call takes a record.
_READ_SIZE = 65536


class TlsServerConnection(asyncio.Protocol, asyncio.Transport):
    __slots__ = (
        "_app",
        "_app_made",
        "_c",
        "_closing",
        "_context",
        "_incoming",
        "_loop",
        "_on_failure",
        "_open",
        "_outgoing",
        "_paused",
        "_peer_done",
        "_raw",
        "_sslobj",
        "_timeout",
        "_timer",
    )

    def __init__(
        self,
        app: asyncio.Protocol,
        context: ssl.SSLContext,
        loop: asyncio.AbstractEventLoop,
        handshake_timeout: float,
        on_failure: Callable[[str], None],
    ) -> None:
        self._app = app
        self._context = context
        self._loop = loop
        self._timeout = handshake_timeout
        self._on_failure = on_failure
        self._raw: asyncio.Transport = None  # type: ignore[assignment]
        self._incoming = ssl.MemoryBIO()
        self._outgoing = ssl.MemoryBIO()
        self._sslobj: ssl.SSLObject | None = None
        self._c: Any = None  # _ssl's own connection object, under the SSLObject
        self._timer: asyncio.TimerHandle | None = None
        self._open = False  # handshake done, not closed
        self._closing = False
        self._paused = False  # the application protocol paused reading
        self._app_made = False  # its connection_made was called: its connection_lost will be
        self._peer_done = False  # the client's close_notify or EOF came

    # The socket's protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._raw = transport  # type: ignore[assignment]
        sslobj = self._context.wrap_bio(self._incoming, self._outgoing, server_side=True)
        self._sslobj = sslobj
        self._c = sslobj._sslobj  # type: ignore[attr-defined]
        self._timer = self._loop.call_later(self._timeout, self._handshake_timed_out)

    def data_received(self, data: bytes) -> None:
        # Once closed, what still comes is dropped: a client that sends on while the close
        # waits for it to read what is left would otherwise fill the incoming BIO.
        if self._open:
            self._incoming.write(data)
            self._read()
        elif not self._closing:
            self._incoming.write(data)
            self._handshake()

    def eof_received(self) -> bool | None:
        if self._open:
            self._eof()
        elif not self._closing:
            self.abort()  # gone in the middle of its handshake
            self._on_failure("closed")
        return True  # closed by close() above or by the application's own

    def connection_lost(self, exc: Exception | None) -> None:
        self._open = False
        self._closing = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        # OpenSSL's connection goes now, and the application protocol (which refers to this
        # transport) when it is dropped, not with a collection: a node's are rare (heap.py).
        self._c = self._sslobj = None
        app = self._app
        self._app = None  # type: ignore[assignment]
        if self._app_made:
            self._app_made = False
            app.connection_lost(exc)

    def pause_writing(self) -> None:
        if self._open:
            self._app.pause_writing()

    def resume_writing(self) -> None:
        if self._open:
            self._app.resume_writing()

    # The handshake

    def _handshake(self) -> None:
        try:
            self._c.do_handshake()
        except ssl.SSLWantReadError:
            self._flush()
            return
        except ssl.SSLError as exc:
            self._flush()  # the alert that tells the client why
            self._closing = True
            self._raw.close()
            self._on_failure((exc.reason or "unknown").lower())
            return
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._open = True
        # TLS 1.2: the server's Finished, which the client waits for. TLS 1.3: only the
        # session ticket is left, which no client waits for: it goes with the first answer
        # (or the close_notify), one send instead of two.
        if self._c.version() != "TLSv1.3":
            self._flush()
        self._app_made = True
        self._app.connection_made(self)
        if self._open and self._incoming.pending:
            self._read()  # the request sent with the client's Finished

    def _handshake_timed_out(self) -> None:
        self._timer = None
        if not self._open and not self._closing:
            self.abort()
            self._on_failure("timeout")

    # Reading

    def _read(self) -> None:
        c = self._c
        incoming = self._incoming
        app = self._app
        unsent = self._outgoing.pending  # a TLS 1.3 ticket waiting for the first answer
        while not self._paused and self._open:
            try:
                data = c.read(_READ_SIZE)
            except ssl.SSLWantReadError:
                break  # a record not whole yet
            except ssl.SSLZeroReturnError:
                data = b""
            except ssl.SSLError as exc:
                self._fail(exc)
                return
            if not data:  # the client's close_notify
                self._eof()
                return
            app.data_received(data)
            if not incoming.pending and not c.pending():
                break
        if self._outgoing.pending != unsent:
            self._flush()  # what reading made OpenSSL answer (a key update)

    def _read_buffered(self) -> None:
        if self._open and not self._paused and (self._incoming.pending or self._c.pending()):
            self._read()

    def _eof(self) -> None:
        if self._peer_done:
            return  # its close_notify, then its FIN
        self._peer_done = True
        if not self._app.eof_received():
            self.close()

    # Writing

    def _flush(self) -> None:
        if self._outgoing.pending:
            self._raw.write(self._outgoing.read())

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if not self._open or not data:
            return
        try:
            self._c.write(data)
        except ssl.SSLError as exc:
            self._fail(exc)
            return
        self._raw.write(self._outgoing.read())

    def writelines(self, list_of_data: Iterable[bytes | bytearray | memoryview]) -> None:
        # One record for what is written together (a record has 22 bytes and an AEAD pass).
        self.write(b"".join(list_of_data))

    def can_write_eof(self) -> bool:
        return False  # close_notify ends both directions for HTTP clients

    def write_eof(self) -> None:
        raise NotImplementedError("a TLS connection cannot half-close")

    def get_write_buffer_size(self) -> int:
        return self._raw.get_write_buffer_size()

    def get_write_buffer_limits(self) -> tuple[int, int]:
        return self._raw.get_write_buffer_limits()

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        self._raw.set_write_buffer_limits(high, low)

    # Reading, as the application protocol controls it

    def pause_reading(self) -> None:
        if not self._paused:
            self._paused = True
            if not self._raw.is_closing():
                self._raw.pause_reading()

    def resume_reading(self) -> None:
        if self._paused:
            self._paused = False
            if not self._raw.is_closing():
                self._raw.resume_reading()
            # Records already decrypted or received wait in OpenSSL's buffers: not read here,
            # inside the application's own call.
            self._loop.call_soon(self._read_buffered)

    def is_reading(self) -> bool:
        return not self._paused and not self._closing

    # Ending

    def close(self) -> None:
        if self._closing:
            return
        self._closing = True
        if self._open:
            self._open = False
            # close_notify; the client's is not waited for (SSLWantReadError says it is not
            # here yet).
            with contextlib.suppress(ssl.SSLError):
                self._c.shutdown()
            self._flush()
        self._raw.close()

    def abort(self) -> None:
        self._closing = True
        self._open = False
        self._raw.abort()

    def _fail(self, exc: ssl.SSLError) -> None:
        log.debug("TLS connection failed: %s", exc)
        self._flush()  # OpenSSL's alert, if it wrote one
        self._closing = True
        self._open = False
        self._raw.close()

    def is_closing(self) -> bool:
        return self._closing

    # What the application protocol may ask

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        sslobj = self._sslobj
        if name == "ssl_object":
            return sslobj
        if name == "sslcontext":
            return self._context
        if sslobj is not None:
            if name == "peercert":
                return sslobj.getpeercert()
            if name == "cipher":
                return sslobj.cipher()
            if name == "compression":
                return sslobj.compression()
        if self._raw is None:
            return default
        return self._raw.get_extra_info(name, default)

    def get_protocol(self) -> asyncio.BaseProtocol:
        return self._app

    def set_protocol(self, protocol: asyncio.BaseProtocol) -> None:
        self._app = protocol  # type: ignore[assignment]
