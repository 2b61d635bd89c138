"""Consul registration bodies translated into interknit registrations (pure, no IO)."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from interknit.compat.names import instance_label
from interknit.compat.register import CHECK_FIELDS, SERVICE_FIELDS, parse_registration
from interknit.registry.model import is_label
from interknit.registry.state import RegistryError

NODE = "192.0.2.1"


def parse(body: Any) -> Any:
    return parse_registration(json.dumps(body).encode(), NODE)


def refused(body: Any) -> str:
    """The field a refused body's 400 names."""
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    with pytest.raises(RegistryError) as caught:
        parse_registration(raw, NODE)
    assert caught.value.status == 400
    detail = caught.value.detail
    assert isinstance(detail, list) and detail[0]["field"]
    assert caught.value.message.startswith(detail[0]["field"] + ":")
    return str(detail[0]["field"])


def test_go_client_body() -> None:
    # What hashicorp/consul/api's AgentServiceRegistration marshals to (Fabio's, with its
    # TTL and HTTP checks).
    reg = parse(
        {
            "ID": "fabio-host-9998",
            "Name": "fabio",
            "Tags": ["lb"],
            "Port": 9998,
            "Address": "10.1.2.3",
            "Check": None,
            "Checks": [
                {
                    "CheckID": "fabio-host-9998-ttl",
                    "TTL": "15s",
                    "DeregisterCriticalServiceAfter": "1m0s",
                },
                {"Interval": "1s", "Timeout": "3s", "HTTP": "http://10.1.2.3:9998/health"},
            ],
        }
    )
    assert (reg.service, reg.instance_id, reg.consul_id) == (
        "fabio",
        "fabio-host-9998",
        "fabio-host-9998",
    )
    spec = reg.spec
    assert (spec.address, spec.port, spec.tags) == ("10.1.2.3", 9998, ("lb",))
    assert spec.check is not None and spec.check.ttl == 15 and spec.check.deregister_after == 60
    assert spec.meta_dict["consul.check_id"] == "fabio-host-9998-ttl"
    assert reg.initial == "critical"  # as Consul starts a TTL check
    assert reg.dropped_checks == ("Checks[1]",)


def test_python_client_body_lowercase_and_snake_case() -> None:
    # py-consul sends lowercase keys and snake_case ones.
    reg = parse(
        {
            "name": "web",
            "id": "web-1",
            "address": "127.0.0.1",
            "port": 8080,
            "tags": ["a"],
            "meta": {"Version": "2"},
            "checks": [{"http": "http://localhost:8080/health?x=1", "interval": "500ms"}],
            "tagged_addresses": {},
            "enable_tag_override": False,
            "weights": {"passing": 3, "warning": 1},
        }
    )
    check = reg.spec.check
    assert check is not None and check.http == "/health?x=1" and check.interval == 0.5
    assert (check.rise, check.fall) == (1, 1)  # Consul's default: the first result decides
    assert reg.spec.weight == 3 and reg.spec.meta_dict == {"Version": "2"}
    assert reg.initial is None


def test_tcp_check_and_status_passing_ttl() -> None:
    reg = parse(
        {
            "Name": "db",
            "Port": 5432,
            "Address": "10.0.0.9",
            "Check": {"TCP": "10.0.0.9:5432", "Interval": "2s"},
        }
    )
    assert reg.spec.check is not None and reg.spec.check.tcp
    passing = parse({"Name": "db", "Port": 5432, "Check": {"TTL": "5s", "Status": "passing"}})
    assert passing.initial is None and passing.spec.address == NODE  # the node's address
    warning = parse({"Name": "db", "Port": 5432, "Check": {"TTL": "5s", "Status": "warning"}})
    assert warning.initial == "warning"


def test_names_and_ids_translated_with_originals_in_meta() -> None:
    reg = parse(
        {
            "Name": "My_App",
            "ID": "host1:app:8080",
            "Port": 8080,
            "Locality": {"Region": "EU", "Zone": "eu-1a"},
        }
    )
    assert reg.service == "my-app" and reg.instance_id == instance_label("host1:app:8080")
    assert reg.spec.meta_dict["consul.service"] == "My_App"
    assert reg.spec.meta_dict["consul.id"] == "host1:app:8080"
    assert (reg.spec.region, reg.spec.zone) == ("eu", "eu-1a")
    assert parse({"Name": "web", "Port": 1}).consul_id == "web"  # no ID: the name, as Consul


