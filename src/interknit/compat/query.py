"""Consul's query parameters, read once into a ``Query`` (pure; 400 names the parameter).

Blocking: ``index`` with ``wait`` (Go durations: ``120000ms``, ``1s``, ``5m``; at most 10
minutes, 5 by default, as Consul). Consistency: ``stale`` and ``consistent`` (flags, any value
or none), ``cached``. Filters: ``tag`` (repeatable; every one must match), ``passing``,
``node-meta`` (repeatable ``key:value``), ``filter``. ``dc`` must name this node's datacenter.
``ns``, ``partition`` and anything Consul would ignore are ignored; ``peer`` and
``sameness-group`` ask for another cluster and are refused.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import NoReturn

from interknit.compat.filters import Filter, Schema, compile_filter
from interknit.compat.godur import parse_go_duration
from interknit.registry.state import RegistryError

DEFAULT_WAIT = 300.0
MAX_WAIT = 600.0
MAX_INDEX = (1 << 64) - 1
MAX_TAGS = 64
MAX_VALUE = 1024
_TRUE = ("", "1", "true", "yes")
_FALSE = ("0", "false", "no")
_REFUSED = {
    "peer": "cluster peering is not supported",
    "sameness-group": "sameness groups are not supported",
}


def fail(param: str, message: str) -> NoReturn:
    raise RegistryError(f"{param}: {message}", [{"field": param, "message": message}])


@dataclass(frozen=True, slots=True)
class Query:
    index: int = 0  # 0: answer at once
    wait: float = DEFAULT_WAIT  # before jitter
    stale: bool = False
    consistent: bool = False
    cached: bool = False
    tags: tuple[str, ...] = ()
    passing: bool = False
    node_meta: tuple[tuple[str, str], ...] = ()
    filter: Filter | None = None

    @property
    def shape(self) -> tuple[object, ...]:
        """What shapes the answer's body (a cache key); the rest shapes only its timing."""
        text = None if self.filter is None else self.filter.text
        return (self.tags, self.passing, self.node_meta, text)


def _flag(param: str, value: str) -> bool:
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    fail(param, "must be empty, 1, true, 0 or false")


def parse_query(
    pairs: Iterable[tuple[str, str]],
    *,
    datacenter: str,
    schema: Schema | None = None,
    tags: bool = False,
    passing: bool = False,
) -> Query:
    """Read ``pairs`` (every occurrence, in order). ``schema`` allows ``filter`` on this
    endpoint; ``tags`` and ``passing`` allow those."""
    index = 0
    wait = DEFAULT_WAIT
    stale = consistent = cached = want_passing = False
    tag_list: list[str] = []
    node_meta: list[tuple[str, str]] = []
    filter_: Filter | None = None
    for param, value in pairs:
        if len(value) > MAX_VALUE and param != "filter":
            fail(param, f"is longer than {MAX_VALUE} characters")
        if param == "index":
            if (
                not (value.isascii() and value.isdigit())
                or len(value) > 20
                or int(value) > MAX_INDEX
            ):
                fail("index", "must be an unsigned integer, as X-Consul-Index gave it")
            index = int(value)
        elif param == "wait":
            try:
                # 0 asks for the default, as Consul reads it (its Go client sends 1ms, never
                # 0ms, for a short wait).
                wait = min(parse_go_duration(value), MAX_WAIT) or DEFAULT_WAIT
            except ValueError as exc:
                fail("wait", str(exc))
        elif param == "stale":
            stale = True
        elif param == "consistent":
            consistent = True
        elif param == "cached":
            cached = True
        elif param == "dc":
            if value and value.lower() != datacenter:
                fail("dc", f"no path to datacenter {value[:64]!r}: this node serves {datacenter!r}")
        elif param == "tag" and tags:
            if len(tag_list) >= MAX_TAGS:
                fail("tag", f"more than {MAX_TAGS} tags")
            tag_list.append(value)
        elif param == "passing" and passing:
            want_passing = _flag("passing", value)
        elif param == "node-meta":
            key, sep, item = value.partition(":")
            if not sep or not key:
                fail("node-meta", "must be key:value")
            node_meta.append((key, item))
        elif param == "filter":
            if schema is None:
                fail("filter", "is not supported on this endpoint")
            if value:
                filter_ = compile_filter(value, schema)
        elif param in _REFUSED and value:
            fail(param, _REFUSED[param])
    if stale and consistent:
        fail("consistent", "cannot be asked together with stale")
    return Query(
        index=index,
        wait=wait,
        stale=stale,
        consistent=consistent,
        cached=cached,
        tags=tuple(tag_list),
        passing=want_passing,
        node_meta=tuple(sorted(set(node_meta))),
        filter=filter_,
    )
