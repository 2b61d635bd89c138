"""The proxy's sections of interknit.toml: ``[[listeners]]`` and their ``[[listeners.routes]]``,
and how they become the proxy's specs (``ListenerSpec``, ``RouteSpec``).

The sections check the shape and the values; the specs' own ``validate()`` then checks what
the proxy needs, so that a route the proxy would refuse is refused at load with its path.
"""

from __future__ import annotations

import re
from typing import Annotated, Literal

from pydantic import AfterValidator, Field, model_validator

from interknit.balance.pool import Policy
from interknit.demand.config import DemandSection
from interknit.names import parse_hostport
from interknit.proxy.spec import UPSTREAM_MAX_IDLE, ListenerSpec, MatchSpec, RouteSpec
from interknit.sections import HostPort, Label, Seconds, Section, Server
from interknit.tls.config import ClientTlsSection, ServerTlsSection


class MatchSection(Section):
    host: str | None = None
    path: str | None = None
    path_prefix: str | None = None
    path_regex: str | None = None
    method: str | None = None
    # name -> exact value, or true: the header only has to be present.
    headers: dict[str, str | Literal[True]] = Field(default_factory=dict)
    # tcp listeners: the server name of the client's TLS ClientHello ("*.example.com" too).
    sni: Annotated[str, Field(min_length=1, max_length=255)] | None = None

    @model_validator(mode="after")
    def _regex(self) -> MatchSection:
        if self.path_regex is not None:
            try:
                re.compile(self.path_regex)
            except re.error as exc:
                raise ValueError(f"path_regex is not a valid regular expression: {exc}") from None
        return self


class StickySection(Section):
    cookie: str


class RetriesSection(Section):
    attempts: Annotated[int, Field(ge=0, le=10)] = 2
    budget: Annotated[float, Field(ge=0.0, le=1.0)] = 0.2
    min: Annotated[int, Field(ge=0, le=1000)] = 3
    backoff: Annotated[Seconds, Field(ge=0.0, le=60.0)] = 0.0


class OutlierSection(Section):
    """Passive outlier detection of the route's pool (Envoy's outlier_detection)."""

    enabled: bool = True
    consecutive_failures: Annotated[int, Field(ge=1, le=1000)] = 5
    base_ejection_time: Seconds = 30.0
    max_ejection_time: Seconds = 300.0
    max_ejection_percent: Annotated[float, Field(ge=0, le=100)] = 50.0
    interval: Seconds = 10.0


class HstsSection(Section):
    """Strict-Transport-Security on responses over TLS (RFC 6797)."""

    max_age: Annotated[int, Field(ge=0, le=10 * 365 * 86400)] = 365 * 86400
    include_subdomains: bool = False
    preload: bool = False

    def value(self) -> str:
        out = f"max-age={self.max_age}"
        if self.include_subdomains:
            out += "; includeSubDomains"
        if self.preload:
            out += "; preload"
        return out


