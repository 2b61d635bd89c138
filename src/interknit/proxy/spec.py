"""What a listener is told to do: plain frozen values, built by the node from the TOML config.

Nothing here touches a socket. ``validate()`` on each spec raises ``ValueError`` naming the
field, so that the config loader can prefix the full path (``listeners[0].routes[1].balance``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field, fields
from typing import Literal

from interknit.balance.pool import POLICIES
from interknit.names import parse_hostport
from interknit.tls.client import ClientTlsSpec
from interknit.tls.server import ServerTlsSpec, valid_sni_pattern

# Kept-alive connections per endpoint: as many as the requests in flight needed, in effect (as
# HAProxy's pool-max-conn, unlimited by default); upstream_idle_timeout closes those a burst
# left. A low cap closes, after each burst of more concurrent requests than it, what the next
# burst connects again: with 32 and 50 clients on one endpoint, a connect every 8 requests.
UPSTREAM_MAX_IDLE = 10_000

Protocol = Literal["http", "tcp"]


@dataclass(frozen=True, slots=True)
class MatchSpec:
    """Which requests a route takes; every field that is set must match (logical and).

    ``host`` matches the Host header without its port, case-insensitively; a leading ``*.``
    matches any subdomain. ``headers`` holds ``(name, value)`` pairs: ``value`` ``None`` asks
    only that the header is present, otherwise its value must equal ``value`` exactly.
    ``sni`` (TCP listeners only) matches the server name of the client's TLS ClientHello, the
    same way ``host`` does (HAProxy's ``req.ssl_sni``).
    """

    host: str | None = None
    path_exact: str | None = None
    path_prefix: str | None = None
    path_regex: str | None = None
    method: str | None = None
    headers: tuple[tuple[str, str | None], ...] = ()
    sni: str | None = None

    @property
    def http_keys(self) -> bool:
        """Whether it tests anything of an HTTP request."""
        return bool(
            self.host
            or self.path_exact
            or self.path_prefix
            or self.path_regex
            or self.method
            or self.headers
        )

    def validate(self) -> None:
        if self.sni is not None and not valid_sni_pattern(self.sni):
            raise ValueError(f"sni: {self.sni!r} is not a host name or '*.domain'")
        for name in ("path_exact", "path_prefix"):
            value = getattr(self, name)
            if value is not None and not value.startswith("/"):
                raise ValueError(f"{name}: must start with '/'")
        if self.path_regex is not None:
            try:
                re.compile(self.path_regex)
            except re.error as exc:
                raise ValueError(f"path_regex: {exc}") from None
        if self.method is not None and not re.fullmatch(r"[A-Z]+", self.method):
            raise ValueError("method: must be an upper-case HTTP method such as 'GET'")
        for header, _value in self.headers:
            if not re.fullmatch(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+", header):
                raise ValueError(f"headers: {header!r} is not a header name")


@dataclass(frozen=True, slots=True)
class RouteSpec:
    """A match and the pool it sends to, with the pool's retry and timeout policy.

    A route names either ``service`` (its pool follows the registry) or ``servers`` (static
    ``host:port`` strings). ``attempts`` counts retries after the first try. ``timeout`` bounds
    a whole request (``None``: no bound); ``response_timeout`` bounds the wait for the response
    head after the request was sent; ``idle_timeout`` closes an exchange that moves no byte.
    """

    match: MatchSpec | None = None
    service: str | None = None
    servers: tuple[str, ...] = ()
    name: str = ""
    balance: str = "round_robin"
    # What hashing policies hash: "source" (the client address), "header:NAME" or
    # "cookie:NAME"; a request without that header or cookie falls back to its address.
    hash_on: str = "source"
    sticky_cookie: str | None = None
    attempts: int = 2
    retry_budget: float = 0.2
    retry_min: int = 3
    timeout: float | None = None
    connect_timeout: float = 2.0
    response_timeout: float | None = 30.0
    idle_timeout: float = 60.0
    # Wait before the n-th retry: retry_backoff * 2**(n-1) (0: retry at once, on the next
    # turn of the loop).
    retry_backoff: float = 0.0
    # TLS to the endpoints (None: plaintext).
    upstream_tls: ClientTlsSpec | None = None
    # Answer every request with a 308 to the same URL over https (on this port), instead of
    # sending it anywhere; such a route names no service and no servers.
    redirect_https: bool = False
    https_port: int = 443
    # Strict-Transport-Security added to responses over TLS (its value), or None.
    hsts: str | None = None

    # The hash, computed once: the proxy finds a route's pool, budget and admission by its
    # spec on every request, and hashing twenty fields costs more than the lookup.
    _hash: int = field(default=0, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        values = tuple(getattr(self, f.name) for f in fields(self) if f.compare)
        object.__setattr__(self, "_hash", hash(values))

    def __hash__(self) -> int:
        return self._hash

    @property
    def label(self) -> str:
        """The route's name in metrics and the access log."""
        if self.redirect_https and not self.name:
            return "redirect-https"
        return self.name or self.service or ",".join(self.servers) or "default"

    def validate(self) -> None:
        if self.match is not None:
            try:
                self.match.validate()
            except ValueError as exc:
                raise ValueError(f"match.{exc}") from None
        if self.redirect_https:
            if self.service is not None or self.servers:
                raise ValueError("redirect_https: a redirecting route names no service or servers")
            if not 0 < self.https_port < 65536:
                raise ValueError("https_port: must be between 1 and 65535")
        elif (self.service is None) == (not self.servers):
            raise ValueError("a route names either 'service' or 'servers'")
        for server in self.servers:
            try:
                parse_hostport(server)
            except ValueError as exc:
                raise ValueError(f"servers: {exc}") from None
        if self.hash_on != "source" and not re.fullmatch(
            r"(header|cookie):[!#$%&'*+.^_`|~0-9A-Za-z-]+", self.hash_on
        ):
            raise ValueError("hash_on: must be 'source', 'header:NAME' or 'cookie:NAME'")
        if self.balance not in POLICIES:
            raise ValueError(f"balance: must be one of {', '.join(POLICIES)}")
        if self.attempts < 0:
            raise ValueError("attempts: must be 0 or more")
        if not 0.0 <= self.retry_budget <= 1.0:
            raise ValueError("retry_budget: must be between 0 and 1")
        if not 0.0 <= self.retry_backoff <= 60.0:
            raise ValueError("retry_backoff: must be between 0 and 60 seconds")
        if self.retry_min < 0:
            raise ValueError("retry_min: must be 0 or more")
        for name in ("timeout", "connect_timeout", "response_timeout", "idle_timeout"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise ValueError(f"{name}: must be positive")


@dataclass(frozen=True, slots=True)
class ListenerSpec:
    """An address the proxy accepts on and the routes it partitions requests with.

    For ``protocol = "tcp"`` exactly one route without a match is allowed. ``header_timeout``
    bounds how long a client may take to send a request head (and to open its first request);
    ``keepalive_timeout`` closes a client connection idle between requests.
    ``upstream_max_idle`` and ``upstream_idle_timeout`` bound the kept-alive connections to
    each endpoint (HTTP only).
    """

    name: str
    host: str = "127.0.0.1"
    port: int = 0
    protocol: Protocol = "http"
    max_connections: int = 10000
    header_timeout: float = 10.0
    keepalive_timeout: float = 60.0
    max_header_bytes: int = 32 * 1024
    max_headers: int = 100
    # A client that closes its side while its request waits (demand control's queue, a
    # connect, a retry's backoff) gives the request up (HAProxy's "option abortonclose").
    # Off: a half-closed client is still answered.
    abort_on_close: bool = True
    upstream_max_idle: int = UPSTREAM_MAX_IDLE
    upstream_idle_timeout: float = 60.0
    routes: tuple[RouteSpec, ...] = field(default_factory=tuple)
    # SO_REUSEPORT, so that several worker processes accept on the same address.
    reuse_port: bool = False
    # Where the listener's access log goes: "off", "-" (stdout) or a file's path, appended to.
    access_log: str = "off"
    # JSON lines instead of key=value text (the node's --log-json).
    access_log_json: bool = False
    # Terminate TLS (None: plaintext, or for TCP, bytes passed on untouched).
    tls: ServerTlsSpec | None = None

    def validate(self) -> None:
        if self.protocol not in ("http", "tcp"):
            raise ValueError("protocol: must be 'http' or 'tcp'")
        if not 0 <= self.port < 65536:
            raise ValueError("port: must be between 0 and 65535")
        if self.max_connections < 1:
            raise ValueError("max_connections: must be 1 or more")
        if self.header_timeout <= 0:
            raise ValueError("header_timeout: must be positive")
        if self.keepalive_timeout <= 0:
            raise ValueError("keepalive_timeout: must be positive")
        if self.upstream_max_idle < 0 or self.upstream_idle_timeout <= 0:
            raise ValueError("upstream_max_idle: must be 0 or more, with a positive timeout")
        if self.max_header_bytes < 1024:
            raise ValueError("max_header_bytes: must be at least 1024")
        if not 1 <= self.max_headers <= 10000:
            raise ValueError("max_headers: must be between 1 and 10000")
        if not self.access_log or "\0" in self.access_log or len(self.access_log) > 4096:
            raise ValueError("access_log: must be 'off', '-' (stdout) or a file's path")
        if self.protocol == "tcp":
            self._validate_tcp_routes()
        for index, route in enumerate(self.routes):
            try:
                route.validate()
                if self.protocol == "http" and route.match is not None and route.match.sni:
                    raise ValueError("match.sni: only tcp listeners match by SNI (use host)")
                if route.redirect_https and self.tls is not None:
                    raise ValueError("redirect_https: this listener speaks https already")
            except ValueError as exc:
                raise ValueError(f"routes[{index}].{exc}") from None

    def _validate_tcp_routes(self) -> None:
        """TCP routes match by SNI only; one without match (the default) may come last."""
        if not self.routes:
            raise ValueError("routes: a tcp listener needs a route")
        for index, route in enumerate(self.routes):
            match = route.match
            if match is not None and (match.http_keys or match.sni is None):
                raise ValueError(f"routes[{index}].match: a tcp route matches only by sni")
            if match is None and index != len(self.routes) - 1:
                raise ValueError(f"routes[{index}].match: only the last tcp route has no match")
            if route.redirect_https or route.hsts:
                raise ValueError(f"routes[{index}]: redirect_https and hsts are for http")
