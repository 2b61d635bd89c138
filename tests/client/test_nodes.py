"""Node failover order (sans-IO)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from interknit.client.nodes import NodeList, normalize_node

N = ["http://a:1", "http://b:2", "http://c:3"]


def test_normalize() -> None:
    assert normalize_node("127.0.0.1:7470") == "http://127.0.0.1:7470"
    assert normalize_node("https://x:1/") == "https://x:1"
    with pytest.raises(ValueError):
        normalize_node(" ")
    with pytest.raises(ValueError):
        NodeList([])
    with pytest.raises(ValueError):
        NodeList(["a:1", "http://a:1"])
    assert NodeList("a:1, b:2").urls == ("http://a:1", "http://b:2")


def test_in_list_order_until_one_fails() -> None:
    nodes = NodeList(N)
    assert nodes.order(0.0) == N
    nodes.failed(N[0], 0.0, "refused")
    assert nodes.order(0.1) == [N[1], N[2], N[0]]
    assert nodes.order(0.1, include_resting=False) == [N[1], N[2]]
    assert nodes.errors() == {N[0]: "refused"}


def test_last_good_node_is_asked_first() -> None:
    nodes = NodeList(N)
    nodes.succeeded(N[2])
    assert nodes.preferred == N[2]
    assert nodes.order(0.0) == [N[2], N[0], N[1]]


def test_probation_doubles_and_success_clears_it() -> None:
    nodes = NodeList(N, retry_after=1.0, max_retry_after=3.0)
    nodes.failed(N[0], 0.0)
    assert N[0] not in nodes.order(0.9, include_resting=False)
    assert N[0] in nodes.order(1.0, include_resting=False)
    nodes.failed(N[0], 1.0)  # second failure: 2 s
    assert N[0] not in nodes.order(2.9, include_resting=False)
    assert N[0] in nodes.order(3.0, include_resting=False)
    nodes.failed(N[0], 3.0)  # third: 4 s, capped at 3
    assert N[0] in nodes.order(6.0, include_resting=False)
    nodes.succeeded(N[0])
    nodes.failed(N[0], 10.0)
    assert N[0] in nodes.order(11.0, include_resting=False)
    assert nodes.errors() == {N[0]: ""}


def test_every_node_resting_leaves_nothing_ready_but_all_in_full_order() -> None:
    nodes = NodeList(N)
    for url in N:
        nodes.failed(url, 0.0)
    assert nodes.order(0.1, include_resting=False) == []
    assert sorted(nodes.order(0.1)) == sorted(N)


@given(st.lists(st.tuples(st.sampled_from(N), st.booleans()), max_size=30), st.floats(0, 100))
def test_order_is_always_a_permutation(ops: list[tuple[str, bool]], now: float) -> None:
    nodes = NodeList(N)
    for i, (url, ok) in enumerate(ops):
        if ok:
            nodes.succeeded(url)
        else:
            nodes.failed(url, float(i))
    full = nodes.order(now)
    assert sorted(full) == sorted(N)
    ready = nodes.order(now, include_resting=False)
    assert full[: len(ready)] == ready
