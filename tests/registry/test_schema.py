"""The registration body's quick check agrees with pydantic's on every body."""

from __future__ import annotations

import json
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from interknit.registry.model import InstanceSpec
from interknit.registry.schema import RegisterBody, _plain_spec, parse_body, register_spec
from interknit.registry.state import RegistryError

good_labels = st.sampled_from(["web", "a", "eu-1", "x" * 63, "1"])
bad_labels = st.sampled_from(["x" * 64, "-a", "a-", "A", "", "é", "a_b"])
good_durations = st.sampled_from(["30s", "10ms", "1h30m", "1.5s", "2m", "7d"[0] + "s"])
bad_durations = st.sampled_from(["9ms", "0s", "5 s", " 5s", "8d", "abc", "", "169h"])
anything = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-2, 70000),
    st.floats(allow_nan=False),
    st.text(max_size=4),
)
valid = st.fixed_dictionaries(
    {
        "address": st.one_of(st.ip_addresses(v=4).map(str), st.just("127.0.0.1")),
        "port": st.sampled_from([1, 80, 9000, 65535]),
    },
    optional={
        "weight": st.sampled_from([1, 7, 1000]),
        "zone": good_labels,
        "region": good_labels,
        "tags": st.lists(good_labels, max_size=5),
        "meta": st.dictionaries(
            st.sampled_from(["k", "a.b", "X_1", "x" * 128]),
            st.sampled_from(["", "v", "v" * 512]),
            max_size=3,
        ),
        "check": st.fixed_dictionaries(
            {"ttl": good_durations}, optional={"deregister_after": good_durations}
        ),
    },
)
# One field made wrong, or near a limit, or of a kind the quick check leaves to pydantic.
changes = st.one_of(
    st.tuples(
        st.just("address"),
        st.one_of(
            anything,
            st.sampled_from(
                ["256.1.1.1", "01.2.3.4", "1.2.3", "::1", "db.example", "-bad-", "1.2.3.4 "]
            ),
        ),
    ),
    st.tuples(st.just("port"), st.one_of(anything, st.sampled_from([0, 65536, True, 9000.0]))),
    st.tuples(st.just("weight"), st.one_of(anything, st.sampled_from([0, 1001, False]))),
    st.tuples(st.sampled_from(["zone", "region"]), st.one_of(anything, bad_labels)),
    st.tuples(
        st.just("tags"),
        st.one_of(
            anything,
            st.lists(st.one_of(good_labels, bad_labels, anything), max_size=3),
            st.integers(63, 66).map(lambda n: ["a"] * n),
        ),
    ),
    st.tuples(
        st.just("meta"),
        st.one_of(
            anything,
            st.dictionaries(
                st.sampled_from(["k", "x" * 129, "", "bad key", "é"]),
                st.one_of(st.sampled_from(["v", "v" * 513]), anything),
                max_size=2,
            ),
            st.integers(64, 65).map(lambda n: {f"k{i}": "v" for i in range(n)}),
        ),
    ),
    st.tuples(
        st.just("check"),
        st.one_of(
            anything,
            st.fixed_dictionaries(
                {},
                optional={
                    "ttl": st.one_of(good_durations, bad_durations, anything),
                    "deregister_after": st.one_of(good_durations, bad_durations, anything),
                    "interval": good_durations,
                    "tcp": st.booleans(),
                    "http": st.just("/health"),
                },
            ),
        ),
    ),
    st.tuples(st.sampled_from(["bogus", "address", "port"]), st.just(None)),
)
bodies = st.builds(
    lambda body, edits, drop: {
        **{k: v for k, v in body.items() if k != drop},
        **dict(edits),
    },
    valid,
    st.lists(changes, max_size=2),
    st.sampled_from([None, None, None, "address", "port"]),
)


def pydantic_answer(raw: bytes) -> InstanceSpec | str:
    try:
        spec: InstanceSpec = parse_body(RegisterBody, raw).to_spec()
        return spec
    except RegistryError as exc:
        return exc.message


