"""Containers read into registrations: labels, Registrator's variables, ports and addresses."""

from __future__ import annotations

import json

from hypothesis import given, settings
from hypothesis import strategies as st

from interknit.agent.container import Container, Port
from interknit.agent.labels import Policy, desired, desired_all, image_name
from interknit.registry.model import is_label
from interknit.registry.schema import register_spec

POLICY = Policy(host="h1", owner="agent:h1", address="192.0.2.10")
CID = "a" * 64


def box(
    labels: dict[str, str] | None = None,
    env: dict[str, str] | None = None,
    ports: tuple[Port, ...] = (Port(80, "tcp", "127.0.0.1", 18080),),
    **kw: object,
) -> Container:
    fields: dict[str, object] = {
        "id": CID,
        "name": "web_1",
        "image": "registry.example/team/nginx:1.25",
        "labels": labels or {},
        "env": env or {},
        "ports": ports,
        "networks": (("ik-net", "10.88.0.7"),),
    }
    fields.update(kw)
    return Container(**fields)  # type: ignore[arg-type]


def one(c: Container, policy: Policy = POLICY) -> tuple[str, str, dict[str, object]]:
    made, problems = desired(c, policy)
    assert not problems, problems
    assert len(made) == 1, made
    d = made[0]
    return d.service, d.id, d.spec.to_json()


def test_a_labelled_container_is_registered_at_its_published_port() -> None:
    service, iid, spec = one(box({"interknit.service": "web", "interknit.tags": "v1, eu"}))
    assert (service, spec["address"], spec["port"]) == ("web", "127.0.0.1", 18080)
    assert spec["tags"] == ["v1", "eu"]
    assert is_label(iid) and iid.startswith("h1-web-1-80")
    assert spec["meta"] == {"owner": "agent:h1", "container": CID[:12], "container_name": "web_1"}
    # No check of its own: a lease the agent renews, so a dead agent's registrations end.
    assert spec["check"] == {"ttl": "30s", "deregister_after": "1m"}


def test_without_a_name_nothing_is_registered_unless_asked_for_all() -> None:
    assert desired(box(), POLICY) == ([], [])
    everyone = Policy(host="h1", owner="agent:h1", address="192.0.2.10", explicit=False)
    assert one(box(), everyone)[0] == "nginx"
    assert image_name("localhost/bb:1") == "bb" and image_name("redis@sha256:abc") == "redis"


def test_registrator_variables_are_read() -> None:
    env = {
        "SERVICE_NAME": "Billing_API",
        "SERVICE_TAGS": "prod,blue",
        "SERVICE_CHECK_HTTP": "/health",
        "SERVICE_CHECK_INTERVAL": "5s",
        "SERVICE_REGION": "us-east",
        "SERVICE_WEIGHT": "7",
        "SERVICE_TEAM": "payments",
    }
    service, _, spec = one(box(env=env))
    assert service == "billing-api"
    assert spec["tags"] == ["prod", "blue"] and spec["weight"] == 7
    check = spec["check"]
    assert isinstance(check, dict)
    assert check["http"] == "/health" and check["interval"] == "5s"
    assert spec["region"] == "us-east"
    meta = spec["meta"]
    assert isinstance(meta, dict) and meta["team"] == "payments"  # other SERVICE_X: meta
    # Labels of the same name count too, and win over the environment; interknit.* wins over
    # both.
    c = box({"SERVICE_NAME": "from-label"}, env={"SERVICE_NAME": "from-env"})
    assert one(c)[0] == "from-label"
    c = box({"SERVICE_NAME": "from-label", "interknit.service": "ours"})
    assert one(c)[0] == "ours"


def test_ignore_leaves_a_container_or_a_port_alone() -> None:
    assert desired(box(env={"SERVICE_NAME": "x", "SERVICE_IGNORE": "true"}), POLICY) == ([], [])
    assert desired(box({"interknit.service": "x", "interknit.ignore": "1"}), POLICY) == ([], [])
    ports = (Port(80, "tcp", "127.0.0.1", 1080), Port(443, "tcp", "127.0.0.1", 1443))
    made, _ = desired(
        box({"interknit.service": "x", "interknit.443.ignore": "yes"}, ports=ports), POLICY
    )
    assert [d.spec.port for d in made] == [1080]


