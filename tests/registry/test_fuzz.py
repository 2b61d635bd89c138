"""Hypothesis throws random bodies at the API: nothing but 4xx comes back, nothing is written."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from interknit.config import ConfigError, parse_config
from tests.nodeproc import NodeProcess

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children, max_size=4)
    ),
    max_leaves=12,
)
near_valid = st.fixed_dictionaries(
    {},
    optional={
        "address": st.one_of(st.text(max_size=30), st.just("127.0.0.1"), st.integers()),
        "port": st.one_of(st.integers(-5, 70000), st.text(max_size=5), st.none()),
        "tags": st.one_of(st.lists(st.text(max_size=8), max_size=3), st.text(max_size=5)),
        "weight": st.one_of(st.integers(-3, 2000), st.floats(allow_nan=False)),
        "check": st.one_of(
            json_values,
            st.fixed_dictionaries(
                {},
                optional={
                    "ttl": st.text(max_size=6),
                    "http": st.text(max_size=6),
                    "tcp": json_values,
                },
            ),
        ),
        "meta": json_values,
        "zone": json_values,
        "bogus": json_values,
    },
)


@pytest.fixture(scope="module")
def shared_node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NodeProcess]:
    node = NodeProcess(Path(tmp_path_factory.mktemp("fuzz"))).start()
    node.register("keep", "one")
    try:
        yield node
    finally:
        node.stop()


@settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
@given(body=st.one_of(json_values, near_valid))
def test_random_bodies_get_4xx_and_change_nothing(shared_node: NodeProcess, body: Any) -> None:
    before = shared_node.client.get("/v1/services").json()
    r = shared_node.client.put("/v1/services/fuzz/instances/x", content=json.dumps(body))
    if r.status_code == 200:  # hypothesis found a valid registration: it must be stored as sent
        stored = r.json()
        assert isinstance(body, dict)
        assert (stored["address"], stored["port"]) == (body["address"], body["port"])
        shared_node.client.delete("/v1/services/fuzz/instances/x")
        return
    assert 400 <= r.status_code < 500, r.text
    assert r.json()["error"]
    assert shared_node.client.get("/v1/services").json() == before


@settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
@given(raw=st.binary(max_size=200))
def test_random_bytes_get_4xx(shared_node: NodeProcess, raw: bytes) -> None:
    r = shared_node.client.put("/v1/services/fuzz/instances/x", content=raw)
    if r.status_code == 200:
        shared_node.client.delete("/v1/services/fuzz/instances/x")
        return
    assert 400 <= r.status_code < 500


@settings(max_examples=300, deadline=None)
@given(
    data=st.dictionaries(
        st.sampled_from(["node", "registry", "dns", "listeners", "services", "junk"]),
        json_values,
        max_size=3,
    )
)
def test_config_parser_only_raises_config_errors(data: dict[str, Any]) -> None:
    try:
        parse_config(data)
    except ConfigError as exc:
        assert str(exc).split(":")[0]
