"""The registry's values: their hand-written JSON agrees with json.dumps, records round-trip."""

from __future__ import annotations

import json

from hypothesis import given
from hypothesis import strategies as st

from interknit.registry.model import Check, Instance, InstanceSpec

labels = st.from_regex(r"[a-z0-9]([a-z0-9-]{0,10}[a-z0-9])?", fullmatch=True)
text = st.text(max_size=40)
times = st.none() | st.floats(min_value=0, max_value=2e9, allow_nan=False)
# A check has exactly one kind, as the API's validation makes sure.
kinds = st.sampled_from(
    [{"http": "/health"}, {"tcp": True}, {"ttl": 0.5}, {"ttl": 10.0}, {"ttl": 30.0}]
)
checks = st.none() | st.builds(
    lambda kind, interval, after: Check(
        **kind, interval=2.0 if "ttl" in kind else interval, deregister_after=after
    ),
    kinds,
    st.sampled_from([1.0, 2.0, 0.25]),
    st.none() | st.just(60.0),
)
specs = st.builds(
    InstanceSpec,
    address=st.sampled_from(["127.0.0.1", "::1", "db.example.com"]) | text,
    port=st.integers(1, 65535),
    zone=st.none() | labels,
    region=st.none() | labels,
    weight=st.integers(1, 1000),
    tags=st.lists(labels, max_size=4).map(tuple),
    meta=st.dictionaries(text, text, max_size=3).map(lambda d: tuple(sorted(d.items()))),
    check=checks,
)
instances = st.builds(
    Instance,
    service=labels,
    id=labels,
    spec=specs,
    check_status=st.sampled_from(["passing", "warning", "critical"]),
    operator=st.none() | st.sampled_from(["draining", "maintenance"]),
    output=text,
    ejected_until=times,
    critical_since=times,
    create_revision=st.integers(0, 2**40),
    mod_revision=st.integers(0, 2**40),
)


@given(instances)
def test_json_bytes_is_what_json_dumps_writes(inst: Instance) -> None:
    assert inst.json_bytes() == json.dumps(inst.to_json(), separators=(",", ":")).encode()


@given(instances)
def test_a_record_reads_back_as_the_same_instance(inst: Instance) -> None:
    assert Instance.from_record(inst.to_record()) == inst


def test_a_ttl_registration_reads_back_equal_so_repeating_it_after_a_restart_is_no_change() -> None:
    from interknit.registry.schema import RegisterBody

    body = {"address": "10.0.0.1", "port": 80, "check": {"ttl": "10s", "interval": "1s"}}
    spec = RegisterBody.model_validate(body).to_spec()
    stored = Instance(service="api", id="a", spec=spec).to_record()
    assert Instance.from_record(stored).spec == spec
