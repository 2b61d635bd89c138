"""Sticky sessions by cookie: an opaque token that binds a client to one endpoint.

The cookie's value is ``base64url(HMAC-SHA256(secret, endpoint key)[:12])``: 16 characters
that name the endpoint to whoever holds the secret and to nobody else. Unlike HAProxy's
``cookie SRV insert`` with server names, or Traefik's address cookies, it tells a client
neither the address nor the name of the machine behind the proxy, and a client cannot forge
a value that routes it to an endpoint of its choosing.

The secret is random per node unless the operator shares one between nodes: with a per-node
secret a client that moves to another node is simply rebound there (and its cookie rewritten),
which is safe, only less sticky.

If the endpoint a cookie names is gone, unusable, or already tried by this request, the request
is balanced as usual and the cookie is rewritten to name the new endpoint.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import re
from collections.abc import Container, Iterable

from interknit.balance.base import Endpoint
from interknit.balance.pool import Pool

COOKIE_NAME = "ik_affinity"
SECRET_BYTES = 32
TOKEN_BYTES = 12  # 96 bits: unguessable, and 16 characters in the cookie
_TOKEN_RE = re.compile(r"[A-Za-z0-9_-]{16}")
# Bounds the key -> token memo when endpoints come and go for months.
_MEMO_LIMIT = 16384
_COOKIE_NAME_RE = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")


def new_secret() -> bytes:
    """A fresh random secret for one node."""
    return os.urandom(SECRET_BYTES)


def find_cookie(header: str | None, name: str) -> str | None:
    """The value of cookie ``name`` in a ``Cookie:`` request header, or None."""
    if not header:
        return None
    for part in header.split(";"):
        key, sep, value = part.strip().partition("=")
        if sep and key == name:
            value = value.strip()
            if len(value) >= 2 and value[0] == value[-1] == '"':
                value = value[1:-1]
            return value
    return None


class StickyCookie:
    """Encodes endpoints as cookie values and finds them again; one per route."""

    def __init__(
        self,
        secret: bytes,
        name: str = COOKIE_NAME,
        *,
        path: str = "/",
        secure: bool = False,
        max_age: int | None = None,
    ) -> None:
        if len(secret) < 16:
            raise ValueError("the sticky cookie secret must be at least 16 bytes")
        if not _COOKIE_NAME_RE.fullmatch(name):
            raise ValueError(f"{name!r} is not a valid cookie name")
        self.name = name
        self._secret = secret
        # Attributes are fixed per route, so the suffix is built once.
        attributes = [f"Path={path}", "HttpOnly", "SameSite=Lax"]
        if secure:
            attributes.append("Secure")
        if max_age is not None:
            attributes.append(f"Max-Age={max_age}")
        self._suffix = "; " + "; ".join(attributes)
        self._token_of: dict[str, str] = {}
        self._key_of: dict[str, str] = {}

    def encode(self, endpoint: Endpoint) -> str:
        """The cookie value naming ``endpoint``."""
        token = self._token_of.get(endpoint.key)
        if token is None:
            mac = hmac.new(self._secret, endpoint.key.encode(), hashlib.sha256).digest()
            token = base64.urlsafe_b64encode(mac[:TOKEN_BYTES]).decode("ascii")
            if len(self._token_of) >= _MEMO_LIMIT:
                self._token_of.clear()
                self._key_of.clear()
            self._token_of[endpoint.key] = token
            self._key_of[token] = endpoint.key
        return token

    def lookup(self, value: str | None, endpoints: Iterable[Endpoint]) -> Endpoint | None:
        """The endpoint among ``endpoints`` that ``value`` names, or None."""
        if value is None or not _TOKEN_RE.fullmatch(value):
            return None
        candidates = list(endpoints)
        key = self._key_of.get(value)
        if key is None:
            # Not seen yet (say, after a restart with a shared secret): learn these endpoints.
            for endpoint in candidates:
                self.encode(endpoint)
            key = self._key_of.get(value)
            if key is None:
                return None
        for endpoint in candidates:
            if endpoint.key == key:
                return endpoint
        return None

    def set_cookie(self, endpoint: Endpoint) -> str:
        """The ``Set-Cookie`` header value binding the client to ``endpoint``."""
        return f"{self.name}={self.encode(endpoint)}{self._suffix}"

    def choose(
        self,
        value: str | None,
        pool: Pool,
        hash_key: bytes | None,
        now: float,
        exclude: Container[Endpoint] = (),
    ) -> tuple[Endpoint | None, str | None]:
        """The endpoint for a request carrying cookie ``value``, and a ``Set-Cookie`` value
        when the cookie must be written (absent, stale, or naming an unusable endpoint)."""
        pool.refresh(now)
        bound = self.lookup(value, pool.selected)
        if bound is not None and bound not in exclude:
            return bound, None
        endpoint = pool.pick(hash_key, now, exclude)
        if endpoint is None:
            return None, None
        return endpoint, self.set_cookie(endpoint)
