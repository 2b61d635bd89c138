"""Server-side TLS: the contexts a listener terminates with, chosen by SNI, reloaded in place.

A listening socket keeps the one ``ssl.SSLContext`` it was created with (the "front"). Every
handshake asks the front's SNI callback, which picks the context holding the certificate for
the name the client sent (exact names first, then a wildcard one label deep, then the first
certificate) and switches the connection to it. A reload builds new certificate contexts and
swaps the table the callback reads: connections already open keep the context they
negotiated, new ones get the new certificates, and nothing is closed. The front's protocol
settings (versions, ciphers, client verification) are set in place the same way.

Certificates for the same names with different key types (an ECDSA and an RSA one) share a
context: OpenSSL then picks per handshake the one the client can verify, as HAProxy does with
``.ecdsa``/``.rsa`` bundles.
"""

from __future__ import annotations

import logging
import os
import ssl
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

from interknit.names import is_hostname
from interknit.tls import native
from interknit.tls.files import CertInfo, TlsFileError, check_certificates, check_ocsp, check_pair

log = logging.getLogger("interknit.tls")

# Mozilla's "intermediate" TLS 1.2 suites: forward secrecy and AEAD only. TLS 1.3's suites are
# OpenSSL's own (all AEAD).
DEFAULT_CIPHERS = ":".join(
    (
        "ECDHE-ECDSA-AES128-GCM-SHA256",
        "ECDHE-RSA-AES128-GCM-SHA256",
        "ECDHE-ECDSA-AES256-GCM-SHA384",
        "ECDHE-RSA-AES256-GCM-SHA384",
        "ECDHE-ECDSA-CHACHA20-POLY1305",
        "ECDHE-RSA-CHACHA20-POLY1305",
    )
)
VERSIONS = {"1.2": ssl.TLSVersion.TLSv1_2, "1.3": ssl.TLSVersion.TLSv1_3}
MinVersion = Literal["1.2", "1.3"]
_Ctx = ssl.SSLContext
VerifyClient = Literal["none", "optional", "required"]


@dataclass(frozen=True, slots=True)
class CertSpec:
    """A certificate (PEM, leaf first, then its chain), its key, and optionally a DER OCSP
    response to staple. ``names``: the SNI names it serves; empty: the certificate's own DNS
    names (subjectAltName, else CN), wildcards included."""

    cert: str
    key: str
    ocsp: str | None = None
    names: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class ServerTlsSpec:
    """How a listener terminates TLS. The first certificate is the default: for clients that
    send no SNI or a name no certificate has (unless ``strict_sni``, which refuses them)."""

    certs: tuple[CertSpec, ...]
    min_version: MinVersion = "1.2"
    ciphers: str = DEFAULT_CIPHERS
    alpn: tuple[str, ...] = ("http/1.1",)
    client_ca: str | None = None
    verify_client: VerifyClient = "none"
    strict_sni: bool = False
    session_tickets: bool = True
    # Resumption by session id (TLS 1.2), and by stateful tickets (TLS 1.3 without tickets).
    session_cache: bool = True
    # A new ticket key this often; tickets sealed under the two before it still resume.
    ticket_rotation: float = 3600.0
    _files: tuple[str, ...] = field(default=(), init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        files = [self.client_ca] if self.client_ca else []
        for c in self.certs:
            files += [c.cert, c.key] + ([c.ocsp] if c.ocsp else [])
        object.__setattr__(self, "_files", tuple(files))

    @property
    def files(self) -> tuple[str, ...]:
        """Every file it reads: a change to one of them reloads the certificates."""
        return self._files

    def validate(self) -> None:
        """Every file usable now (TlsFileError naming the field, ``certs[1].key: ...``)."""
        _load_all(self)


def _load_all(spec: ServerTlsSpec) -> list[_Loaded]:
    if not spec.certs:
        raise TlsFileError("cert: a certificate and its key are required")
    if spec.verify_client != "none" and spec.client_ca is None:
        raise TlsFileError("client_ca: verify_client needs the CA that signs client certs")
    if spec.client_ca is not None:
        check_certificates(spec.client_ca, "client_ca")
    try:
        ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER).set_ciphers(spec.ciphers)
    except ssl.SSLError:
        raise TlsFileError("ciphers: OpenSSL knows none of these cipher suites") from None
    if not 60.0 <= spec.ticket_rotation <= 7 * 86400.0:
        raise TlsFileError("ticket_rotation: must be between 1m and 7d")
    return [
        _check_cert(c, f"certs[{i}]." if len(spec.certs) > 1 else "")
        for i, c in enumerate(spec.certs)
    ]


