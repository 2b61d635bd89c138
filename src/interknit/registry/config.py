"""The registry's sections of interknit.toml: ``[registry]`` (where its API listens, which
store, tokens) and ``[[services]]`` (static instances, registered at start-up)."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, model_validator

from interknit.registry.schema import CheckBody
from interknit.sections import HostPort, Label, ReadableFile, Seconds, Section, Server
from interknit.tls.client import ClientTlsSpec
from interknit.tls.config import ClientTlsSection, ServerTlsSection


class TokensSection(Section):
    read: list[Annotated[str, Field(min_length=8, max_length=256)]] = Field(default_factory=list)
    write: list[Annotated[str, Field(min_length=8, max_length=256)]] = Field(default_factory=list)


class EtcdTlsSection(Section):
    """etcdctl's --cacert, --cert and --key, for https:// endpoints."""

    ca: ReadableFile | None = None  # none: the system's root certificates
    cert: ReadableFile | None = None
    key: ReadableFile | None = None

    @model_validator(mode="after")
    def _pair(self) -> EtcdTlsSection:
        if (self.cert is None) != (self.key is None):
            raise ValueError("cert and key go together (the client's certificate and its key)")
        return self


class RegistrySection(Section):
    listen: HostPort = "127.0.0.1:7470"
    backend: Literal["embedded", "etcd"] = "embedded"
    etcd: list[str] = Field(default_factory=lambda: ["http://127.0.0.1:2379"])
    etcd_tls: EtcdTlsSection | None = None
    etcd_prefix: str = "/interknit/"
    etcd_timeout: Seconds = 2.0
    node_ttl: Seconds = 10.0  # a node's lease: its instances go this long after it dies
    tokens: TokensSection = Field(default_factory=TokensSection)
    history: Annotated[int, Field(ge=100, le=1_000_000)] = 10_000
    # The API over https: its certificate, and client certificates it asks for (mTLS).
    tls: ServerTlsSection | None = None
    # How this node's own processes (--workers) reach the API when it speaks https: the CA
    # that signs its certificate, and a client certificate when the API requires one.
    client_tls: ClientTlsSection | None = None
    # A registry API on a non-loopback address with no write tokens refuses to start unless
    # this says that anyone who can reach it may write (etcd and Consul only warn).
    allow_anonymous_writes: bool = False
    # Open connections to the API (both its paths, watches included); more are answered 503.
    max_connections: Annotated[int, Field(ge=1, le=1_000_000)] = 10_000


class ServiceSection(Section):
    name: Label
    instances: list[Server] = Field(default_factory=list)
    check: CheckBody | None = None  # the API's model: config and API accept the same checks
    tags: list[Label] = Field(default_factory=list)
    weight: Annotated[int, Field(ge=1, le=1000)] = 1
    zone: Label | None = None
    region: Label | None = None
    ttl: Seconds | None = None  # DNS TTL for this service
    # How its instances are reached over TLS: by the proxy's routes to it (unless a route
    # says otherwise) and by its HTTP health checks, which then speak https.
    upstream_tls: ClientTlsSection | None = None


def service_tls(services: list[ServiceSection]) -> dict[str, ClientTlsSpec]:
    """``[[services]] upstream_tls``, by service name."""
    return {s.name: s.upstream_tls.to_spec() for s in services if s.upstream_tls is not None}
