"""Consul's ?filter= subset and the query parameters (pure, no IO)."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from interknit.compat.filters import FilterError, compile_filter
from interknit.compat.query import DEFAULT_WAIT, MAX_WAIT, parse_query
from interknit.compat.views import CATALOG_SCHEMA, HEALTH_SCHEMA
from interknit.registry.state import RegistryError

ROW: dict[str, Any] = {
    "Node": {"Node": "node-1", "Datacenter": "dc1", "Meta": {"rack": "r1"}},
    "Service": {
        "ID": "web-1",
        "Service": "web",
        "Tags": ["primary", "v2"],
        "Meta": {"version": "2.1"},
        "Port": 8080,
        "Address": "10.0.0.1",
        "Weights": {"Passing": 3, "Warning": 1},
        "EnableTagOverride": False,
    },
    "Checks": [{"Status": "passing"}],
}


def matches(text: str, row: dict[str, Any] = ROW) -> bool:
    return compile_filter(text, HEALTH_SCHEMA).test(row)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ('Service.Service == "web"', True),
        ("Service.Service == web", True),
        ("Service.Service != `web`", False),
        ('"primary" in Service.Tags', True),
        ('"canary" not in Service.Tags', True),
        ("Service.Tags contains v2", True),
        ('Service.Tags not contains "v2"', False),
        ("Service.Meta.version == 2.1", True),
        ('Service.Meta.version matches "^2\\\\."', True),
        ('Service.Meta.version not matches "^3"', True),
        ('Service.Meta.missing == ""', True),
        ('"version" in Service.Meta', True),
        ('"10.0" in Service.Address', True),
        ("Service.Port == 8080", True),
        ("Service.Weights.Passing == 3", True),
        ("Service.EnableTagOverride == false", True),
        ("Service.Tags is not empty", True),
        ("Service.Meta.other is empty", True),
        ("Checks is not empty", True),
        ("Node.Meta.rack == r1 and Service.Port == 8080", True),
        ("Node.Meta.rack == r2 or Service.Port == 8080", True),
        ("not Service.Port == 8080", False),
        ('not (Service.Port == 1 or Service.Service == "db") and Service.ID == web-1', True),
        ("Service.Port == 1 or Service.Port == 2 and Service.Port == 8080", False),
    ],
)
def test_subset_evaluates_as_consul(text: str, expected: bool) -> None:
    assert matches(text) is expected


@pytest.mark.parametrize(
    ("text", "says"),
    [
        ("Service.Nope == 1", "unknown selector 'Service.Nope'"),
        ("Checks.Status == passing", "inside a list of objects"),
        ("Service == web", "is an object"),
        ("Service.Tags == primary", "== does not apply"),
        ("Service.Port == eighty", "not a number"),
        ("Service.Port matches 8", "matches does not apply"),
        ('Service.ID matches "(a+)+$"', "nested quantifiers"),
        ('Service.ID matches "(a)\\\\1"', "back-references"),
        ('Service.ID matches "["', "not a regular expression"),
        ("Service.ID ==", "ends too early"),
        ("Service.ID < 3", "operator '<' after Service.ID is not supported"),
        ("(Service.ID == a", "ends too early"),
        ("Service.ID == a b", "unexpected 'b'"),
        ("", "is empty"),
        ("(" * 40 + "Service.ID == a" + ")" * 40, "nested more than"),
    ],
)
def test_outside_the_subset_is_a_400_naming_it(text: str, says: str) -> None:
    with pytest.raises(FilterError) as caught:
        compile_filter(text, HEALTH_SCHEMA)
    assert caught.value.status == 400
    assert caught.value.message.startswith("filter: ")
    assert says in caught.value.message


_WORDS = st.sampled_from(
    ["and", "or", "not", "in", "is", "empty", "contains", "matches", "(", ")", "==", "!=",
     '"x"', "`y`", "ServiceName", "ServiceTags", "ServiceMeta.a", "ServicePort", "1", "\\"]
)  # fmt: skip


@settings(max_examples=500, deadline=None)
@given(st.lists(_WORDS, max_size=12).map(" ".join) | st.text(max_size=60))
def test_garbage_filters_compile_or_are_400s(text: str) -> None:
    try:
        compiled = compile_filter(text, CATALOG_SCHEMA)
    except FilterError as exc:
        assert exc.status == 400
        return
    compiled.test({"ServiceName": "w", "ServiceTags": ["a"], "ServiceMeta": {}, "ServicePort": 1})


def test_query_reads_consul_parameters() -> None:
    q = parse_query(
        [
            ("index", "42"),
            ("wait", "120000ms"),
            ("stale", ""),
            ("tag", "a"),
            ("tag", "b"),
            ("passing", "1"),
            ("node-meta", "rack:r1"),
            ("dc", "DC1"),
            ("ns", "whatever"),
            ("partition", "x"),
            ("near", "_agent"),
            ("filter", "ServiceTags contains a"),
        ],
        datacenter="dc1",
        schema=CATALOG_SCHEMA,
        tags=True,
        passing=True,
    )
    assert (q.index, q.wait, q.stale, q.tags, q.passing) == (42, 120.0, True, ("a", "b"), True)
    assert q.node_meta == (("rack", "r1"),) and q.filter is not None
    assert parse_query([("wait", "1s")], datacenter="dc1").wait == 1.0
    assert parse_query([("wait", "1h")], datacenter="dc1").wait == MAX_WAIT
    assert parse_query([], datacenter="dc1").wait == DEFAULT_WAIT
    assert parse_query([("wait", "0")], datacenter="dc1").wait == DEFAULT_WAIT
    # Tags and passing count only where the endpoint takes them.
    assert parse_query([("tag", "a"), ("passing", "")], datacenter="dc1").tags == ()


@pytest.mark.parametrize(
    ("pairs", "param"),
    [
        ([("index", "-1")], "index"),
        ([("index", "1" * 21)], "index"),
        ([("index", str(2**64))], "index"),
        ([("wait", "forever")], "wait"),
        ([("dc", "dc2")], "dc"),
        ([("stale", ""), ("consistent", "")], "consistent"),
        ([("node-meta", "nocolon")], "node-meta"),
        ([("passing", "maybe")], "passing"),
        ([("peer", "other")], "peer"),
        ([("filter", "Nope == 1")], "filter"),
    ],
)
def test_bad_parameters_are_400s_naming_them(pairs: list[tuple[str, str]], param: str) -> None:
    with pytest.raises(RegistryError) as caught:
        parse_query(pairs, datacenter="dc1", schema=CATALOG_SCHEMA, passing=True)
    assert caught.value.status == 400
    assert caught.value.message.startswith(f"{param}: ")


_PARAM_NAMES = st.sampled_from(
    [
        "index",
        "wait",
        "stale",
        "consistent",
        "cached",
        "dc",
        "tag",
        "passing",
        "node-meta",
        "filter",
        "peer",
        "ns",
    ]
)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(_PARAM_NAMES | st.text(max_size=6), st.text(max_size=40)), max_size=8))
def test_garbage_parameters_are_400s_naming_them(pairs: list[tuple[str, str]]) -> None:
    try:
        q = parse_query(pairs, datacenter="dc1", schema=HEALTH_SCHEMA, tags=True, passing=True)
    except RegistryError as exc:
        assert exc.status == 400
        assert isinstance(exc.detail, list) and exc.detail[0]["field"]
        return
    assert 0 <= q.index < 2**64 and 0 < q.wait <= MAX_WAIT