def test_several_ports_are_named_as_registrator_names_them() -> None:
    ports = (Port(80, "tcp", "127.0.0.1", 1080), Port(443, "tcp", "127.0.0.1", 1443))
    made, _ = desired(box({"interknit.service": "web"}, ports=ports), POLICY)
    assert sorted(d.service for d in made) == ["web-443", "web-80"]
    labels = {"interknit.service": "web", "interknit.443.service": "tls"}
    made, _ = desired(box(labels, ports=ports), POLICY)
    assert sorted(d.service for d in made) == ["tls", "web-80"]
    made, _ = desired(
        box(env={"SERVICE_80_NAME": "plain", "SERVICE_443_NAME": "tls"}, ports=ports), POLICY
    )
    assert sorted(d.service for d in made) == ["plain", "tls"]
    # Per-port checks and tags apply to their port only.
    labels = {
        "interknit.service": "web",
        "interknit.80.check.http": "/ping",
        "interknit.443.tags": "secure",
    }
    made, _ = desired(box(labels, ports=ports), POLICY)
    by_port = {d.spec.port: d.spec for d in made}
    assert by_port[1080].check is not None and by_port[1080].check.http == "/ping"
    assert by_port[1443].tags == ("secure",) and by_port[1080].tags == ()


def test_addresses_are_the_published_ones_never_a_wildcard() -> None:
    labels = {"interknit.service": "web"}
    for host_ip, expected in [
        ("127.0.0.2", "127.0.0.2"),
        ("0.0.0.0", "192.0.2.10"),
        ("", "192.0.2.10"),
        ("::", "192.0.2.10"),
        ("2001:db8::5", "2001:db8::5"),
    ]:
        _, _, spec = one(box(labels, ports=(Port(80, "tcp", host_ip, 9000),)))
        assert spec["address"] == expected
    # Unpublished ports are not registered; with --internal the container's own address is.
    assert desired(box(labels, ports=(Port(80),)), POLICY) == ([], [])
    internal = Policy(host="h1", owner="agent:h1", address="192.0.2.10", internal=True)
    _, _, spec = one(box(labels, ports=(Port(80),)), internal)
    assert (spec["address"], spec["port"]) == ("10.88.0.7", 80)
    two = (("back", "10.1.0.5"), ("front", "10.2.0.5"))
    picky = Policy(
        host="h1", owner="agent:h1", address="192.0.2.10", internal=True, network="front"
    )
    _, _, spec = one(box(labels, networks=two), picky)
    assert spec["address"] == "10.2.0.5"
    # With the host's network, exposed ports are on the host's address.
    _, _, spec = one(box(labels, ports=(Port(8080),), network_mode="host"))
    assert (spec["address"], spec["port"]) == ("192.0.2.10", 8080)
    # UDP ports have no registration (no health check or proxy speaks them).
    assert desired(box(labels, ports=(Port(53, "udp", "127.0.0.1", 5353),)), POLICY) == ([], [])


def test_health_gates_registration() -> None:
    labels = {"interknit.service": "web"}
    assert desired(box(labels, health="starting"), POLICY) == ([], [])
    assert desired(box(labels, health="unhealthy"), POLICY) == ([], [])
    assert one(box(labels, health="healthy"))[0] == "web"
    assert desired(box(labels, running=False), POLICY) == ([], [])


def test_bad_labels_are_problems_that_name_the_label() -> None:
    cases = {
        "interknit.service": ("bad name!", "interknit.service"),
        "interknit.weight": ("heavy", "interknit.weight"),
        "interknit.check.interval": ("soon", "interknit.check.interval"),
        "interknit.check.http": ("health", "interknit.check.http"),
        "interknit.id": ("Not_A_Label", "interknit.id"),
    }
    for key, (value, named) in cases.items():
        labels = {"interknit.service": "web", key: value}
        made, problems = desired(box(labels), POLICY)
        assert made == [] and len(problems) == 1
        assert named in problems[0] and "web_1" in problems[0]


