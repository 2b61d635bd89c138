"""What the agent reads from a container engine: inspect answers, listings, the event stream
and where the engine is. Bad input is an error naming the field, never a crash."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from interknit.agent.container import ContainerError, Port, parse_inspect, parse_list
from interknit.agent.engine import (
    EngineError,
    EventParser,
    engine_address,
    parse_event,
)

CID = "485bb4c7ee56" + "0" * 52

# Trimmed from Podman 4.3's compatible API (the tests of the real engine read the rest).
PODMAN_INSPECT: dict[str, Any] = {
    "Id": CID,
    "Name": "/w1",
    "State": {
        "Status": "running",
        "Running": True,
        "Paused": False,
        "Restarting": False,
        "Health": {"Status": "healthy", "FailingStreak": 0, "Log": []},
    },
    "Config": {
        "Image": "localhost/bb:1",
        "Labels": {"interknit.service": "web"},
        "Env": ["PATH=/bin", "SERVICE_TAGS=v1", "container=podman"],
        "ExposedPorts": {"80/tcp": {}, "9000/tcp": {}},
    },
    "HostConfig": {"NetworkMode": "bridge"},
    "NetworkSettings": {
        "Ports": {
            "80/tcp": [
                {"HostIp": "::", "HostPort": "18091"},
                {"HostIp": "0.0.0.0", "HostPort": "18091"},
            ],
            "53/udp": None,
        },
        "Networks": {"ik-net": {"IPAddress": "10.233.45.2", "Gateway": "10.233.45.1"}},
    },
}


def test_an_inspect_answer_reads() -> None:
    c = parse_inspect(PODMAN_INSPECT)
    assert (c.id, c.name, c.short_id, c.image) == (CID, "w1", CID[:12], "localhost/bb:1")
    assert c.running and c.health == "healthy"
    assert c.labels == {"interknit.service": "web"}
    assert c.env == {"SERVICE_TAGS": "v1"}  # only what Registrator reads
    assert c.ports == (
        Port(53, "udp"),
        Port(80, "tcp", "0.0.0.0", 18091),  # the IPv4 binding first
        Port(9000, "tcp"),
    )
    assert c.networks == (("ik-net", "10.233.45.2"),)


def test_a_paused_or_restarting_container_does_not_run() -> None:
    for flag in ("Paused", "Restarting"):
        data = json.loads(json.dumps(PODMAN_INSPECT))
        data["State"][flag] = True
        assert not parse_inspect(data).running


@pytest.mark.parametrize(
    ("path", "value", "named"),
    [
        (("Id",), "not-an-id", "Id"),
        (("Name",), 7, "Name"),
        (("Config", "Labels"), ["x"], "Config.Labels"),
        (("Config", "Labels"), {"k": 1}, "Config.Labels.k"),
        (("Config", "Env"), "PATH=/", "Config.Env"),
        (("NetworkSettings", "Ports"), {"http": None}, "NetworkSettings.Ports"),
        (("NetworkSettings", "Ports"), {"80/tcp": [{"HostPort": "99999"}]}, "HostPort"),
        (("NetworkSettings", "Ports"), {"80/tcp": [{"HostPort": "1", "HostIp": "x"}]}, "HostIp"),
        (("State", "Health"), {"Status": "fine"}, "State.Health.Status"),
        (("NetworkSettings", "Networks"), {"n": {"IPAddress": "nope"}}, "IPAddress"),
    ],
)
def test_what_does_not_read_is_named(path: tuple[str, ...], value: object, named: str) -> None:
    data = json.loads(json.dumps(PODMAN_INSPECT))
    target = data
    for part in path[:-1]:
        target = target[part]
    target[path[-1]] = value
    with pytest.raises(ContainerError, match=named.replace(".", r"\.")):
        parse_inspect(data)


def test_listing_reads_ids() -> None:
    assert parse_list([{"Id": CID, "Names": ["/w1"]}]) == [CID]
    with pytest.raises(ContainerError, match=r"containers\[0\]\.Id"):
        parse_list([{"Id": "x"}])


JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=20),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner, max_size=4)
    ),
    max_leaves=30,
)


@settings(max_examples=300)
@given(
    patch=st.dictionaries(
        st.sampled_from(["Id", "Name", "State", "Config", "HostConfig", "NetworkSettings"]),
        JSON,
        max_size=3,
    )
)
def test_any_answer_reads_or_is_a_container_error(patch: dict[str, Any]) -> None:
    data = {**PODMAN_INSPECT, **patch}
    try:
        parse_inspect(data)
    except ContainerError as exc:
        assert str(exc)


def test_events_from_docker_and_podman() -> None:
    docker = {
        "Type": "container",
        "Action": "health_status: healthy",
        "status": "health_status: healthy",
        "id": CID,
        "time": 1700000000,
        "timeNano": 1700000000123456789,
    }
    event = parse_event(docker)
    assert event is not None and event.action == "health_status" and event.id == CID
    assert event.since == "1700000000.123456789"
    podman = {"status": "died", "id": CID, "Type": "container", "Action": "died", "time": 17}
    event = parse_event(podman)
    assert event is not None and event.action == "die" and event.since == "17.000000000"
    assert parse_event({"Type": "image", "Action": "pull", "id": CID}) is None
    assert parse_event({"Type": "container", "Action": "exec_create: sh", "id": CID}) is None
    assert parse_event({"Type": "container", "Action": "start", "id": "short"}) is None
    assert parse_event(["not", "an", "event"]) is None


@settings(max_examples=200)
@given(values=st.lists(JSON, max_size=6), cuts=st.lists(st.integers(0, 400), max_size=8))
def test_the_event_stream_reads_whatever_the_chunks(values: list[Any], cuts: list[int]) -> None:
    raw = "".join(json.dumps(v) + ("\n" if i % 2 else "") for i, v in enumerate(values))
    data = raw.encode()
    parser = EventParser()
    got: list[Any] = []
    start = 0
    for cut in sorted(c for c in cuts if c <= len(data)):
        got += parser.feed(data[start:cut])
        start = cut
    got += parser.feed(data[start:])
    # Values written back to back without a newline may merge only where JSON cannot tell
    # them apart (two numbers); objects, as engines send, never do.
    if all(isinstance(v, dict) for v in values):
        assert got == values


def test_an_endless_event_is_refused() -> None:
    parser = EventParser(limit=1000)
    with pytest.raises(EngineError):
        parser.feed(b'{"a": "' + b"x" * 2000)


def test_where_the_engine_is() -> None:
    assert engine_address(None, {}) == "unix:///var/run/docker.sock"
    assert engine_address(None, {"DOCKER_HOST": "unix:///run/pm.sock"}) == "unix:///run/pm.sock"
    assert engine_address("/tmp/x.sock", {"DOCKER_HOST": "tcp://h:1"}) == "unix:///tmp/x.sock"
    assert engine_address(None, {"DOCKER_HOST": "tcp://10.0.0.1:2375"}) == "http://10.0.0.1:2375"
    for bad in ("ssh://host", "tcp://nohost", "unix://"):
        with pytest.raises(ValueError):
            engine_address(bad, {})
