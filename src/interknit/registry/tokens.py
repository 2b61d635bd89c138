"""Bearer tokens for the registry API, shared by its aiohttp application (admin/app.py) and its
fast path (registry/fastpath.py), so that both refuse the same requests with the same words.

It lives in registry/ because it guards the registry's API; the admin application, which wraps
that API, imports it from here (dependencies point down: admin -> registry).
"""

from __future__ import annotations

import hmac

from aiohttp import web

from interknit.registry.api import error_response

READ_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
OPEN_PATHS = frozenset({"/", "/v1/health", "/favicon.ico"})


class Tokens:
    """Bearer tokens: writes need a write token once any is configured; reads need a read (or
    write) token once any read token is configured."""

    def __init__(self, read: list[str], write: list[str]) -> None:
        self.read = [t.encode() for t in read]
        self.write = [t.encode() for t in write]

    @staticmethod
    def _known(token: bytes, tokens: list[bytes]) -> bool:
        # Compare against every token, so the time taken does not tell which one nearly matched.
        found = False
        for candidate in tokens:
            found |= hmac.compare_digest(token, candidate)
        return found

    @property
    def enabled(self) -> bool:
        return bool(self.read or self.write)

    def check(self, request: web.Request) -> web.Response | None:
        authorization = request.headers.get("Authorization", "")
        if not authorization:
            # Consul's clients send the same tokens as X-Consul-Token or ?token=.
            token = request.headers.get("X-Consul-Token") or request.query.get("token")
            if token:
                authorization = f"Bearer {token}"
        denied = self.deny(request.path, request.method, authorization)
        return None if denied is None else error_response(*denied)

    def deny(self, path: str, method: str, authorization: str) -> tuple[int, str] | None:
        """The status and message that refuse this request, or None to let it through."""
        if path in OPEN_PATHS:
            return None
        header = authorization
        token = header[7:].strip().encode() if header[:7].lower() == "bearer " else b""
        if method in READ_METHODS:
            if not self.read or self._known(token, self.read) or self._known(token, self.write):
                return None
            if not token:
                return 401, "a read token is required (Authorization: Bearer)"
            return 401, "the token is not valid"
        if not self.write:
            return None
        if self._known(token, self.write):
            return None
        if token and self._known(token, self.read):
            return 403, "a read token cannot write; use a write token"
        if not token:
            return 401, "a write token is required (Authorization: Bearer)"
        return 401, "the token is not valid"
