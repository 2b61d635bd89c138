"""What Python's ``ssl`` module does not offer a server, asked of the same OpenSSL directly.

Two things a TLS edge needs have no Python API: stapling an OCSP response to the handshake
(OpenSSL's status callback) and session tickets under keys that rotate while old tickets still
resume (OpenSSL's ticket key callback; without it a context has one random key for its whole
life). A listener terminates TLS with ``ssl.SSLContext.wrap_bio`` (``tls/transport.py``), so
whatever is set on the context's ``SSL_CTX`` applies to every connection it accepts.

The ``SSL_CTX`` is reached through ctypes, in the very libssl that Python's ``_ssl`` module is
linked with (its symbols resolve through that module's handle: two copies of OpenSSL must never
meet). A ``ssl.SSLContext`` object is ``PyObject_HEAD`` followed by its ``SSL_CTX *`` in every
CPython this project supports; ``ctx_pointer`` checks that what it found there is the context's
by reading the options through OpenSSL and comparing them with ``SSLContext.options``, and
refuses otherwise, so a different layout is a clear error and never a crash.

Callbacks run inside ``SSL_do_handshake``, on the event loop's thread, with the GIL taken by
ctypes; they must not raise (a Python exception cannot cross OpenSSL), so each catches
everything and answers the safe way (no staple; no ticket, hence a full handshake).
"""

from __future__ import annotations

import ctypes
import logging
import os
import ssl
from typing import Any

log = logging.getLogger("interknit.tls")

# ssl.h / tls1.h (OpenSSL 1.1.1 and 3.x alike)
_SSL_CTRL_SET_SESS_CACHE_MODE = 44
_SSL_SESS_CACHE_OFF = 0
_SSL_CTRL_SET_TLSEXT_STATUS_REQ_CB = 63
_SSL_CTRL_SET_TLSEXT_STATUS_REQ_OCSP_RESP = 71
_SSL_TLSEXT_ERR_OK = 0
_SSL_TLSEXT_ERR_NOACK = 3
_TLS1_3_VERSION = 0x0304
# params.h
_OSSL_PARAM_UTF8_STRING = 4
_OSSL_PARAM_OCTET_STRING = 5
_OSSL_PARAM_UNMODIFIED = ctypes.c_size_t(-1).value

TICKET_NAME_BYTES = 16
_TICKET_HMAC_BYTES = 32
_TICKET_AES_BYTES = 32
_IV_BYTES = 16


class NativeUnavailable(RuntimeError):
    """This Python's OpenSSL cannot be reached as ``native`` expects."""


class _OsslParam(ctypes.Structure):
    _fields_ = (
        ("key", ctypes.c_char_p),
        ("data_type", ctypes.c_uint),
        ("data", ctypes.c_void_p),
        ("data_size", ctypes.c_size_t),
        ("return_size", ctypes.c_size_t),
    )


_STATUS_CB = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p)
_TICKET_CB = ctypes.CFUNCTYPE(
    ctypes.c_int,
    ctypes.c_void_p,  # SSL *
    ctypes.c_void_p,  # unsigned char key_name[16]
    ctypes.c_void_p,  # unsigned char *iv
    ctypes.c_void_p,  # EVP_CIPHER_CTX *
    ctypes.c_void_p,  # EVP_MAC_CTX *
    ctypes.c_int,  # enc
)


class _Lib:
    """The functions used, typed once."""

    def __init__(self) -> None:
        import _ssl

        try:
            path: str | None = _ssl.__file__
        except AttributeError:
            path = None  # built into the interpreter: its symbols are the program's own
        lib = ctypes.CDLL(path) if path else ctypes.CDLL(None)

        def fn(name: str, restype: Any, *argtypes: Any) -> Any:
            f = getattr(lib, name)
            f.restype = restype
            f.argtypes = argtypes
            return f

        vp, c_long, c_int = ctypes.c_void_p, ctypes.c_long, ctypes.c_int
        self.ctx_get_options = fn("SSL_CTX_get_options", ctypes.c_uint64, vp)
        self.ctx_ctrl = fn("SSL_CTX_ctrl", c_long, vp, c_int, c_long, vp)
        self.ctx_callback_ctrl = fn("SSL_CTX_callback_ctrl", c_long, vp, c_int, vp)
        self.ctx_get0_certificate = fn("SSL_CTX_get0_certificate", vp, vp)
        self.ctx_set_timeout = fn("SSL_CTX_set_timeout", c_long, vp, c_long)
        self.ssl_ctrl = fn("SSL_ctrl", c_long, vp, c_int, c_long, vp)
        self.ssl_get_certificate = fn("SSL_get_certificate", vp, vp)
        self.ssl_version = fn("SSL_version", c_int, vp)
        self.crypto_malloc = fn("CRYPTO_malloc", vp, ctypes.c_size_t, ctypes.c_char_p, c_int)
        self.rand_bytes = fn("RAND_bytes", c_int, vp, c_int)
        self.aes_256_cbc = fn("EVP_aes_256_cbc", vp)
        self.encrypt_init = fn("EVP_EncryptInit_ex", c_int, vp, vp, vp, vp, vp)
        self.decrypt_init = fn("EVP_DecryptInit_ex", c_int, vp, vp, vp, vp, vp)
        try:
            self.set_ticket_cb = fn("SSL_CTX_set_tlsext_ticket_key_evp_cb", c_int, vp, vp)
            self.mac_set_params = fn("EVP_MAC_CTX_set_params", c_int, vp, vp)
        except AttributeError:
            self.set_ticket_cb = None  # OpenSSL 1.1.1: no rotated ticket keys
            self.mac_set_params = None


