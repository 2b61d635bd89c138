"""Reading the API's instance objects back into registry values."""

from __future__ import annotations

import pytest

from interknit.client.model import Lookup, Query, parse_instance, url
from interknit.registry.model import Check, Instance, InstanceSpec


def test_round_trip_through_the_api_json() -> None:
    original = Instance(
        service="search",
        id="s1",
        spec=InstanceSpec(
            address="10.0.0.5",
            port=9001,
            zone="z1",
            region="eu",
            weight=3,
            tags=("v1", "blue"),
            meta=(("version", "1.2"),),
            check=Check(ttl=10.0, deregister_after=60.0),
        ),
        check_status="warning",
        ejected_until=1234.5,
        output="slow",
        mod_revision=9,
    )
    parsed = parse_instance(original.to_json())
    assert parsed == original
    assert parsed.health == "warning" and parsed.spec.meta_dict == {"version": "1.2"}


@pytest.mark.parametrize("health", ["passing", "warning", "critical", "draining", "maintenance"])
def test_every_health_reads_back(health: str) -> None:
    data = {"service": "a", "id": "b", "address": "h", "port": 1, "health": health}
    assert parse_instance(data).health == health


def test_bad_input_raises() -> None:
    with pytest.raises(ValueError):
        parse_instance({"service": "a", "id": "b", "address": "h", "port": 1, "health": "meh"})
    with pytest.raises(KeyError):
        parse_instance({"service": "a", "id": "b", "port": 1})


def test_http_check_reads_back() -> None:
    data = {
        "service": "a",
        "id": "b",
        "address": "h",
        "port": 1,
        "check": {"http": "/health", "interval": "1s", "timeout": "500ms", "rise": 1, "fall": 2},
        "health": "critical",
    }
    check = parse_instance(data).check
    assert check == Check(http="/health", interval=1.0, timeout=0.5, rise=1, fall=2)


def test_url_and_lookup_helpers() -> None:
    v4 = parse_instance({"service": "a", "id": "b", "address": "10.0.0.1", "port": 80})
    v6 = parse_instance(
        {"service": "a", "id": "c", "address": "::1", "port": 81, "health": "critical"}
    )
    assert url(v4, "x") == "http://10.0.0.1:80/x"
    assert url(v6, "/y", scheme="https") == "https://[::1]:81/y"
    lookup = Lookup("a", (v4, v6), 3, False, 0.0)
    assert list(lookup) == [v4, v6]
    assert lookup.passing == (v4,)
    assert lookup.addresses() == [("10.0.0.1", 80), ("::1", 81)]


def test_query_params_and_filter() -> None:
    assert Query("a").params() == {"healthy": "1"}
    assert Query("a", healthy=False, tag="v1").params() == {"tag": "v1"}
    tagged = parse_instance(
        {"service": "a", "id": "b", "address": "h", "port": 1, "tags": ["v1"], "health": "warning"}
    )
    assert not Query("a").matches(tagged)
    assert Query("a", healthy=False, tag="v1").matches(tagged)
    assert not Query("a", healthy=False, tag="v2").matches(tagged)