@dataclass(frozen=True, slots=True)
class _Loaded:
    spec: CertSpec
    info: CertInfo
    ocsp: bytes | None


def _check_cert(c: CertSpec, prefix: str) -> _Loaded:
    info = check_pair(c.cert, c.key, cert_field=f"{prefix}cert", key_field=f"{prefix}key")
    ocsp = check_ocsp(c.ocsp, info, field=f"{prefix}ocsp") if c.ocsp else None
    for name in c.names:
        if not valid_sni_pattern(name):
            raise TlsFileError(f"{prefix}names: {name!r} is not a host name or '*.domain'")
    return _Loaded(c, info, ocsp)


def valid_sni_pattern(name: str) -> bool:
    """A host name, or ``*.`` and a host name (a wildcard covers one label)."""
    return is_hostname(name[2:] if name.startswith("*.") else name)


def normalize(name: str) -> str:
    return name.rstrip(".").lower()


def lookup(name: str | None, exact: dict[str, _Ctx], wildcard: dict[str, _Ctx]) -> _Ctx | None:
    """The context for SNI ``name``: exact, then ``*.`` one label deep; None: no match."""
    if not name:
        return None
    name = normalize(name)
    found = exact.get(name)
    if found is None:
        _, dot, parent = name.partition(".")
        if dot:
            found = wildcard.get(parent)
    return found


@dataclass(slots=True)
class _Table:
    exact: dict[str, _Ctx]
    wildcard: dict[str, _Ctx]  # "example.com" for "*.example.com"
    default: _Ctx
    staplers: list[native.OcspStapler]
    infos: list[CertInfo]