def test_same_body_same_spec() -> None:
    body = {"Name": "w", "Port": 1, "Tags": ["b", "a", "b"], "Meta": {"z": "1", "a": "2"}}
    assert parse(body).spec == parse(dict(reversed(body.items()))).spec


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"Port": 1}, "Name"),
        ({"Name": "w"}, "Port"),
        ({"Name": "w", "Port": 0}, "Port"),
        ({"Name": "w", "Port": 70000}, "Port"),
        ({"Name": "w", "Port": True}, "Port"),
        ({"Name": "_x", "Port": 1}, "Name"),
        ({"Name": "w", "ID": "a b", "Port": 1}, "ID"),
        ({"Name": "w", "Port": 1, "Bogus": 1}, "Bogus"),
        ({"Name": "w", "name": "v", "Port": 1}, "Name"),
        ({"Name": "w", "Port": 1, "Address": "not an address!"}, "Address"),
        ({"Name": "w", "Port": 1, "Tags": "a"}, "Tags"),
        ({"Name": "w", "Port": 1, "Tags": [1]}, "Tags[0]"),
        ({"Name": "w", "Port": 1, "Meta": {"a.b": "x"}}, "Meta.a.b"),
        ({"Name": "w", "Port": 1, "Meta": {"a": 1}}, "Meta.a"),
        ({"Name": "w", "Port": 1, "Weights": {"Passing": 5000}}, "Weights.Passing"),
        ({"Name": "w", "Port": 1, "Kind": "connect-proxy"}, "Kind"),
        ({"Name": "w", "Port": 1, "Connect": {"Native": True}}, "Connect"),
        ({"Name": "w", "Port": 1, "Check": {}}, "Check"),
        ({"Name": "w", "Port": 1, "Check": {"TTL": "1s", "HTTP": "http://x/"}}, "Check"),
        ({"Name": "w", "Port": 1, "Check": {"TTL": "1ms"}}, "Check.TTL"),
        ({"Name": "w", "Port": 1, "Check": {"TTL": "soon"}}, "Check.TTL"),
        ({"Name": "w", "Port": 1, "Check": {"GRPC": "x:1", "Interval": "1s"}}, "Check.GRPC"),
        (
            {"Name": "w", "Port": 1, "Check": {"Args": ["/bin/true"], "Interval": "1s"}},
            "Check.ScriptArgs",
        ),
        (
            {"Name": "w", "Port": 1, "Check": {"HTTP": "https://192.0.2.1:1/", "Interval": "1s"}},
            "Check.HTTP",
        ),
        (
            {"Name": "w", "Port": 1, "Check": {"HTTP": "http://192.0.2.9:1/", "Interval": "1s"}},
            "Check.HTTP",
        ),
        (
            {"Name": "w", "Port": 1, "Check": {"HTTP": "http://192.0.2.1:1/", "Method": "POST"}},
            "Check.Method",
        ),
        ({"Name": "w", "Port": 1, "Check": {"TCP": "192.0.2.1:2", "Interval": "1s"}}, "Check.TCP"),
        ({"Name": "w", "Port": 1, "Check": {"TCP": "nonsense", "Interval": "1s"}}, "Check.TCP"),
        ({"Name": "w", "Port": 1, "Checks": [{"TTL": "1s"}, {"TTL": "x"}]}, "Checks[1].TTL"),
        ({"Name": "w", "Port": 1, "Check": {"TTL": "1s", "Status": "ok"}}, "Check.Status"),
        ({"Name": "w", "Port": 1, "Locality": {"Region": "a b"}}, "Locality.Region"),
        ([], "body"),
        (b"", "body"),
        (b"{", "body"),
        (b"\xff", "body"),
    ],
)
def test_refusals_name_the_field(body: Any, field: str) -> None:
    assert refused(body) == field


# Keys a client might send, in every casing, and some it should not.
_KEYS = st.sampled_from(
    sorted(
        {*SERVICE_FIELDS.values(), *(k.lower() for k in SERVICE_FIELDS.values())}
        | {*CHECK_FIELDS.values(), "service_id", "deregister_critical_service_after", "x"}
    )
)
_SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True),
    st.text(max_size=30),
    st.sampled_from(["10s", "1m0s", "http://192.0.2.1:80/", "192.0.2.1:80", "passing", "web"]),
)
_JSON = st.recursive(
    _SCALARS,
    lambda inner: (
        st.lists(inner, max_size=4)
        | st.dictionaries(_KEYS | st.text(max_size=8), inner, max_size=6)
    ),
    max_leaves=30,
)


@settings(max_examples=200, deadline=None)
@given(st.dictionaries(_KEYS, _JSON, max_size=10))
def test_garbage_bodies_are_400s_naming_a_field(body: dict[str, Any]) -> None:
    raw = json.dumps(body).encode()
    try:
        reg = parse_registration(raw, NODE)
    except RegistryError as exc:
        assert exc.status == 400
        assert isinstance(exc.detail, list) and exc.detail[0]["field"]
        return
    # What is taken is something interknit can hold.
    assert is_label(reg.service) and is_label(reg.instance_id)
    assert 1 <= reg.spec.port <= 65535 and 1 <= reg.spec.weight <= 1000


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=200))
def test_garbage_bytes_are_400s(raw: bytes) -> None:
    try:
        parse_registration(raw, NODE)
    except RegistryError as exc:
        assert exc.status == 400
