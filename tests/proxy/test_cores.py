"""The proxy's sans-IO parts: specs, routing, retry rules and budget, wire helpers, flow."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from interknit.http1.status import STATUS_LINES
from interknit.proxy.flow import PEER_FULL, PIPELINE, FlowControl
from interknit.proxy.request import cookie_value
from interknit.proxy.retry import RetryBudget, safe_to_retry
from interknit.proxy.routing import Router, host_without_port, split_target
from interknit.proxy.spec import ListenerSpec, MatchSpec, RouteSpec
from interknit.proxy.wire import chunk, connection_tokens, error_response


def test_spec_validation_names_the_field() -> None:
    with pytest.raises(ValueError, match=r"routes\[0\]\.balance"):
        ListenerSpec(name="l", routes=(RouteSpec(servers=("a:1",), balance="nope"),)).validate()
    with pytest.raises(ValueError, match="either 'service' or 'servers'"):
        RouteSpec().validate()
    with pytest.raises(ValueError, match="either"):
        RouteSpec(service="s", servers=("a:1",)).validate()
    with pytest.raises(ValueError, match="servers"):
        RouteSpec(servers=("nohost",)).validate()
    with pytest.raises(ValueError, match="path_regex"):
        RouteSpec(service="s", match=MatchSpec(path_regex="(")).validate()
    with pytest.raises(ValueError, match="path_prefix"):
        MatchSpec(path_prefix="api").validate()
    with pytest.raises(ValueError, match="needs a route"):
        ListenerSpec(name="t", protocol="tcp", routes=()).validate()
    with pytest.raises(ValueError, match="matches only by sni"):
        ListenerSpec(
            name="t",
            protocol="tcp",
            routes=(RouteSpec(service="s", match=MatchSpec(path_exact="/")),),
        ).validate()
    ListenerSpec(name="ok", routes=(RouteSpec(service="s"),)).validate()


def test_route_label() -> None:
    assert RouteSpec(name="n", service="s").label == "n"
    assert RouteSpec(service="s").label == "s"
    assert RouteSpec(servers=("a:1", "b:2")).label == "a:1,b:2"


def _router(*matches: MatchSpec | None) -> Router:
    return Router([RouteSpec(match=m, service=f"s{i}") for i, m in enumerate(matches)])


def test_router_first_match_wins() -> None:
    router = _router(
        MatchSpec(path_prefix="/api", method="POST"),
        MatchSpec(path_prefix="/api"),
        None,
    )
    hit = router.match(b"POST", b"h", b"/api/x", {})
    assert hit is not None and hit.index == 0
    hit = router.match(b"GET", b"h", b"/api/x", {})
    assert hit is not None and hit.index == 1
    hit = router.match(b"GET", b"h", b"/other", {})
    assert hit is not None and hit.index == 2
    assert _router(MatchSpec(path_exact="/a")).match(b"GET", b"h", b"/b", {}) is None


def test_router_host_and_headers() -> None:
    router = _router(
        MatchSpec(host="API.example.com"),
        MatchSpec(host="*.example.com"),
        MatchSpec(headers=(("X-Tier", "gold"), ("X-Canary", None))),
    )
    assert router.match(b"GET", b"api.example.com", b"/", {}).index == 0  # type: ignore[union-attr]
    assert router.match(b"GET", b"w.example.com", b"/", {}).index == 1  # type: ignore[union-attr]
    assert router.match(b"GET", b"example.com", b"/", {}) is None
    both = {b"x-tier": b"gold", b"x-canary": b""}
    assert router.match(b"GET", b"h", b"/", both).index == 2  # type: ignore[union-attr]
    assert router.match(b"GET", b"h", b"/", {b"x-tier": b"gold"}) is None
    assert router.match(b"GET", b"h", b"/", {**both, b"x-tier": b"silver"}) is None


def test_regex_matches_from_the_start() -> None:
    router = _router(MatchSpec(path_regex=r"/v\d+/"))
    assert router.match(b"GET", b"h", b"/v2/x", {}) is not None
    assert router.match(b"GET", b"h", b"/x/v2/", {}) is None


@pytest.mark.parametrize(
    ("target", "path", "authority"),
    [
        (b"/a/b?c=d", b"/a/b", None),
        (b"/", b"/", None),
        (b"http://h:8/x?y", b"/x", b"h:8"),
        (b"http://h", b"/", b"h"),
        (b"*", b"*", None),
    ],
)
def test_split_target(target: bytes, path: bytes, authority: bytes | None) -> None:
    assert split_target(target) == (path, authority)


def test_host_without_port() -> None:
    assert host_without_port(b"Example.COM:8080") == b"example.com"
    assert host_without_port(b"[::1]:80") == b"[::1]"
    assert host_without_port(b"h") == b"h"


def test_safe_to_retry_rules() -> None:
    assert safe_to_retry(b"POST", sent_request=False, status=None)  # connect failure
    assert safe_to_retry(b"POST", sent_request=True, status=None)  # reset, nothing answered
    assert safe_to_retry(b"GET", sent_request=True, status=503)
    assert not safe_to_retry(b"POST", sent_request=True, status=503)
    assert not safe_to_retry(b"GET", sent_request=True, status=500)
    assert not safe_to_retry(b"PATCH", sent_request=True, status=502)


def test_retry_budget_has_a_floor_and_a_ratio() -> None:
    budget = RetryBudget(ratio=0.2, minimum=3)
    for _ in range(5):
        budget.request_started()
    assert [budget.try_acquire() for _ in range(4)] == [True, True, True, False]
    for _ in range(45):
        budget.request_started()
    # 50 in flight: 20% is 10 retries.
    assert sum(budget.try_acquire() for _ in range(20)) == 7
    budget.release()
    assert budget.try_acquire()
    assert not RetryBudget(ratio=0.0, minimum=0).try_acquire()


@given(st.lists(st.sampled_from(["start", "finish", "acquire", "release"]), max_size=200))
def test_retry_budget_never_exceeds_its_limit(ops: list[str]) -> None:
    budget = RetryBudget(ratio=0.2, minimum=3)
    for op in ops:
        if op == "start":
            budget.request_started()
        elif op == "finish" and budget.requests > 0:
            budget.request_finished()
        elif op == "acquire":
            before = budget.retries
            if budget.try_acquire():
                assert before < max(3, 0.2 * budget.requests)
        elif op == "release" and budget.retries > 0:
            budget.release()
        assert budget.retries >= 0


def test_wire_helpers() -> None:
    assert STATUS_LINES[200] == b"HTTP/1.1 200 OK\r\n"
    assert STATUS_LINES[404] == b"HTTP/1.1 404 Not Found\r\n"
    resp = error_response(503, "no-endpoint", retry_after=1)
    assert resp.startswith(b"HTTP/1.1 503 Service Unavailable\r\n")
    assert b"x-interknit-reason: no-endpoint\r\n" in resp and b"retry-after: 1\r\n" in resp
    head, _, body = resp.partition(b"\r\n\r\n")
    assert b"content-length: %d\r\n" % len(body) in head + b"\r\n"
    assert error_response(503, "no-endpoint", retry_after=1) is resp  # cached
    assert b"connection: close" in error_response(400, "bad-request", close=True)
    assert chunk(b"hello") == b"5\r\nhello\r\n"
    assert connection_tokens(b"Keep-Alive, X-A ,,x-b") == {b"keep-alive", b"x-a", b"x-b"}


def test_cookie_value() -> None:
    assert cookie_value(b"a=1; ik=srv-2; b=3", b"ik") == b"srv-2"
    assert cookie_value(b"a=1", b"ik") is None
    assert cookie_value(None, b"ik") is None


class RecordingTransport:
    """Stands in for a socket; FlowControl (under test) only calls these two methods."""

    def __init__(self) -> None:
        self.calls: list[str] = []

    def pause_reading(self) -> None:
        self.calls.append("pause")

    def resume_reading(self) -> None:
        self.calls.append("resume")

    def is_closing(self) -> bool:
        return False


def test_flow_control_resumes_only_when_every_reason_is_gone() -> None:
    transport = RecordingTransport()
    flow = FlowControl(transport)  # type: ignore[arg-type]
    flow.pause_reading(PIPELINE)
    flow.pause_reading(PEER_FULL)
    flow.resume_reading(PIPELINE)
    assert flow.read_paused and transport.calls == ["pause"]
    flow.resume_reading(PIPELINE)  # not paused for this reason any more: no effect
    flow.resume_reading(PEER_FULL)
    assert not flow.read_paused and transport.calls == ["pause", "resume"]
