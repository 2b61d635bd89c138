"""Client-side TLS: to upstreams, in health checks, to the registry API, to etcd.

``ClientTlsSpec`` is what a config says (curl's ``--cacert``, ``--cert``, ``--key``, and the
name to send and verify); ``client_context`` turns it into an ``ssl.SSLContext``, after the
same file checks the server side makes.
"""

from __future__ import annotations

import ssl
from dataclasses import dataclass

from interknit.tls.files import TlsFileError, check_certificates, check_pair
from interknit.tls.server import VERSIONS, MinVersion, file_stamps


@dataclass(frozen=True, slots=True)
class ClientTlsSpec:
    """``ca``: the CA bundle that signs the server's certificate (None: the system's roots).
    ``cert``/``key``: a client certificate, for servers that ask for one (mTLS). ``sni``: the
    name sent and verified (None: the host connected to, which may be an address).
    ``verify = False`` accepts any certificate (encrypted, not authenticated)."""

    ca: str | None = None
    cert: str | None = None
    key: str | None = None
    sni: str | None = None
    verify: bool = True
    min_version: MinVersion = "1.2"
    alpn: tuple[str, ...] = ()

    @property
    def files(self) -> tuple[str, ...]:
        return tuple(f for f in (self.ca, self.cert, self.key) if f)

    def validate(self) -> None:
        if (self.cert is None) != (self.key is None):
            raise TlsFileError("cert: cert and key go together (a client certificate and its key)")
        if self.ca is not None:
            check_certificates(self.ca, "ca")
        if self.cert is not None and self.key is not None:
            check_pair(self.cert, self.key)

    def server_hostname(self, host: str) -> str:
        return self.sni or host


def client_context(spec: ClientTlsSpec) -> ssl.SSLContext:
    """A context for ``spec`` (TlsFileError if a file is unusable)."""
    spec.validate()
    ctx = ssl.create_default_context(cafile=spec.ca)
    ctx.minimum_version = VERSIONS[spec.min_version]
    if spec.cert is not None and spec.key is not None:
        ctx.load_cert_chain(spec.cert, spec.key)
    if not spec.verify:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    if spec.alpn:
        ctx.set_alpn_protocols(list(spec.alpn))
    return ctx


class ClientTls:
    """A spec's context, rebuilt when one of its files changes (``refresh``)."""

    __slots__ = ("context", "spec", "stamps")

    def __init__(self, spec: ClientTlsSpec) -> None:
        self.spec = spec
        self.context = client_context(spec)
        self.stamps = file_stamps(spec.files)

    def current_stamps(self) -> tuple[tuple[int, int, int], ...]:
        return file_stamps(self.spec.files)

    def refresh(self, force: bool = False) -> bool:
        """Rebuild if a file changed (or ``force``); True if it did (TlsFileError: the old
        one stays)."""
        stamps = self.current_stamps()
        if stamps == self.stamps and not force:
            return False
        self.context = client_context(self.spec)
        self.stamps = stamps
        return True


def api_context(
    cacert: str | None = None, cert: str | None = None, key: str | None = None
) -> ssl.SSLContext | None:
    """What a client of the registry API (the CLI, ``interknit.client``, an agent, a worker)
    uses for ``https://`` nodes: trust ``cacert`` (else the system's roots) and present
    ``cert``/``key`` to a node that asks for a client certificate. None when nothing is
    given (the default verification of the HTTP client applies). TlsFileError names the
    option at fault (``cacert``, ``cert``, ``key``)."""
    if cacert is None and cert is None and key is None:
        return None
    if (cert is None) != (key is None):
        raise TlsFileError("cert: --cert and --key go together (a certificate and its key)")
    if cacert is not None:
        try:
            check_certificates(cacert, "cacert")
        except TlsFileError:
            raise
    return client_context(ClientTlsSpec(ca=cacert, cert=cert, key=key))