_LIB: _Lib | None = None


def lib() -> _Lib:
    global _LIB
    if _LIB is None:
        try:
            _LIB = _Lib()
        except (OSError, AttributeError) as exc:
            raise NativeUnavailable(f"cannot reach Python's OpenSSL: {exc}") from None
    return _LIB


def ctx_pointer(ctx: ssl.SSLContext) -> int:
    """The ``SSL_CTX *`` of ``ctx``, checked (NativeUnavailable if it cannot be trusted)."""
    native = lib()
    pointer = ctypes.c_void_p.from_address(id(ctx) + object.__basicsize__).value
    if not pointer:
        raise NativeUnavailable("no SSL_CTX where CPython keeps it")
    # Two different option sets, each read back through OpenSSL: a stray pointer that happens
    # to hold one is not going to hold both.
    saved = ctx.options
    try:
        for probe in (saved | ssl.OP_NO_COMPRESSION, saved & ~ssl.OP_NO_COMPRESSION):
            ctx.options = probe
            if native.ctx_get_options(pointer) != int(ctx.options):
                raise NativeUnavailable("the SSL_CTX found does not hold the context's options")
    finally:
        ctx.options = saved
    return int(pointer)


def set_session_timeout(ctx: ssl.SSLContext, seconds: int) -> None:
    """How long a session (and a ticket's lifetime hint) stays resumable."""
    lib().ctx_set_timeout(ctx_pointer(ctx), seconds)


def session_cache_off(ctx: ssl.SSLContext) -> None:
    """No server-side session cache: with tickets off too, every handshake is a full one."""
    lib().ctx_ctrl(ctx_pointer(ctx), _SSL_CTRL_SET_SESS_CACHE_MODE, _SSL_SESS_CACHE_OFF, None)


def certificate_pointer(ctx: ssl.SSLContext) -> int:
    """The ``X509 *`` most recently loaded into ``ctx`` (to tell its handshakes apart)."""
    return int(lib().ctx_get0_certificate(ctx_pointer(ctx)) or 0)


class OcspStapler:
    """Staples a DER OCSP response to handshakes that ask for the certificate's status.

    One per context; ``responses`` maps the ``X509 *`` a handshake chose (a context may hold
    an ECDSA and an RSA certificate) to its response. The table may be replaced at any time.
    """

    def __init__(self, ctx: ssl.SSLContext) -> None:
        self.responses: dict[int, bytes] = {}
        self._native = lib()
        self._callback = _STATUS_CB(self._status)  # kept: OpenSSL holds only the pointer
        pointer = ctx_pointer(ctx)
        callback = ctypes.cast(self._callback, ctypes.c_void_p)
        self._native.ctx_callback_ctrl(pointer, _SSL_CTRL_SET_TLSEXT_STATUS_REQ_CB, callback)
        self._ctx = ctx  # the callback must not outlive the context's use of it

    def _status(self, ssl_pointer: int, _arg: int) -> int:
        try:
            native = self._native
            response = self.responses.get(native.ssl_get_certificate(ssl_pointer) or 0)
            if response is None:
                return _SSL_TLSEXT_ERR_NOACK
            # OpenSSL takes the buffer and frees it with the handshake: it must be its own.
            buffer = native.crypto_malloc(len(response), b"interknit.tls", 0)
            if not buffer:
                return _SSL_TLSEXT_ERR_NOACK
            ctypes.memmove(buffer, response, len(response))
            native.ssl_ctrl(
                ssl_pointer, _SSL_CTRL_SET_TLSEXT_STATUS_REQ_OCSP_RESP, len(response), buffer
            )
            return _SSL_TLSEXT_ERR_OK
        except BaseException:  # nothing may cross OpenSSL
            log.exception("OCSP staple failed")
            return _SSL_TLSEXT_ERR_NOACK


