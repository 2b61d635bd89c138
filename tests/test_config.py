"""interknit.toml as config.py composes it from the components' own sections: every error
names its full key path, whichever component's model or check refused the value."""

from __future__ import annotations

import ast
import json
from pathlib import Path
from typing import Any

import pytest

from interknit.balance import HASHING_POLICIES, POLICIES
from interknit.config import Config, ConfigError, parse_config
from interknit.dns.config import DnsSection
from interknit.node import service_spec
from interknit.proxy.config import ListenerSection
from interknit.proxy.spec import RouteSpec
from interknit.registry.config import RegistrySection, ServiceSection
from interknit.registry.schema import register_spec
from interknit.registry.state import RegistryError

SRC = Path(__file__).resolve().parent.parent / "src" / "interknit"


def listener(*routes: dict[str, Any], **extra: Any) -> dict[str, Any]:
    return {"name": "web", "listen": "127.0.0.1:0", "routes": list(routes), **extra}


def refusal(data: dict[str, Any]) -> str:
    with pytest.raises(ConfigError) as caught:
        parse_config(data)
    return str(caught.value)


@pytest.mark.parametrize(
    ("data", "path", "words"),
    [
        # pydantic's own checks, in the proxy's section
        (
            {"listeners": [listener({"service": "a"}, {"service": "b", "balance": "fastest"})]},
            "listeners[0].routes[1].balance",
            "round_robin",
        ),
        # the proxy's spec checks, run by its section, joined to the path pydantic gives
        (
            {"listeners": [listener({"service": "a"}, {"service": "b", "match": {"path": "x"}})]},
            "listeners[0].routes[1].match.path_exact",
            "must start with '/'",
        ),
        (
            {"listeners": [listener({"service": "a", "hash_on": "nope"})]},
            "listeners[0].routes[0].hash_on",
            "'source'",
        ),
        # demand control's section, inside a route
        (
            {"listeners": [listener({"service": "a", "demand": {"rate": "fast"}})]},
            "listeners[0].routes[0].demand.rate",
            "is not a rate",
        ),
        (
            {"listeners": [listener({"service": "a"}, {"service": "b"}, protocol="tcp")]},
            "listeners[0].routes[0].match",
            "only the last tcp route has no match",
        ),
        (
            {"listeners": [listener({"service": "a", "timeout": 5})]},
            "listeners[0].routes[0].timeout",
            "bare number",
        ),
        # the registry's sections
        ({"registry": {"listen": 7470}}, "registry.listen", "string"),
        ({"registry": {"tokens": {"read": ["short"]}}}, "registry.tokens.read[0]", "8"),
        ({"services": [{"name": "Web"}]}, "services[0].name", "DNS label"),
        (
            {"services": [{"name": "web", "instances": ["nohost"]}]},
            "services[0].instances[0]",
            "host:port",
        ),
        # DNS's section
        ({"dns": {"zone": "internal"}}, "dns.zone", "fully qualified"),
        ({"dns": {"gslb": {"policy": "x"}}}, "dns.gslb.policy", "nearest"),
        ({"dns": {"regions": {"10.0.0.0/8": "EU"}}}, "dns.regions.10.0.0.0/8", "DNS label"),
        # the file's own shape
        ({"nodes": {}}, "nodes", "unknown key"),
        (
            {"listeners": [listener({"service": "a", "colour": "red"})]},
            "listeners[0].routes[0].colour",
            "unknown key",
        ),
    ],
)
def test_errors_name_the_full_path(data: dict[str, Any], path: str, words: str) -> None:
    message = refusal(data)
    assert message.startswith(f"{path}: "), message
    assert words in message


def test_config_composes_the_components_sections() -> None:
    fields = Config.model_fields
    assert fields["registry"].annotation is RegistrySection
    assert fields["dns"].annotation is DnsSection
    assert fields["services"].annotation == list[ServiceSection]
    assert fields["listeners"].annotation == list[ListenerSection]


