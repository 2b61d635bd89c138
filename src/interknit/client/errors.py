"""What the discovery client raises.

A lookup that fails but still has a usable cached answer does not raise: it answers the cached
instances marked ``stale``. These errors are for the cases where there is nothing to answer.
"""

from __future__ import annotations

from typing import Any


class DiscoveryError(Exception):
    """Base of every error the discovery client raises."""


class DiscoveryUnavailable(DiscoveryError):
    """No registry node answered, and there is no cached result younger than ``max_stale``."""

    def __init__(self, message: str, errors: dict[str, str] | None = None) -> None:
        super().__init__(message)
        # node URL -> why it failed, for the log line that says why discovery is down.
        self.errors: dict[str, str] = dict(errors or {})


class NoInstances(DiscoveryError, LookupError):
    """The registry answered, but no instance of the service may take work."""

    def __init__(self, service: str, stale: bool = False) -> None:
        extra = " (from a stale cached answer)" if stale else ""
        super().__init__(f"service {service!r} has no usable instance{extra}")
        self.service = service
        self.stale = stale


class RequestRejected(DiscoveryError):
    """A registry node refused the request itself (4xx); another node would refuse it too."""

    def __init__(self, status: int, message: str, detail: Any = None) -> None:
        super().__init__(f"registry refused the request ({status}): {message}")
        self.status = status
        self.message = message
        self.detail = detail