class _TicketKey:
    """A ticket key: its name (sent in the ticket), HMAC-SHA256 and AES-256-CBC keys, and the
    OSSL_PARAM array that hands the HMAC key to OpenSSL, built once."""

    __slots__ = ("_digest", "aes", "hmac", "name", "params")

    def __init__(self, secret: bytes) -> None:
        assert len(secret) == TICKET_NAME_BYTES + _TICKET_HMAC_BYTES + _TICKET_AES_BYTES
        self.name = secret[:TICKET_NAME_BYTES]
        self.hmac = ctypes.create_string_buffer(
            secret[TICKET_NAME_BYTES : TICKET_NAME_BYTES + _TICKET_HMAC_BYTES],
            _TICKET_HMAC_BYTES,
        )
        self.aes = ctypes.create_string_buffer(secret[-_TICKET_AES_BYTES:], _TICKET_AES_BYTES)
        self._digest = ctypes.create_string_buffer(b"SHA256")
        self.params = (_OsslParam * 3)(
            _OsslParam(
                b"key",
                _OSSL_PARAM_OCTET_STRING,
                ctypes.cast(self.hmac, ctypes.c_void_p),
                _TICKET_HMAC_BYTES,
                _OSSL_PARAM_UNMODIFIED,
            ),
            _OsslParam(
                b"digest",
                _OSSL_PARAM_UTF8_STRING,
                ctypes.cast(self._digest, ctypes.c_void_p),
                6,
                _OSSL_PARAM_UNMODIFIED,
            ),
            _OsslParam(None, 0, None, 0, 0),
        )


class TicketKeys:
    """Session tickets under keys that rotate: the newest key seals new tickets, the older
    ones (``keep`` in all) still open the tickets they sealed, which are then re-issued under
    the newest. A ticket whose key is gone means a full handshake, nothing worse.

    Installed on the context a server socket was created with (OpenSSL takes the ticket
    callback of the session's first context, whatever SNI switches to). ``rotate()`` is
    called by the owner's timer; ``keys`` may be given (a key file shared by processes).
    """

    SECRET_BYTES = TICKET_NAME_BYTES + _TICKET_HMAC_BYTES + _TICKET_AES_BYTES

    def __init__(self, ctx: ssl.SSLContext, keep: int = 3) -> None:
        native = lib()
        if native.set_ticket_cb is None:
            raise NativeUnavailable("this OpenSSL has no ticket key callback (OpenSSL 3 has)")
        self._native = native
        self._cipher = native.aes_256_cbc()  # a static table of OpenSSL's: fetched once
        self.keep = keep
        self._keys: list[_TicketKey] = []
        self._by_name: dict[bytes, _TicketKey] = {}
        self.rotate()
        self._callback = _TICKET_CB(self._ticket)  # kept: OpenSSL holds only the pointer
        native.set_ticket_cb(ctx_pointer(ctx), ctypes.cast(self._callback, ctypes.c_void_p))
        self._ctx = ctx
        self.sealed = 0
        self.opened = 0
        self.unknown = 0

    def rotate(self, secret: bytes | None = None) -> None:
        """A new key seals tickets from now on; the oldest beyond ``keep`` is forgotten."""
        key = _TicketKey(secret if secret is not None else os.urandom(self.SECRET_BYTES))
        self._keys = [key, *self._keys][: self.keep]
        self._by_name = {k.name: k for k in self._keys}

    @property
    def names(self) -> list[bytes]:
        return [k.name for k in self._keys]

    def _ticket(
        self, _ssl: int, key_name: int, iv: int, cipher_ctx: int, mac_ctx: int, enc: int
    ) -> int:
        try:
            native = self._native
            if enc:
                key = self._keys[0]
                if native.rand_bytes(iv, _IV_BYTES) != 1:
                    return -1
                ctypes.memmove(key_name, key.name, TICKET_NAME_BYTES)
                if native.encrypt_init(cipher_ctx, self._cipher, None, key.aes, iv) != 1:
                    return -1
                if native.mac_set_params(mac_ctx, key.params) != 1:
                    return -1
                self.sealed += 1
                return 1
            found = self._by_name.get(ctypes.string_at(key_name, TICKET_NAME_BYTES))
            if found is None:
                self.unknown += 1
                return 0  # not ours (any more): a full handshake
            if native.decrypt_init(cipher_ctx, self._cipher, None, found.aes, iv) != 1:
                return -1
            if native.mac_set_params(mac_ctx, found.params) != 1:
                return -1
            self.opened += 1
            # 2: good, and OpenSSL issues a fresh ticket. Over TLS 1.3 always (as nginx
            # does): a client uses each ticket once (RFC 8446 C.4), and with 1 OpenSSL sends
            # none after a resumption, so every other connection was a full handshake. Over
            # TLS 1.2 when the ticket was sealed under an older key.
            if found is not self._keys[0] or native.ssl_version(_ssl) == _TLS1_3_VERSION:
                return 2
            return 1
        except BaseException:  # nothing may cross OpenSSL
            log.exception("session ticket callback failed")
            return 0 if not enc else -1
