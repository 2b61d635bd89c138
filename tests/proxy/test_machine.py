"""The exchange's state machine alone: the table, and when each wait ends (no IO, no sleep)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from interknit.proxy import machine as m
from interknit.proxy.machine import ExchangeMachine, InvalidTransition, Timeouts

STATES = range(len(m.STATE_NAMES))
EVENTS = range(len(m.EVENT_NAMES))
LIVE = [s for s in STATES if s not in (m.DONE, m.MUST_CLOSE)]


def test_the_table_lists_every_pair_and_the_ends_are_final() -> None:
    assert len(m.TRANSITIONS) == len(m.STATE_NAMES) == len(m.WAITS)
    for row in m.TRANSITIONS:
        assert len(row) == len(m.EVENT_NAMES)
    assert all(target == -1 for target in m.TRANSITIONS[m.DONE])
    assert all(target == -1 for target in m.TRANSITIONS[m.MUST_CLOSE])


def test_every_live_state_can_end_and_close() -> None:
    """The proxy can answer from anywhere, and a client can leave from anywhere."""
    for state in LIVE:
        assert m.TRANSITIONS[state][m.CLOSE] == m.MUST_CLOSE
        if state != m.TUNNEL:  # a tunnel ends only by closing its connection
            assert m.TRANSITIONS[state][m.FINISH] == m.DONE


def test_an_answer_once_begun_is_never_sent_again() -> None:
    """From STREAMING or TUNNEL no event leads back to where an attempt could begin."""
    began = {m.STREAMING, m.TUNNEL, m.DONE, m.MUST_CLOSE}
    for state in began:
        for event in EVENTS:
            target = m.TRANSITIONS[state][event]
            assert target == -1 or target in began


def test_the_usual_request_takes_two_steps() -> None:
    machine = ExchangeMachine(0.0)
    assert machine.state == m.HEAD
    assert machine.to(m.SEND, 1.0) == m.SENDING and machine.since == 1.0
    assert machine.to(m.FINISH, 2.0) == m.DONE and not machine.live


@given(st.lists(st.tuples(st.sampled_from(EVENTS), st.floats(0, 1e6)), max_size=30))
def test_any_event_order_follows_the_table_or_is_refused(steps: list[tuple[int, float]]) -> None:
    machine = ExchangeMachine(0.0)
    for event, now in steps:
        before, since = machine.state, machine.since
        target = m.TRANSITIONS[before][event]
        if target < 0:
            with pytest.raises(InvalidTransition):
                machine.to(event, now)
            assert (machine.state, machine.since) == (before, since)
        else:
            assert machine.to(event, now) == target
            assert machine.since == now
        assert machine.live == (machine.state not in (m.DONE, m.MUST_CLOSE))
        assert machine.answering == (machine.state in (m.STREAMING, m.TUNNEL))


TIMEOUTS = Timeouts(header=10.0, connect=2.0, response=30.0, idle=60.0)


def at(state: int, **fields: float | bool) -> ExchangeMachine:
    machine = ExchangeMachine(100.0)
    machine.state = state
    for name, value in fields.items():
        setattr(machine, name, value)
    return machine


def test_each_state_waits_for_its_own_limit() -> None:
    assert at(m.HEAD).wake(TIMEOUTS, 0.0) == (110.0, "header-timeout")
    assert at(m.CONNECTING, attempt_began=105.0).wake(TIMEOUTS, 0.0) == (
        107.0,
        "connect-timeout",
    )
    # The request still flowing: idle since the last byte either way.
    sending = at(m.SENDING, client_activity=103.0)
    assert sending.wake(TIMEOUTS, 104.0) == (164.0, "idle-timeout")
    # The request sent: the response must begin within response_timeout of its last byte.
    sent = at(m.SENDING, client_activity=103.0, request_done=True)
    assert sent.wake(TIMEOUTS, 200.0) == (133.0, "response-timeout")
    no_response_timeout = Timeouts(header=10.0, connect=2.0, response=None, idle=60.0)
    assert sent.wake(no_response_timeout, 200.0) == (260.0, "idle-timeout")
    assert at(m.STREAMING, client_activity=101.0).wake(TIMEOUTS, 150.0) == (210.0, "idle-timeout")
    assert at(m.RETRY_WAIT, backoff_until=100.5).wake(TIMEOUTS, 0.0) == (100.5, "backoff")
    for state in (m.ADMITTING, m.TUNNEL, m.DONE, m.MUST_CLOSE):
        assert at(state).wake(TIMEOUTS, 0.0)[0] == m.NEVER


def test_the_deadline_bounds_the_attempts_but_not_admission_nor_the_tunnel() -> None:
    for state in (m.CONNECTING, m.SENDING, m.RETRY_WAIT, m.STREAMING):
        machine = at(state, deadline=100.25, attempt_began=100.0, backoff_until=101.0)
        assert machine.wake(TIMEOUTS, 100.0) == (100.25, "timeout")
    # Demand control holds the deadline of a queued request itself (and answers it).
    for state in (m.ADMITTING, m.TUNNEL, m.HEAD):
        assert at(state, deadline=100.25).wake(TIMEOUTS, 0.0)[1] != "timeout"


@given(
    st.sampled_from(LIVE),
    st.floats(100.0, 1000.0),
    st.floats(100.0, 1000.0),
    st.floats(0.0, 1000.0),
    st.booleans(),
    st.floats(0.0, 2000.0),
)
def test_expired_exactly_when_the_wait_ends(
    state: int,
    activity: float,
    deadline: float,
    upstream: float,
    request_done: bool,
    now: float,
) -> None:
    machine = at(
        state,
        client_activity=activity,
        attempt_began=activity,
        backoff_until=activity,
        deadline=deadline,
        request_done=request_done,
    )
    when, reason = machine.wake(TIMEOUTS, upstream)
    assert machine.expired(now, TIMEOUTS, upstream) == (reason if now >= when else None)
    if when < m.NEVER:
        assert machine.expired(when, TIMEOUTS, upstream) == reason
