"""The HTTP exchange's state machine: what happened in, the exchange's state and its timer out.

Rules of this file:

* Everything that decides which state an exchange is in, and when it must be woken, lives
  here. The shell (``exchange.py``) does the IO a state calls for and reports what came of it
  as an event; this file does not know about sockets, parsers, pools or demand control.
* There is no clock: ``now`` is passed in with every event and every question about time.
* Transitions are data (``TRANSITIONS``); a pair the table does not list is a bug in the shell
  and raises ``InvalidTransition``. What bounds the wait in each state is data too (``WAITS``).

Theory of operation. An exchange is one request and its response, across however many
attempts it takes. It begins in ``HEAD`` when the parser begins a request head. Once the head
is whole and routed, demand control may queue it (``ADMITTING``); each attempt then either
takes a kept-alive connection and sends at once (``SENDING``) or makes a connection first
(``CONNECTING``). The first byte of an answer passed on to the client makes it ``STREAMING``
(or ``TUNNEL`` after a 101); an attempt that fails before that may be tried again, after a
backoff, in ``RETRY_WAIT``. It ends in ``DONE`` (the connection may carry the next request)
or ``MUST_CLOSE`` (the connection closes after the last byte: the client asked, the request
was cut short, the answer was broken off, or the client left). Any live state may end at
once: the proxy may answer itself from any of them (404, 429, 503, 504), and a client that
leaves ends the exchange wherever it stands.

Waiting is what every state but the last two does, and each wait is bounded (``WAITS``), as
is the whole exchange by its route's ``timeout`` (the deadline): the head by the listener's
``header_timeout`` from its first byte; a connect by the route's ``connect_timeout``; an
attempt whose request is sent by ``response_timeout`` from the request's last byte, and while
the request body or the response body flows by ``idle_timeout`` since the last byte either
way; a retry by its backoff. Admission waits are bounded by demand control's own queue
timeout, and a tunnel by nothing (either side closes it).
"""

from __future__ import annotations

from typing import Final

# States
HEAD: Final = 0
ADMITTING: Final = 1
CONNECTING: Final = 2
SENDING: Final = 3
RETRY_WAIT: Final = 4
STREAMING: Final = 5
TUNNEL: Final = 6
DONE: Final = 7
MUST_CLOSE: Final = 8
STATE_NAMES: Final = (
    "head",
    "admitting",
    "connecting",
    "sending",
    "retry_wait",
    "streaming",
    "tunnel",
    "done",
    "must_close",
)

# Events
QUEUE: Final = 0  # demand control queued the request
CONNECT: Final = 1  # an attempt needs a new connection
SEND: Final = 2  # an attempt has a connection: the request goes upstream
RESPOND: Final = 3  # the upstream's answer is passed on to the client
UPGRADE: Final = 4  # the upstream's 101 is passed on: bytes are relayed from now on
RETRY: Final = 5  # the attempt failed before any answer was passed on; another will follow
FINISH: Final = 6  # answered; the connection may carry the next request
CLOSE: Final = 7  # answered or abandoned; the connection must close
EVENT_NAMES: Final = (
    "queue",
    "connect",
    "send",
    "respond",
    "upgrade",
    "retry",
    "finish",
    "close",
)

_ = -1  # no such transition
# TRANSITIONS[state][event] -> the next state. Every pair is listed, so the table is the spec.
TRANSITIONS: Final[tuple[tuple[int, ...], ...]] = (
    # queue      connect     send     respond    upgrade  retry        finish  close
    (ADMITTING, CONNECTING, SENDING, _, _, _, DONE, MUST_CLOSE),  # head
    (_, CONNECTING, SENDING, _, _, _, DONE, MUST_CLOSE),  # admitting
    (_, _, SENDING, _, _, RETRY_WAIT, DONE, MUST_CLOSE),  # connecting
    (_, _, _, STREAMING, _, RETRY_WAIT, DONE, MUST_CLOSE),  # sending
    (_, CONNECTING, SENDING, _, _, _, DONE, MUST_CLOSE),  # retry_wait
    (_, _, _, _, TUNNEL, _, DONE, MUST_CLOSE),  # streaming
    (_, _, _, _, _, _, _, MUST_CLOSE),  # tunnel
    (_, _, _, _, _, _, _, _),  # done
    (_, _, _, _, _, _, _, _),  # must_close
)