class RouteSection(Section):
    name: str = ""
    match: MatchSection | None = None
    service: Label | None = None
    servers: list[Server] = Field(default_factory=list)
    balance: Policy = "round_robin"
    hash_on: str = "source"  # "source", "header:X-User" or "cookie:session"
    sticky: StickySection | None = None
    retries: RetriesSection = Field(default_factory=RetriesSection)
    timeout: Seconds | None = None
    connect_timeout: Seconds = 2.0
    response_timeout: Seconds | None = 30.0
    idle_timeout: Seconds = 60.0
    slow_start: Seconds | None = None
    panic_threshold: Annotated[float, Field(ge=0.0, le=1.0)] = 0.5
    outlier: OutlierSection = Field(default_factory=OutlierSection)
    demand: DemandSection | None = None
    upstream_tls: ClientTlsSection | None = None
    redirect_https: bool = False
    https_port: Annotated[int, Field(ge=1, le=65535)] = 443
    hsts: HstsSection | None = None

    @model_validator(mode="after")
    def _target(self) -> RouteSection:
        if self.redirect_https:
            if self.service is not None or self.servers:
                raise ValueError("redirect_https: a redirecting route names no service or servers")
        elif (self.service is None) == (not self.servers):
            raise ValueError("a route names either service or servers, not both and not neither")
        self.to_spec().validate()  # the proxy's own checks, named from the route down
        return self

    def to_spec(self) -> RouteSpec:
        match = None
        if self.match is not None:
            m = self.match
            headers = tuple(
                (name, None if value is True else str(value)) for name, value in m.headers.items()
            )
            match = MatchSpec(
                host=m.host,
                path_exact=m.path,
                path_prefix=m.path_prefix,
                path_regex=m.path_regex,
                method=m.method,
                headers=headers,
                sni=m.sni,
            )
        return RouteSpec(
            match=match,
            service=self.service,
            servers=tuple(self.servers),
            name=self.name,
            balance=self.balance,
            hash_on=self.hash_on,
            sticky_cookie=None if self.sticky is None else self.sticky.cookie,
            attempts=self.retries.attempts,
            retry_budget=self.retries.budget,
            retry_min=self.retries.min,
            retry_backoff=self.retries.backoff,
            timeout=self.timeout,
            connect_timeout=self.connect_timeout,
            response_timeout=self.response_timeout,
            idle_timeout=self.idle_timeout,
            upstream_tls=None if self.upstream_tls is None else self.upstream_tls.to_spec(),
            redirect_https=self.redirect_https,
            https_port=self.https_port,
            hsts=None if self.hsts is None else self.hsts.value(),
        )


def _access_log(value: str) -> str:
    if not value or "\0" in value or len(value) > 4096:
        raise ValueError("must be 'off', '-' (stdout) or the path of a file to append to")
    return value


class ListenerSection(Section):
    name: str
    listen: HostPort
    protocol: Literal["http", "tcp"] = "http"
    max_connections: Annotated[int, Field(ge=1)] = 10_000
    header_timeout: Seconds = 10.0
    keepalive_timeout: Seconds = 60.0
    max_header_bytes: Annotated[int, Field(ge=1024, le=1024 * 1024)] = 32 * 1024
    max_headers: Annotated[int, Field(ge=1, le=10_000)] = 100
    abort_on_close: bool = True
    upstream_max_idle: Annotated[int, Field(ge=0, le=UPSTREAM_MAX_IDLE)] = UPSTREAM_MAX_IDLE
    upstream_idle_timeout: Seconds = 60.0
    drain_timeout: Seconds = 10.0
    # "-": stdout; "off"; or a file, appended to (reopened on SIGUSR1).
    access_log: Annotated[str, AfterValidator(_access_log)] = "-"
    tls: ServerTlsSection | None = None
    routes: list[RouteSection] = Field(default_factory=list)

    @model_validator(mode="after")
    def _tcp_routes(self) -> ListenerSection:
        self.to_spec().validate()  # the proxy's own checks, with the route's index
        return self

    def to_spec(self) -> ListenerSpec:
        host, port = parse_hostport(self.listen, port_zero=True)
        return ListenerSpec(
            name=self.name,
            host=host,
            port=port,
            protocol=self.protocol,
            max_connections=self.max_connections,
            header_timeout=self.header_timeout,
            keepalive_timeout=self.keepalive_timeout,
            max_header_bytes=self.max_header_bytes,
            max_headers=self.max_headers,
            abort_on_close=self.abort_on_close,
            upstream_max_idle=self.upstream_max_idle,
            upstream_idle_timeout=self.upstream_idle_timeout,
            access_log=self.access_log,
            routes=tuple(r.to_spec() for r in self.routes),
            # An HTTP listener offers http/1.1 by ALPN; a TCP one offers nothing unless told.
            tls=None
            if self.tls is None
            else self.tls.to_spec(("http/1.1",) if self.protocol == "http" else ()),
        )
