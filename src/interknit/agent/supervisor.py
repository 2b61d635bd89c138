"""The supervised process's state machine: what ``interknit run`` does, and when.

Rules of this file:

* Everything that decides what the supervisor does next lives here: when to register, renew,
  drain, signal and exit. The shell (``run.py``) moves bytes, spawns and reaps the child and
  reports back; it decides nothing.
* This file has no clock and no IO. Every input takes ``now`` (monotonic seconds); every input
  returns the actions the shell must carry out, in order.
* Transitions are data (``TRANSITIONS``); only counting check results, timers and the retry
  backoff of registry writes are code.

Theory of operation. The child moves through six phases:

* ``starting``: the child runs but has not proved ready. Nothing is registered. It proves
  ready by its first passing check (a TCP connect or an HTTP 2xx), or by ``READY=1`` on the
  notify socket when the supervisor waits for that instead. A child that was ready before and
  was taken out needs ``rise`` passing checks in a row.
* ``ready``: registered with a lease that is renewed every TTL/3 (TTL/6 after a failed
  renewal); checks keep running, and ``fall`` failures in a row take it out again
  (deregistered, back to ``starting``), as a readiness probe does. A registration the registry
  lost (404 on renewal) is made again.
* ``draining``: SIGTERM or SIGINT arrived while registered. The instance is marked
  ``draining`` first (proxies send it no new work, DNS leaves it out); once the registry has
  answered, ``drain`` seconds pass before the child is signalled. A second stop signal cuts the
  wait short.
* ``stopping``: the child's process group got SIGTERM; after ``stop_timeout`` it gets SIGKILL.
* ``restarting``: the child failed on its own and the restart policy asks for another; it is
  spawned again after a backoff that doubles (and resets once a child proves ready).
* ``exited``: the child is gone and nothing more will run. The registration is removed and the
  supervisor exits with the child's status (128+N for a signal N).

A registry that cannot be reached never stops the child: writes are retried with a backoff
(``register``, and a ``deregister`` the registry did not confirm, which is also sent again
before a stop's SIGTERM) or at their next turn (``renew``), and said in the log by the shell.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final, Literal, NamedTuple

Phase = Literal["starting", "ready", "draining", "stopping", "restarting", "exited"]
PHASES: Final[tuple[Phase, ...]] = (
    "starting",
    "ready",
    "draining",
    "stopping",
    "restarting",
    "exited",
)

# What happened. ``ready``/``unready``: the child proved ready, or failed ``fall`` checks in a
# row. ``stop``: SIGTERM or SIGINT. ``exit``/``crash``: the child ended, for good or to be
# restarted (the restart policy decides which). ``drained``: the drain time after the registry
# showed ``draining`` has passed. ``kill_due``: the stop timeout passed. ``respawn``: the
# restart backoff passed.
Event = Literal["ready", "unready", "stop", "exit", "crash", "drained", "kill_due", "respawn"]
EVENTS: Final[tuple[Event, ...]] = (
    "ready",
    "unready",
    "stop",
    "exit",
    "crash",
    "drained",
    "kill_due",
    "respawn",
)

# What the shell must do. ``register``/``renew``/``set_draining``/``deregister``: registry
# writes, carried out in order and answered with ``on_write``. ``check``: run one check and
# answer with ``on_check``. ``term``/``kill``: signal the child's process group. ``spawn``:
# start the child (answered with ``on_spawned``). ``exit``: leave with ``code`` once the writes
# before it are done.
ActionKind = Literal[
    "spawn", "check", "register", "renew", "set_draining", "deregister", "term", "kill", "exit"
]
WriteKind = Literal["register", "renew", "set_draining", "deregister"]
# ``gone``: the registry answered that it does not hold the instance (404).
WriteResult = Literal["ok", "gone", "failed"]


class Action(NamedTuple):
    kind: ActionKind
    code: int = 0  # the exit status, for ``exit``


# (phase, event) -> (actions, next phase). Every pair is listed, so the table is the spec.
# Registry writes listed here are dropped by the code when nothing is registered.
_: Final[tuple[ActionKind, ...]] = ()  # no action
TRANSITIONS: Final[dict[tuple[Phase, Event], tuple[tuple[ActionKind, ...], Phase]]] = {
    ("starting", "ready"): (("register",), "ready"),
    ("starting", "unready"): (_, "starting"),
    ("starting", "stop"): (("term",), "stopping"),
    ("starting", "exit"): (("exit",), "exited"),
    ("starting", "crash"): (_, "restarting"),
    ("starting", "drained"): (_, "starting"),
    ("starting", "kill_due"): (_, "starting"),
    ("starting", "respawn"): (_, "starting"),
    ("ready", "ready"): (_, "ready"),
    ("ready", "unready"): (("deregister",), "starting"),
    ("ready", "stop"): (("set_draining",), "draining"),
    ("ready", "exit"): (("deregister", "exit"), "exited"),
    ("ready", "crash"): (("deregister",), "restarting"),
    ("ready", "drained"): (_, "ready"),
    ("ready", "kill_due"): (_, "ready"),
    ("ready", "respawn"): (_, "ready"),
    ("draining", "ready"): (_, "draining"),
    ("draining", "unready"): (_, "draining"),
    ("draining", "stop"): (("term",), "stopping"),
    ("draining", "exit"): (("deregister", "exit"), "exited"),
    ("draining", "crash"): (("deregister", "exit"), "exited"),
    ("draining", "drained"): (("term",), "stopping"),
    ("draining", "kill_due"): (_, "draining"),
    ("draining", "respawn"): (_, "draining"),
    ("stopping", "ready"): (_, "stopping"),
    ("stopping", "unready"): (_, "stopping"),
    ("stopping", "stop"): (_, "stopping"),
    ("stopping", "exit"): (("deregister", "exit"), "exited"),
    ("stopping", "crash"): (("deregister", "exit"), "exited"),
    ("stopping", "drained"): (_, "stopping"),
    ("stopping", "kill_due"): (("kill",), "stopping"),
    ("stopping", "respawn"): (_, "stopping"),
    ("restarting", "ready"): (_, "restarting"),
    ("restarting", "unready"): (_, "restarting"),
    ("restarting", "stop"): (("exit",), "exited"),
    ("restarting", "exit"): (_, "restarting"),
    ("restarting", "crash"): (_, "restarting"),
    ("restarting", "drained"): (_, "restarting"),
    ("restarting", "kill_due"): (_, "restarting"),
    ("restarting", "respawn"): (("spawn",), "starting"),
    ("exited", "ready"): (_, "exited"),
    ("exited", "unready"): (_, "exited"),
    ("exited", "stop"): (_, "exited"),
    ("exited", "exit"): (_, "exited"),
    ("exited", "crash"): (_, "exited"),
    ("exited", "drained"): (_, "exited"),
    ("exited", "kill_due"): (_, "exited"),
    ("exited", "respawn"): (_, "exited"),
}

# Phases in which checks run (the child is there and may take traffic).
_CHECKED: Final[frozenset[Phase]] = frozenset({"starting", "ready"})
# Phases in which the child process is alive.
_ALIVE: Final[frozenset[Phase]] = frozenset({"starting", "ready", "draining", "stopping"})
_WRITES: Final[frozenset[ActionKind]] = frozenset(
    {"register", "renew", "set_draining", "deregister"}
)

# How often a child that has not yet proved ready is probed: every 20 ms for its first two
# seconds, so that it is registered soon after its port opens, then less and less often up to
# the check interval (a slow starter is not asked 50 times a second for minutes).
FIRST_PROBE_EVERY = 0.02
FAST_PROBING = 2.0
MAX_RETRY = 10.0


@dataclass(frozen=True, slots=True)
class Settings:
    ttl: float = 10.0
    interval: float = 1.0  # between checks once ready
    rise: int = 2
    fall: int = 3
    drain: float = 5.0
    stop_timeout: float = 10.0
    notify: bool = False  # wait for READY=1 instead of the first passing check
    restart: bool = False  # restart a child that failed on its own
    restart_backoff: float = 1.0
    max_restart_backoff: float = 30.0

    def __post_init__(self) -> None:
        if self.ttl <= 0 or self.interval <= 0:
            raise ValueError("ttl and interval must be positive")
        if self.rise < 1 or self.fall < 1:
            raise ValueError("rise and fall must be at least 1")
        if self.drain < 0 or self.stop_timeout < 0:
            raise ValueError("drain and stop_timeout must not be negative")


def exit_code(status: int) -> int:
    """A child's exit as a shell reports it: its code, or 128+N when signal N ended it
    (``status`` as ``os.waitstatus_to_exitcode`` gives it: negative for a signal)."""
    return 128 - status if status < 0 else status


class Supervisor:
    """One supervised child, from spawn to exit."""

    def __init__(self, settings: Settings, now: float) -> None:
        self.settings = settings
        self.phase: Phase = "starting"
        # Global: what the registry may hold. ``claimed`` from the first register until the
        # deregister (writes to remove are only sent while it is set); ``registered`` while the
        # last register or renewal succeeded.
        self.claimed = False
        self.registered = False
        # A removal the registry did not confirm: it may still show the instance, so the
        # deregister is retried (``deregister_at``), and sent again before a stop's SIGTERM.
        self.lingering = False
        self.deregister_at: float | None = None
        self.deregister_failures = 0
        # Per child.
        self.ever_ready = False
        self.notified = False  # READY=1 seen
        self.streak = 0  # consecutive check results against the current readiness
        self.checking = False
        self.status: int | None = None  # the last child's exit code
        self.restarts = 0
        # Timers (None: not armed).
        self.check_at: float | None = None
        self.probe_every = FIRST_PROBE_EVERY
        self.spawned_at = now
        self.renew_at: float | None = None
        self.register_at: float | None = None
        self.register_failures = 0
        self.writing_register = False
        self.drain_at: float | None = None
        self.kill_at: float | None = None
        self.respawn_at: float | None = None
        self.since = now

    # ------------------------------------------------------------------ inputs

    def start(self, now: float) -> list[Action]:
        """The first child is to be spawned."""
        return [Action("spawn")]

    def on_spawned(self, now: float) -> list[Action]:
        """A child runs; checks start (unless it must say READY=1 first)."""
        self.ever_ready = False
        self.notified = False
        self.streak = 0
        self.checking = False
        self.probe_every = FIRST_PROBE_EVERY
        self.spawned_at = now
        self.check_at = None if self.settings.notify else now
        return self.tick(now)

    def on_notify(self, ready: bool, now: float) -> list[Action]:
        """The child wrote to the notify socket (``READY=1`` when ``ready``)."""
        if not ready or self.notified or self.phase not in _ALIVE:
            return []
        self.notified = True
        if self.check_at is None and self.phase in _CHECKED:
            self.check_at = now + self.settings.interval
        if self.settings.notify and self.phase == "starting" and not self.ever_ready:
            return self._fire("ready", now)
        return []

    def on_check(self, passed: bool, now: float) -> list[Action]:
        """The result of the check the shell ran."""
        self.checking = False
        if self.phase not in _CHECKED:
            return []
        if self.phase == "starting" and not self.ever_ready:
            if now - self.spawned_at >= FAST_PROBING:
                self.probe_every = min(self.probe_every * 1.5, self.settings.interval)
            self.check_at = now + self.probe_every
            if passed and not self.settings.notify:
                return self._fire("ready", now)
            return []
        self.check_at = now + self.settings.interval
        is_ready = self.phase == "ready"
        if passed == is_ready:
            self.streak = 0
            return []
        self.streak += 1
        needed = self.settings.fall if is_ready else self.settings.rise
        if self.streak < needed:
            return []
        self.streak = 0
        return self._fire("unready" if is_ready else "ready", now)

    def on_stop(self, now: float) -> list[Action]:
        """SIGTERM or SIGINT."""
        if self.lingering and not self.claimed and self.phase in _ALIVE:
            # An earlier removal was not confirmed: remove it before the child is signalled.
            self.deregister_at = None
            return [Action("deregister"), *self._fire("stop", now)]
        return self._fire("stop", now)

    def on_child_exit(self, status: int, now: float) -> list[Action]:
        """The child ended; ``status`` as ``os.waitstatus_to_exitcode`` gives it."""
        self.status = exit_code(status)
        restart = self.settings.restart and self.phase in ("starting", "ready") and self.status != 0
        out = self._fire("crash" if restart else "exit", now)
        if self.phase == "exited" and self.lingering and not self.claimed:
            # Leaving: one more try at a removal the registry did not confirm.
            self.lingering = False
            self.deregister_at = None
            out.insert(len(out) - 1, Action("deregister"))
        return out

    def on_write(self, kind: WriteKind, result: WriteResult, now: float) -> list[Action]:
        """The registry answered a write (``failed``: no node answered, or it refused)."""
        if kind == "register":
            self.writing_register = False
            if not self.claimed:
                return []  # deregistered since; the answer no longer matters
            if result == "ok":
                self.registered = True
                self.register_failures = 0
                self.register_at = None
                self.renew_at = now + self.settings.ttl / 3
            else:
                self.registered = False
                self.register_failures += 1
                delay = min(0.25 * 2 ** (self.register_failures - 1), MAX_RETRY)
                self.register_at = now + min(delay, self.settings.ttl / 3)
        elif kind == "renew":
            if not self.claimed:
                return []
            if result == "ok":
                self.renew_at = now + self.settings.ttl / 3
            elif result == "gone":
                # The registry forgot it (the lease ran out while the node was away): say it
                # again while it may take work, leave it gone otherwise.
                self.registered = False
                self.renew_at = None
                if self.phase == "ready":
                    self.register_at = now
            else:
                self.renew_at = now + self.settings.ttl / 6
        elif kind == "deregister":
            if self.claimed:
                return self.tick(now)  # registered again since
            if result == "failed":
                self.lingering = True
                self.deregister_failures += 1
                delay = min(0.25 * 2 ** (self.deregister_failures - 1), MAX_RETRY)
                self.deregister_at = now + min(delay, self.settings.ttl / 3)
            else:
                self.lingering = False
                self.deregister_at = None
                self.deregister_failures = 0
        elif kind == "set_draining" and self.phase == "draining" and self.drain_at is None:
            # Whatever the answer, proxies that knew the instance get the drain time.
            self.drain_at = now + self.settings.drain
        return self.tick(now)

    def tick(self, now: float) -> list[Action]:
        """Timers whose time has come."""
        out: list[Action] = []
        if self.drain_at is not None and self.drain_at <= now:
            self.drain_at = None
            out += self._fire("drained", now)
        if self.kill_at is not None and self.kill_at <= now:
            self.kill_at = None
            out += self._fire("kill_due", now)
        if self.respawn_at is not None and self.respawn_at <= now:
            self.respawn_at = None
            out += self._fire("respawn", now)
        if self.phase == "exited":
            return out
        if (
            self.lingering
            and not self.claimed
            and self.deregister_at is not None
            and self.deregister_at <= now
        ):
            self.deregister_at = None
            out.append(Action("deregister"))
        if (
            self.phase == "ready"
            and self.claimed
            and not self.writing_register
            and self.register_at is not None
            and self.register_at <= now
        ):
            self.register_at = None
            self.writing_register = True
            out.append(Action("register"))
        if self.renew_at is not None and self.renew_at <= now and self.claimed:
            # Renewed again when the answer comes; a lost answer is retried at TTL/6.
            self.renew_at = now + self.settings.ttl / 6
            out.append(Action("renew"))
        if (
            self.phase in _CHECKED
            and not self.checking
            and self.check_at is not None
            and self.check_at <= now
        ):
            self.checking = True
            self.check_at = None
            out.append(Action("check"))
        return out

    def next_deadline(self) -> float | None:
        """When ``tick`` next has something to do."""
        times = [self.drain_at, self.kill_at, self.respawn_at]
        if self.phase != "exited":
            if self.phase == "ready" and self.claimed and not self.writing_register:
                times.append(self.register_at)
            if self.claimed:
                times.append(self.renew_at)
            elif self.lingering:
                times.append(self.deregister_at)
            if self.phase in _CHECKED and not self.checking:
                times.append(self.check_at)
        live = [t for t in times if t is not None]
        return min(live) if live else None

    @property
    def exit_status(self) -> int | None:
        """The status to exit with, once exited."""
        return self.status if self.phase == "exited" else None

    # ------------------------------------------------------------------ internals

    def _fire(self, event: Event, now: float) -> list[Action]:
        kinds, target = TRANSITIONS[self.phase, event]
        source = self.phase
        self.phase = target
        if target != source:
            self.since = now
            self._enter(source, target, now)
        out: list[Action] = []
        for kind in kinds:
            if kind == "register":
                self.lingering = False
                self.deregister_at = None
                self.claimed = True
                self.registered = False
                self.register_at = None
                self.register_failures = 0
                self.writing_register = True
                self.renew_at = None
            elif kind in ("set_draining", "deregister", "renew") and not self.claimed:
                continue
            elif kind == "deregister":
                self.claimed = False
                self.registered = False
                self.register_at = None
                self.renew_at = None
            out.append(Action(kind, (self.status or 0) if kind == "exit" else 0))
        if target == "draining" and not any(a.kind == "set_draining" for a in out):
            self.drain_at = now  # nothing to drain
        return out

    def _enter(self, source: Phase, target: Phase, now: float) -> None:
        settings = self.settings
        if target == "ready":
            self.ever_ready = True
            self.restarts = 0
            self.streak = 0
            self.check_at = now + settings.interval
        elif target == "starting":
            self.streak = 0
            if source == "ready":
                self.check_at = now + settings.interval
        elif target == "stopping":
            self.check_at = None
            self.drain_at = None
            self.kill_at = now + settings.stop_timeout
        elif target == "draining":
            self.check_at = None
        elif target == "restarting":
            self.check_at = None
            delay = settings.restart_backoff * 2**self.restarts
            self.restarts += 1
            self.respawn_at = now + min(delay, settings.max_restart_backoff)
        elif target == "exited":
            self.check_at = None
            self.drain_at = None
            self.kill_at = None
            self.respawn_at = None
            self.register_at = None
            self.renew_at = None


def is_write(kind: ActionKind) -> bool:
    return kind in _WRITES
