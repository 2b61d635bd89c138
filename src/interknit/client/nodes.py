"""Which registry node to ask, in which order (sans-IO: ``now`` is passed in).

Rules:

* The node that answered last is asked first, so a client sticks to one working node and does
  not spread its blocking queries over the cluster.
* A node that failed is put on probation for a while that doubles with each consecutive failure
  (``retry_after`` up to ``max_retry_after``); nodes on probation are asked after every other
  node, and only when the caller needs an answer (``order(..., include_resting=True)``). A
  lookup that has a cached answer to fall back on skips them, so a dead cluster costs a cached
  answer nothing, not a connect timeout per node.
* One success clears a node's record.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

RETRY_AFTER = 0.5
MAX_RETRY_AFTER = 10.0


def normalize_node(node: str) -> str:
    """``host:port`` or a URL, to a URL without a trailing slash."""
    node = node.strip().rstrip("/")
    if not node:
        raise ValueError("a registry node address is empty")
    if "://" not in node:
        node = "http://" + node
    return node


@dataclass(slots=True)
class _Record:
    failures: int = 0
    resting_until: float = 0.0
    last_error: str = ""


class NodeList:
    def __init__(
        self,
        nodes: Sequence[str] | str,
        retry_after: float = RETRY_AFTER,
        max_retry_after: float = MAX_RETRY_AFTER,
    ) -> None:
        if isinstance(nodes, str):
            nodes = [n for n in nodes.split(",") if n.strip()]
        urls = [normalize_node(n) for n in nodes]
        if not urls:
            raise ValueError("at least one registry node is required")
        if len(set(urls)) != len(urls):
            raise ValueError("a registry node is listed twice")
        self.urls: tuple[str, ...] = tuple(urls)
        self.retry_after = retry_after
        self.max_retry_after = max_retry_after
        self._records = {url: _Record() for url in urls}
        self._preferred = 0

    @property
    def preferred(self) -> str:
        """The node asked first: the last one that answered."""
        return self.urls[self._preferred]

    def order(self, now: float, include_resting: bool = True) -> list[str]:
        """Nodes to try, in turn: preferred first, the rest in list order after it, nodes on
        probation last (or not at all)."""
        n = len(self.urls)
        rotated = [self.urls[(self._preferred + i) % n] for i in range(n)]
        ready = [u for u in rotated if self._records[u].resting_until <= now]
        if not include_resting:
            return ready
        return ready + [u for u in rotated if self._records[u].resting_until > now]

    def succeeded(self, url: str) -> None:
        record = self._records[url]
        record.failures = 0
        record.resting_until = 0.0
        record.last_error = ""
        self._preferred = self.urls.index(url)

    def failed(self, url: str, now: float, error: str = "") -> None:
        record = self._records[url]
        record.failures += 1
        rest = min(self.retry_after * 2 ** (record.failures - 1), self.max_retry_after)
        record.resting_until = now + rest
        record.last_error = error

    def errors(self) -> dict[str, str]:
        return {u: r.last_error for u, r in self._records.items() if r.failures}
