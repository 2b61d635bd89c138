"""``host:port`` is read in one place: config, route specs and static pools agree on it."""

from __future__ import annotations

import ipaddress

import pytest
from hypothesis import given
from hypothesis import strategies as st

from interknit.balance.pool import Pool
from interknit.balance.round_robin import RoundRobin
from interknit.config import ConfigError, parse_config
from interknit.names import format_hostport, is_hostname, parse_hostport
from interknit.proxy.spec import RouteSpec

BAD = [
    ("nohost", "is not host:port"),
    (":80", "has no host"),
    ("[]:80", "has no host"),
    ("host:", "is not host:port"),
    ("host:0", "port must be 1-65535"),
    ("host:70000", "port must be 1-65535"),
    ("host:8o", "is not host:port"),
    ("host:\u0663", "is not host:port"),  # a digit, but not an ASCII one
    ("::1:80", "IPv6 address in brackets"),
    ("[10.0.0.1]:80", "only an IPv6 address goes in brackets"),
    ("[web]:80", "is not an IPv6 address"),
    ("exa_mple:80", "neither an IP address nor a host name"),
    ("a..b:80", "neither an IP address nor a host name"),
    ("x" * 400 + ":80", "longer than"),
]


@pytest.mark.parametrize(("value", "message"), BAD)
def test_refusals_say_what_is_wrong(value: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_hostport(value)


@pytest.mark.parametrize(("value", "message"), BAD)
def test_config_routes_and_static_pools_refuse_alike(value: str, message: str) -> None:
    """Before one parser, a route's servers were checked three ways: ``::1:80`` passed the
    spec and failed the pool, ``exa_mple:80`` passed the pool and failed the config."""
    with pytest.raises(ValueError, match=message):
        Pool.for_servers([value], RoundRobin(), now=0.0)
    with pytest.raises(ValueError, match=f"servers: .*{message}"):
        RouteSpec(servers=(value,)).validate()
    config = {
        "listeners": [{"name": "w", "listen": "127.0.0.1:0", "routes": [{"servers": [value]}]}]
    }
    with pytest.raises(
        ConfigError, match=rf"listeners\[0\]\.routes\[0\]\.servers\[0\]: .*{message}"
    ):
        parse_config(config)


def test_port_zero_only_where_it_means_pick_one() -> None:
    assert parse_hostport("127.0.0.1:0", port_zero=True) == ("127.0.0.1", 0)
    parse_config({"registry": {"listen": "127.0.0.1:0"}})
    with pytest.raises(ConfigError, match=r"services\[0\]\.instances\[0\]: .*port must be 1-65535"):
        parse_config({"services": [{"name": "web", "instances": ["127.0.0.1:0"]}]})


def test_accepted_spellings() -> None:
    assert parse_hostport("127.0.0.1:7470") == ("127.0.0.1", 7470)
    assert parse_hostport("[::1]:80") == ("::1", 80)
    assert parse_hostport("backend.local:80") == ("backend.local", 80)
    assert parse_hostport("backend.local.:80") == ("backend.local.", 80)


hostnames = st.from_regex(
    r"[a-z]([a-z0-9-]{0,20}[a-z0-9])?(\.[a-z]([a-z0-9-]{0,20}[a-z0-9])?){0,3}", fullmatch=True
)
hosts = st.one_of(
    st.ip_addresses(v=4).map(str),
    st.ip_addresses(v=6).map(str),
    hostnames,
)


@given(host=hosts, port=st.integers(1, 65535))
def test_format_and_parse_round_trip(host: str, port: int) -> None:
    assert parse_hostport(format_hostport(host, port)) == (host, port)


@given(st.text(max_size=40))
def test_anything_is_parsed_or_refused_with_a_value_error(value: str) -> None:
    try:
        host, port = parse_hostport(value)
    except ValueError:
        return
    assert 1 <= port <= 65535
    try:
        ipaddress.ip_address(host)
    except ValueError:
        assert is_hostname(host)