def test_a_listener_section_becomes_the_proxys_spec() -> None:
    config = parse_config(
        {
            "listeners": [
                listener(
                    {"service": "search", "match": {"path_prefix": "/s", "headers": {"X-A": True}}},
                    {"servers": ["[::1]:9001"], "balance": "maglev", "sticky": {"cookie": "ik"}},
                    listen="[::1]:7480",
                )
            ]
        }
    )
    spec = config.listeners[0].to_spec()
    assert (spec.host, spec.port, spec.name) == ("::1", 7480, "web")
    first, second = spec.routes
    assert first.service == "search" and first.match is not None
    assert first.match.path_prefix == "/s" and first.match.headers == (("X-A", None),)
    assert second.servers == ("[::1]:9001",) and second.balance == "maglev"
    assert second.sticky_cookie == "ik"


# ------------------------------------------------------------------ checks: one validator


def api_refusal(check: dict[str, Any]) -> str:
    """What the registry API answers a registration carrying ``check`` (400, this message)."""
    body = json.dumps({"address": "127.0.0.1", "port": 9001, "check": check}).encode()
    with pytest.raises(RegistryError) as caught:
        register_spec(body)
    return caught.value.message


@pytest.mark.parametrize(
    ("check", "key", "words"),
    [
        ({"http": "no-slash", "interval": "0s"}, "http", "must be a path starting with '/'"),
        ({"http": "/ok", "interval": "0s"}, "interval", "at least 10ms"),
        ({"tcp": True, "timeout": "5ms"}, "timeout", "at least 10ms"),
        ({"ttl": "1ms"}, "ttl", "at least 10ms"),
        ({"http": "/ok", "rise": 0}, "rise", "greater than or equal to 1"),
        ({"http": "/ok", "interval": 2}, "interval", "string"),
        ({"http": "/ok", "every": "1s"}, "every", ""),
    ],
)
def test_config_and_api_refuse_the_same_checks(check: dict[str, Any], key: str, words: str) -> None:
    """The config once accepted ``{ http = "no-slash", interval = "0s" }``, which the API
    refuses, and the checker then died dividing by the zero interval."""
    config = refusal(
        {"services": [{"name": "web", "instances": ["127.0.0.1:9001"], "check": check}]}
    )
    api = api_refusal(check)
    assert config.startswith(f"services[0].check.{key}: "), config
    assert api.startswith(f"check.{key}: "), api
    assert words in config and words in api
    # The same words after the path.
    assert config.split(": ", 1)[1] == api.split(": ", 1)[1] or key == "every"


def test_a_configured_check_is_the_apis_check() -> None:
    config = parse_config(
        {
            "services": [
                {
                    "name": "web",
                    "instances": ["127.0.0.1:9001"],
                    "check": {"http": "/health", "interval": "1s", "rise": 2, "fall": 3},
                }
            ]
        }
    )
    body = {"http": "/health", "interval": "1s", "rise": 2, "fall": 3}
    # A static instance says that the config owns it (the node removes it with the config).
    meta = {"owner": "config"}
    raw = json.dumps({"address": "127.0.0.1", "port": 9001, "meta": meta, "check": body}).encode()
    assert service_spec(config.services[0], "127.0.0.1:9001") == register_spec(raw)


# ------------------------------------------------------------------ balance policies: one list


def spelled_out(names: set[str], at_least: int) -> list[str]:
    """Where a tuple, list or set literal in src spells ``at_least`` of ``names``."""
    found = []
    for path in sorted(SRC.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, (ast.Tuple, ast.List, ast.Set)):
                values = {e.value for e in node.elts if isinstance(e, ast.Constant)}
                if len(values & names) >= at_least:
                    found.append(f"{path.relative_to(SRC)}:{node.lineno}")
    return found


def test_one_list_of_balance_policy_names() -> None:
    """balance.POLICIES is the only spelling of the list; config, routes and the client
    take it from there (config.py, proxy/spec.py and balance/pool.py each had a copy)."""
    copies = spelled_out(set(POLICIES), at_least=4)
    assert len(copies) == 1 and copies[0].startswith("balance/pool.py:"), copies
    refused = refusal({"listeners": [listener({"service": "a", "balance": "fastest"})]})
    assert all(name in refused for name in POLICIES)
    with pytest.raises(ValueError, match="balance: must be one of " + ", ".join(POLICIES)):
        RouteSpec(service="a", balance="fastest").validate()
    for name in POLICIES:
        parse_config({"listeners": [listener({"service": "a", "balance": name})]})


def test_one_set_of_hashing_policies() -> None:
    copies = spelled_out(set(HASHING_POLICIES), at_least=len(HASHING_POLICIES))
    assert all(c.startswith("balance/pool.py:") for c in copies), copies
