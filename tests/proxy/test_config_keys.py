"""The proxy's newer config keys reach the listener and route specs, and bad values name the key."""

from __future__ import annotations

import tomllib

import pytest

from interknit.config import ConfigError, parse_config
from interknit.proxy.setup import listener_spec
from interknit.proxy.spec import ListenerSpec

BASE = """
[[listeners]]
name = "web"
listen = "127.0.0.1:7480"
{listener}
[[listeners.routes]]
servers = ["127.0.0.1:9001"]
{route}
"""


def spec(listener: str = "", route: str = "") -> ListenerSpec:
    config = parse_config(tomllib.loads(BASE.format(listener=listener, route=route)))
    return listener_spec(config.listeners[0])


def test_defaults_and_values_reach_the_specs() -> None:
    default = spec()
    assert (default.max_headers, default.abort_on_close) == (100, True)
    assert default.routes[0].retry_backoff == 0.0
    given = spec("max_headers = 50\nabort_on_close = false", 'retries = { backoff = "25ms" }')
    assert (given.max_headers, given.abort_on_close) == (50, False)
    assert given.routes[0].retry_backoff == 0.025


def test_the_access_log_is_on_by_default_to_stdout() -> None:
    assert spec().access_log == "-"
    assert spec('access_log = "off"').access_log == "off"
    assert spec('access_log = "/var/log/ik/web.log"').access_log == "/var/log/ik/web.log"
    # An embedder's spec logs nothing unless it says so.
    assert ListenerSpec(name="x").access_log == "off"


@pytest.mark.parametrize(
    ("listener", "route", "path"),
    [
        ("max_headers = 0", "", "listeners[0].max_headers"),
        ('abort_on_close = "sometimes"', "", "listeners[0].abort_on_close"),
        ("", 'retries = { backoff = "2m" }', "listeners[0].routes[0].retries.backoff"),
        ("", 'retries = { backoff = "-1s" }', "listeners[0].routes[0].retries.backoff"),
        ('access_log = ""', "", "listeners[0].access_log"),
        ("access_log = false", "", "listeners[0].access_log"),
        (f'access_log = "/{"x" * 5000}"', "", "listeners[0].access_log"),
    ],
)
def test_bad_values_name_their_key(listener: str, route: str, path: str) -> None:
    with pytest.raises(ConfigError) as info:
        spec(listener, route)
    assert str(info.value).startswith(path), str(info.value)