def test_two_containers_asking_for_one_id_keep_the_first() -> None:
    a = box({"interknit.service": "web", "interknit.id": "one"})
    b = box({"interknit.service": "web", "interknit.id": "one"}, id="b" * 64, name="other")
    wanted, problems = desired_all([b, a], POLICY)
    assert [d.container for d in wanted.values()] == [CID]
    assert len(problems) == 1 and "other" in problems[0]


def test_durations_are_spelt_as_the_registry_spells_them() -> None:
    labels = {
        "interknit.service": "web",
        "interknit.check.http": "/h",
        "interknit.check.interval": "1.0005s",
    }
    [d], _ = desired(box(labels), POLICY)
    assert d.spec.check is not None and d.spec.check.interval == 1.0  # whole milliseconds
    assert register_spec(json.dumps(d.spec.to_json()).encode()) == d.spec


def test_the_lease_or_a_check() -> None:
    no_lease = Policy(host="h1", owner="agent:h1", address="192.0.2.10", ttl=None)
    assert one(box({"interknit.service": "web"}), no_lease)[2]["check"] is None
    labels = {"interknit.service": "web", "interknit.check.tcp": "true"}
    check = one(box(labels))[2]["check"]
    assert isinstance(check, dict) and check["tcp"] is True and check["deregister_after"] == "1m"


# ---------------------------------------------------------------------- any container

KEYS = st.sampled_from(
    [
        "interknit.service",
        "interknit.tags",
        "interknit.weight",
        "interknit.check.http",
        "interknit.check.tcp",
        "interknit.check.interval",
        "interknit.zone",
        "interknit.id",
        "interknit.ignore",
        "interknit.80.service",
        "interknit.443.tags",
        "SERVICE_NAME",
        "SERVICE_TAGS",
        "SERVICE_80_NAME",
        "SERVICE_CHECK_HTTP",
        "SERVICE_IGNORE",
        "SERVICE_REGION",
        "SERVICE_x y",
        "other.label",
    ]
)
VALUES = st.one_of(
    st.sampled_from(
        ["web", "Web_App", "v1,v2", "/health", "1s", "0.0001s", "1.0005s", "5", "true", ""]
    ),
    st.text(max_size=80),
)
PORTS = st.lists(
    st.builds(
        Port,
        private=st.sampled_from([80, 443, 8080]),
        proto=st.sampled_from(["tcp", "udp"]),
        host_ip=st.sampled_from([None, "", "0.0.0.0", "::", "127.0.0.1", "10.0.0.9"]),
        host_port=st.one_of(st.none(), st.integers(1, 65535)),
    ),
    max_size=3,
)


@settings(max_examples=300, deadline=None)
@given(
    labels=st.dictionaries(KEYS, VALUES, max_size=8),
    env=st.dictionaries(KEYS.filter(lambda k: k.startswith("SERVICE_")), VALUES, max_size=4),
    ports=PORTS,
    name=st.text(min_size=1, max_size=100),
    internal=st.booleans(),
    explicit=st.booleans(),
)
def test_any_container_gives_registrations_the_registry_takes_as_they_are(
    labels: dict[str, str],
    env: dict[str, str],
    ports: list[Port],
    name: str,
    internal: bool,
    explicit: bool,
) -> None:
    policy = Policy(
        host="h1", owner="agent:h1", address="192.0.2.10", internal=internal, explicit=explicit
    )
    # Most containers name their service and have a check: the interesting part.
    labels = {"interknit.service": "web", "interknit.check.tcp": "1", **labels}
    c = box(labels, env, ports=tuple(ports), name=name)
    made, problems = desired(c, policy)
    assert all(isinstance(p, str) and p for p in problems)
    for d in made:
        assert is_label(d.service) and is_label(d.id)
        assert d.spec.address not in ("0.0.0.0", "::", "")
        # The registry's own validation takes the body, and reads back the very same spec:
        # so a resync compares equal and writes nothing.
        assert register_spec(json.dumps(d.spec.to_json()).encode()) == d.spec
        assert d.spec.meta_dict["owner"] == "agent:h1"