# What bounds the wait in each state (besides the deadline, which bounds every live state but
# the tunnel).
W_NONE: Final = 0
W_HEAD: Final = 1  # header_timeout since the head began
W_CONNECT: Final = 2  # connect_timeout since the attempt began
W_ANSWER: Final = 3  # response_timeout once the request is sent, idle_timeout while it flows
W_BACKOFF: Final = 4  # the retry's backoff
W_IDLE: Final = 5  # idle_timeout since the last byte either way
WAITS: Final[tuple[int, ...]] = (
    W_HEAD,  # head
    W_NONE,  # admitting: demand control's queue timeout
    W_CONNECT,  # connecting
    W_ANSWER,  # sending
    W_BACKOFF,  # retry_wait
    W_IDLE,  # streaming
    W_NONE,  # tunnel
    W_NONE,  # done
    W_NONE,  # must_close
)
# What each kind of wait ends with (an answer's wait ends "response-timeout" once the
# request is sent and the route has a response_timeout).
_REASONS: Final = (
    "",
    "header-timeout",
    "connect-timeout",
    "idle-timeout",
    "backoff",
    "idle-timeout",
)
# The deadline bounds these states. Not the head (no route yet), nor admission (demand control
# holds the deadline itself and answers it), the tunnel or the ends.
_BOUNDED: Final = frozenset({CONNECTING, SENDING, RETRY_WAIT, STREAMING})

NEVER: Final = float("inf")


class InvalidTransition(RuntimeError):
    def __init__(self, state: int, event: int) -> None:
        super().__init__(f"no transition from {STATE_NAMES[state]} on {EVENT_NAMES[event]}")
        self.state = state
        self.event = event


class Timeouts:
    """The limits an exchange's waits are held to (from its listener and route)."""

    __slots__ = ("connect", "header", "idle", "response")

    def __init__(
        self,
        header: float = 10.0,
        connect: float = 2.0,
        response: float | None = 30.0,
        idle: float = 60.0,
    ) -> None:
        self.header = header
        self.connect = connect
        self.response = response
        self.idle = idle


class ExchangeMachine:
    """One exchange's state and the times its waits are measured from.

    The shell subclasses it: the state lives on the exchange itself, so that reading it on the
    hot path costs one attribute, and tests drive the machine alone.
    """

    __slots__ = (
        "attempt_began",
        "backoff_until",
        "client_activity",
        "deadline",
        "request_done",
        "since",
        "started_at",
        "state",
    )

    def __init__(self, now: float) -> None:
        self.state = HEAD
        self.started_at = now  # the head's first byte
        self.since = now  # the last transition
        self.deadline = NEVER  # the route's timeout, once routed
        self.attempt_began = now
        self.client_activity = now  # the last byte from the client
        self.backoff_until = now
        self.request_done = False

    def to(self, event: int, now: float) -> int:
        """Take ``event``; return the new state."""
        state = TRANSITIONS[self.state][event]
        if state < 0:
            raise InvalidTransition(self.state, event)
        self.state = state
        self.since = now
        return state

    @property
    def live(self) -> bool:
        """Neither done nor closing: the exchange still waits for something."""
        return self.state < DONE

    @property
    def answering(self) -> bool:
        """An answer has begun to reach the client (the proxy can no longer answer itself)."""
        return self.state == STREAMING or self.state == TUNNEL

    def wake_at(self, timeouts: Timeouts, upstream_activity: float) -> float:
        """When the current wait ends (``NEVER`` for none).

        ``upstream_activity``: the time of the last byte from the upstream connection.
        """
        kind = WAITS[self.state]
        if kind == W_ANSWER and self.request_done and timeouts.response is not None:
            when = self.client_activity + timeouts.response
        elif kind in (W_ANSWER, W_IDLE):
            last = self.client_activity
            when = (last if last > upstream_activity else upstream_activity) + timeouts.idle
        elif kind == W_HEAD:
            when = self.started_at + timeouts.header
        elif kind == W_CONNECT:
            when = self.attempt_began + timeouts.connect
        elif kind == W_BACKOFF:
            when = self.backoff_until
        else:
            when = NEVER
        deadline = self.deadline
        if deadline < when and self.state in _BOUNDED:
            return deadline
        return when

    def wake(self, timeouts: Timeouts, upstream_activity: float) -> tuple[float, str]:
        """``wake_at``, and the reason the wait ends with then."""
        when = self.wake_at(timeouts, upstream_activity)
        kind = WAITS[self.state]
        if when == NEVER:
            return when, ""
        if when == self.deadline and self.state in _BOUNDED:
            return when, "timeout"
        if kind == W_ANSWER and self.request_done and timeouts.response is not None:
            return when, "response-timeout"
        return when, _REASONS[kind]

    def expired(self, now: float, timeouts: Timeouts, upstream_activity: float) -> str | None:
        """The reason the current wait is over at ``now``, or None while it goes on."""
        when, reason = self.wake(timeouts, upstream_activity)
        return reason if now >= when else None
