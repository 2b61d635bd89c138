"""When a failed attempt may be tried again, and how many retries a route may have in flight.

Retries multiply load exactly when a service is struggling, so two limits apply: a retry must
be safe (the upstream cannot have acted on the request, or the method is idempotent), and the
retries in flight stay within a budget, a fraction of the requests in flight with a small
floor so that a quiet route can still retry (Envoy's ``retry_budget``).
"""

from __future__ import annotations

IDEMPOTENT_METHODS = frozenset({b"GET", b"HEAD", b"OPTIONS", b"PUT", b"DELETE", b"TRACE"})
RETRYABLE_STATUSES = frozenset({502, 503, 504})


def safe_to_retry(method: bytes, sent_request: bool, status: int | None) -> bool:
    """Whether an attempt that failed this way may be retried.

    ``sent_request`` False (connect failure) is always safe. A reset before any response byte
    (``status`` None) is safe too: the upstream answered nothing. A 502/503/504 answer is
    retried only for idempotent methods.
    """
    if not sent_request or status is None:
        return True
    return status in RETRYABLE_STATUSES and method in IDEMPOTENT_METHODS


class RetryBudget:
    """Counts requests and retries in flight for one route."""

    __slots__ = ("minimum", "ratio", "requests", "retries")

    def __init__(self, ratio: float = 0.2, minimum: int = 3) -> None:
        self.ratio = ratio
        self.minimum = minimum
        self.requests = 0
        self.retries = 0

    def request_started(self) -> None:
        self.requests += 1

    def request_finished(self) -> None:
        self.requests -= 1

    def try_acquire(self) -> bool:
        """Take room for one more retry in flight, if the budget has it."""
        if self.retries < max(self.minimum, self.ratio * self.requests):
            self.retries += 1
            return True
        return False

    def release(self) -> None:
        self.retries -= 1