def quick_answer(raw: bytes) -> InstanceSpec | str:
    try:
        return register_spec(raw)
    except RegistryError as exc:
        return exc.message


def encodings(body: dict[str, Any]) -> list[bytes]:
    plain = json.dumps(body).encode()
    return [
        plain,
        json.dumps(body, separators=(",", ":"), ensure_ascii=False).encode(),
        plain.replace(b'"', b'"\\u0061', 1) if b'"' in plain else plain,  # an escape
        plain[:-1] + b', "port": 80}' if plain != b"{}" else plain,  # a key twice
        b"  " + plain + b" x",  # trailing garbage
    ]


@settings(max_examples=600, deadline=None)
@given(bodies)
def test_the_quick_check_and_pydantic_give_the_same_answer(body: dict[str, Any]) -> None:
    for raw in encodings(body):
        expected = pydantic_answer(raw)
        assert quick_answer(raw) == expected, raw
        quick = _plain_spec(raw)
        if quick is not None:
            assert quick == expected, raw


def test_the_usual_bodies_take_the_quick_check() -> None:
    usual = [
        {"address": "127.0.0.1", "port": 9000, "tags": ["bench"], "check": {"ttl": "30s"}},
        {"address": "10.1.2.3", "port": 80},
        {
            "address": "10.1.2.3",
            "port": 443,
            "zone": "eu-1",
            "weight": 5,
            "meta": {"version": "1.2"},
            "check": {"ttl": "10s", "deregister_after": "1m"},
        },
    ]
    for body in usual:
        raw = json.dumps(body).encode()
        assert _plain_spec(raw) == parse_body(RegisterBody, raw).to_spec()


BASE = {
    "address": "10.0.0.1",
    "port": 80,
    "zone": "eu-1",
    "region": "eu",
    "weight": 3,
    "tags": ["web"],
    "meta": {"version": "1"},
    "check": {"ttl": "30s", "deregister_after": "1m"},
}
EDGES: list[tuple[str, Any]] = [
    ("port", 0),
    ("port", 1),
    ("port", 65535),
    ("port", 65536),
    ("port", True),
    ("port", 80.0),
    ("port", "80"),
    ("weight", 0),
    ("weight", 1000),
    ("weight", 1001),
    ("weight", True),
    ("tags", ["a"] * 64),
    ("tags", ["a"] * 65),
    ("tags", ["x" * 63, "x" * 63]),
    ("tags", ["x" * 64]),
    ("tags", ["b", "a", "b"]),
    ("tags", None),
    ("meta", {"x" * 128: "v"}),
    ("meta", {"x" * 129: "v"}),
    ("meta", {"k": "v" * 512}),
    ("meta", {"k": "v" * 513}),
    ("meta", {f"k{i}": "v" for i in range(64)}),
    ("meta", {f"k{i}": "v" for i in range(65)}),
    ("meta", {"b": "1", "a": "2"}),
    ("meta", {"k": 1}),
    ("check", {"ttl": "10ms"}),
    ("check", {"ttl": "9ms"}),
    ("check", {"ttl": "168h"}),
    ("check", {"ttl": "169h"}),
    ("check", {"ttl": "30s", "deregister_after": "0s"}),
    ("check", {"ttl": "30s", "deregister_after": "soon"}),
    ("check", {"ttl": "30s", "deregister_after": None}),
    ("check", {"ttl": None}),
    ("check", {}),
    ("check", None),
    ("zone", "x" * 63),
    ("zone", "x" * 64),
    ("zone", None),
    ("region", "A"),
    ("address", "255.255.255.255"),
    ("address", "256.0.0.1"),
    ("address", "::1"),
    ("address", "host.example"),
]


def test_the_quick_check_and_pydantic_agree_at_every_limit() -> None:
    for field, value in EDGES:
        raw = json.dumps({**BASE, field: value}).encode()
        assert quick_answer(raw) == pydantic_answer(raw), (field, value)
        quick = _plain_spec(raw)
        assert quick is None or quick == pydantic_answer(raw), (field, value)
