"""The TLS tables of interknit.toml, shared by every section that speaks TLS: a listener's or
the registry API's ``tls`` (a server), a route's or a service's ``upstream_tls`` and the
registry's ``client_tls`` (a client). Files are checked when the config loads: a missing,
unreadable, expired or mismatched certificate or key stops the node with one line naming
the key (``listeners[0].tls.key: ... is not the key of the certificate in ...``)."""

from __future__ import annotations

from typing import Annotated

from pydantic import Field, model_validator

from interknit.sections import Seconds, Section
from interknit.tls.client import ClientTlsSpec
from interknit.tls.files import TlsFileError
from interknit.tls.server import DEFAULT_CIPHERS, CertSpec, MinVersion, ServerTlsSpec, VerifyClient

_Path = Annotated[str, Field(min_length=1, max_length=4096)]


class CertSection(Section):
    cert: _Path
    key: _Path
    ocsp: _Path | None = None
    names: list[Annotated[str, Field(max_length=253)]] = Field(default_factory=list)


class ServerTlsSection(Section):
    """``{ cert, key }`` or ``{ certs = [{ cert, key }, ...] }``, and the settings."""

    cert: _Path | None = None
    key: _Path | None = None
    ocsp: _Path | None = None
    certs: list[CertSection] = Field(default_factory=list)
    min_version: MinVersion = "1.2"
    ciphers: Annotated[str, Field(min_length=1, max_length=2048)] = DEFAULT_CIPHERS
    alpn: list[Annotated[str, Field(min_length=1, max_length=255)]] | None = None
    client_ca: _Path | None = None
    verify_client: VerifyClient = "none"
    strict_sni: bool = False
    session_tickets: bool = True
    session_cache: bool = True
    ticket_rotation: Seconds = 3600.0

    @model_validator(mode="after")
    def _files(self) -> ServerTlsSection:
        if self.certs and (self.cert or self.key or self.ocsp):
            raise ValueError("give cert and key, or certs = [...], not both")
        if not self.certs and (self.cert is None or self.key is None):
            missing = "key" if self.cert is not None else "cert"
            raise ValueError(f"{missing}: a certificate and its key are required")
        if self.verify_client == "none" and self.client_ca is not None:
            raise ValueError("verify_client: 'optional' or 'required' with client_ca")
        try:
            self.to_spec().validate()
        except TlsFileError as exc:
            raise ValueError(str(exc)) from None
        return self

    def to_spec(self, alpn: tuple[str, ...] = ()) -> ServerTlsSpec:
        if self.certs:
            certs = tuple(
                CertSpec(c.cert, c.key, c.ocsp, tuple(n.lower() for n in c.names))
                for c in self.certs
            )
        else:
            assert self.cert is not None and self.key is not None
            certs = (CertSpec(self.cert, self.key, self.ocsp),)
        return ServerTlsSpec(
            certs=certs,
            min_version=self.min_version,
            ciphers=self.ciphers,
            alpn=tuple(self.alpn) if self.alpn is not None else alpn,
            client_ca=self.client_ca,
            verify_client=self.verify_client,
            strict_sni=self.strict_sni,
            session_tickets=self.session_tickets,
            session_cache=self.session_cache,
            ticket_rotation=self.ticket_rotation,
        )


class ClientTlsSection(Section):
    """curl's ``--cacert``, ``--cert``, ``--key``; ``sni``: the name to send and verify;
    ``verify = false``: any certificate (encrypted, not authenticated)."""

    ca: _Path | None = None
    cert: _Path | None = None
    key: _Path | None = None
    sni: Annotated[str, Field(min_length=1, max_length=253)] | None = None
    verify: bool = True
    min_version: MinVersion = "1.2"

    @model_validator(mode="after")
    def _files(self) -> ClientTlsSection:
        try:
            self.to_spec().validate()
        except TlsFileError as exc:
            raise ValueError(str(exc)) from None
        return self

    def to_spec(self, alpn: tuple[str, ...] = ()) -> ClientTlsSpec:
        return ClientTlsSpec(
            ca=self.ca,
            cert=self.cert,
            key=self.key,
            sni=self.sni,
            verify=self.verify,
            min_version=self.min_version,
            alpn=alpn,
        )