class ServerTls:
    """The contexts of one listener. ``context`` is what the server socket is created with;
    ``reload(spec)`` swaps certificates and settings for new handshakes."""

    def __init__(self, spec: ServerTlsSpec) -> None:
        self.spec = spec
        self.context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.tickets: native.TicketKeys | None = None
        self._configure(self.context, spec)
        self._table = self._build(spec)
        # The front holds the default certificate too: an SNI callback that switches to a
        # context is the rule, but OpenSSL needs a certificate before choosing a cipher.
        default = spec.certs[0]
        self.context.load_cert_chain(default.cert, default.key)
        self.context.sni_callback = self._choose
        if spec.session_tickets:
            self.tickets = native.TicketKeys(self.context)
            native.set_session_timeout(self.context, int(spec.ticket_rotation))
            # TLS 1.3: one ticket per handshake (OpenSSL sends two after a full one), as a
            # client resumes one connection with one; each costs a call into Python to seal.
            self.context.num_tickets = 1
        else:
            self.context.options |= ssl.OP_NO_TICKET
        if not spec.session_cache:
            native.session_cache_off(self.context)
        self.rotated_at = time.monotonic()
        self.stamps = file_stamps(spec.files)

    @property
    def certificates(self) -> list[CertInfo]:
        return list(self._table.infos)

    def reload(self, spec: ServerTlsSpec) -> None:
        """New certificates and settings for new handshakes (TlsFileError: nothing changed).

        Whether tickets are issued at all is fixed at start (a restart changes it)."""
        table = self._build(spec)
        self._configure(self.context, spec)
        default = spec.certs[0]
        self.context.load_cert_chain(default.cert, default.key)
        self._table = table
        self.spec = spec
        self.stamps = file_stamps(spec.files)

    def files_changed(self) -> bool:
        return self.current_stamps() != self.stamps

    def current_stamps(self) -> tuple[tuple[int, int, int], ...]:
        return file_stamps(self.spec.files)

    def rotate_tickets(self, now: float | None = None) -> bool:
        """Rotate the ticket key when ``ticket_rotation`` has passed; True if it did."""
        now = time.monotonic() if now is None else now
        if self.tickets is None or now - self.rotated_at < self.spec.ticket_rotation:
            return False
        self.tickets.rotate()
        self.rotated_at = now
        return True

    # The SNI callback (runs inside the handshake: must not raise)

    def _choose(self, sslobj: ssl.SSLObject, server_name: str | None, _ctx: _Ctx) -> int | None:
        table = self._table
        ctx = lookup(server_name, table.exact, table.wildcard)
        if ctx is None:
            if self.spec.strict_sni:
                return ssl.ALERT_DESCRIPTION_UNRECOGNIZED_NAME
            ctx = table.default
        # The name, for listeners that route by it after terminating (see sni_of).
        sslobj.interknit_sni = normalize(server_name) if server_name else None  # type: ignore[attr-defined]
        sslobj.context = ctx
        return None

    # Building

    def _configure(self, ctx: _Ctx, spec: ServerTlsSpec) -> None:
        ctx.minimum_version = VERSIONS[spec.min_version]
        ctx.maximum_version = ssl.TLSVersion.MAXIMUM_SUPPORTED
        ctx.set_ciphers(spec.ciphers)
        ctx.options |= (
            ssl.OP_CIPHER_SERVER_PREFERENCE
            | ssl.OP_NO_COMPRESSION
            | ssl.OP_NO_RENEGOTIATION
            | ssl.OP_SINGLE_ECDH_USE
        )
        if spec.alpn:
            ctx.set_alpn_protocols(list(spec.alpn))
        if spec.client_ca is not None:
            ctx.load_verify_locations(cafile=spec.client_ca)
        ctx.verify_mode = {
            "none": ssl.CERT_NONE,
            "optional": ssl.CERT_OPTIONAL,
            "required": ssl.CERT_REQUIRED,
        }[spec.verify_client]

    def _build(self, spec: ServerTlsSpec) -> _Table:
        loaded = _load_all(spec)
        # One context per set of names: an ECDSA and an RSA certificate for the same names
        # load into the same context, and OpenSSL chooses between them per handshake.
        groups: dict[tuple[str, ...], list[_Loaded]] = {}
        for item in loaded:
            names = tuple(sorted({normalize(n) for n in (item.spec.names or item.info.names)}))
            groups.setdefault(names, []).append(item)
        exact: dict[str, _Ctx] = {}
        wildcard: dict[str, _Ctx] = {}
        staplers: list[native.OcspStapler] = []
        default: _Ctx | None = None
        for names, items in groups.items():
            ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            self._configure(ctx, spec)
            responses: dict[int, bytes] = {}
            for item in items:
                ctx.load_cert_chain(item.spec.cert, item.spec.key)
                if item.ocsp is not None:
                    responses[native.certificate_pointer(ctx)] = item.ocsp
            if responses:
                stapler = native.OcspStapler(ctx)
                stapler.responses = responses
                staplers.append(stapler)
            if default is None:
                default = ctx
            for name in names:
                if name.startswith("*."):
                    wildcard.setdefault(name[2:], ctx)
                else:
                    exact.setdefault(name, ctx)
        assert default is not None
        return _Table(exact, wildcard, default, staplers, [item.info for item in loaded])


def sni_matches(pattern: str, name: str) -> bool:
    """``name`` (normalized) is ``pattern``, or ``pattern`` is ``*.parent`` and ``name`` is
    one label under ``parent``."""
    pattern = normalize(pattern)
    if pattern.startswith("*."):
        _, dot, parent = name.partition(".")
        return bool(dot) and parent == pattern[2:]
    return name == pattern


def sni_of(sslobj: object) -> str | None:
    """The SNI name a terminated connection's client sent (None: none)."""
    try:
        name: str | None = sslobj.interknit_sni  # type: ignore[attr-defined]
    except AttributeError:
        return None  # no handshake of ours (a plain transport)
    return name


def file_stamps(paths: Sequence[str]) -> tuple[tuple[int, int, int], ...]:
    """What tells a changed file from an unchanged one, cheaply: inode, size, mtime."""
    out = []
    for path in paths:
        try:
            st = os.stat(path)
        except OSError:
            out.append((0, -1, 0))
            continue
        out.append((st.st_ino, st.st_size, st.st_mtime_ns))
    return tuple(out)
