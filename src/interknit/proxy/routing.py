"""Request partitioning: the first route whose match holds takes the request.

Matches are compiled once per ``update`` into bytes comparisons, so that matching a request
decodes nothing: the parser hands us bytes and we compare bytes.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from interknit.proxy.spec import RouteSpec


class CompiledRoute:
    """One route's match as bytes tests, plus the spec it came from."""

    __slots__ = (
        "any",
        "headers",
        "host",
        "host_suffix",
        "index",
        "label",
        "method",
        "path_exact",
        "path_prefix",
        "path_regex",
        "spec",
    )

    def __init__(self, spec: RouteSpec, index: int) -> None:
        self.spec = spec
        self.index = index
        self.label = spec.label
        m = spec.match
        self.host: bytes | None = None
        self.host_suffix: bytes | None = None
        self.path_exact: bytes | None = None
        self.path_prefix: bytes | None = None
        self.path_regex: re.Pattern[bytes] | None = None
        self.method: bytes | None = None
        self.headers: tuple[tuple[bytes, bytes | None], ...] = ()
        # It takes every request: no test at all.
        self.any = True
        if m is None:
            return
        if m.host is not None:
            host = m.host.lower().encode("idna" if not m.host.isascii() else "ascii")
            if host.startswith(b"*."):
                self.host_suffix = host[1:]
            else:
                self.host = host
        if m.path_exact is not None:
            self.path_exact = m.path_exact.encode()
        if m.path_prefix is not None:
            self.path_prefix = m.path_prefix.encode()
        if m.path_regex is not None:
            self.path_regex = re.compile(m.path_regex.encode())
        if m.method is not None:
            self.method = m.method.encode()
        self.headers = tuple(
            (name.lower().encode(), None if value is None else value.encode())
            for name, value in m.headers
        )
        self.any = (
            self.host is None
            and self.host_suffix is None
            and self.path_exact is None
            and self.path_prefix is None
            and self.path_regex is None
            and self.method is None
            and not self.headers
        )

    def matches(self, method: bytes, host: bytes, path: bytes, headers: dict[bytes, bytes]) -> bool:
        if self.method is not None and method != self.method:
            return False
        if self.host is not None and host != self.host:
            return False
        if self.host_suffix is not None and not host.endswith(self.host_suffix):
            return False
        if self.path_exact is not None and path != self.path_exact:
            return False
        if self.path_prefix is not None and not path.startswith(self.path_prefix):
            return False
        if self.path_regex is not None and self.path_regex.match(path) is None:
            return False
        for name, value in self.headers:
            got = headers.get(name)
            if got is None or (value is not None and got != value):
                return False
        return True


class Router:
    """The routes of one listener, in order."""

    __slots__ = ("catch_all", "routes")

    def __init__(self, routes: Sequence[RouteSpec]) -> None:
        self.routes = tuple(CompiledRoute(spec, i) for i, spec in enumerate(routes))
        # The first route takes every request: no need to look at one.
        self.catch_all = bool(self.routes) and self.routes[0].any

    def match(
        self, method: bytes, host: bytes, path: bytes, headers: dict[bytes, bytes]
    ) -> CompiledRoute | None:
        for route in self.routes:
            if route.matches(method, host, path, headers):
                return route
        return None


def split_target(target: bytes) -> tuple[bytes, bytes | None]:
    """The path of a request target and the authority when the target is absolute-form."""
    if target[:1] == b"/":
        q = target.find(b"?")
        return (target if q < 0 else target[:q]), None
    scheme_end = target.find(b"://")
    if scheme_end > 0:
        rest = target[scheme_end + 3 :]
        slash = rest.find(b"/")
        authority = rest if slash < 0 else rest[:slash]
        path = b"/" if slash < 0 else rest[slash:]
        q = path.find(b"?")
        return (path if q < 0 else path[:q]), authority
    # "*" (OPTIONS) and anything else: matched as it stands.
    return target, None


def host_without_port(host: bytes) -> bytes:
    """Lower-cased host of a Host header value, without its port (IPv6 literals kept whole)."""
    if host[:1] == b"[":
        end = host.find(b"]")
        return host[: end + 1].lower() if end > 0 else host.lower()
    colon = host.rfind(b":")
    return (host if colon < 0 else host[:colon]).lower()
