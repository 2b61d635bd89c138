"""The active-check state machine: check results in, an instance's check status out.

Rules of this file:

* Everything that decides an instance's check status from its check results lives here. The
  checker (``checker.py``) decides *when* a check runs and where its verdict goes; this file
  decides *what* the verdict is.
* This file has no clock and no IO. It does not know whether a result came from HTTP or TCP,
  or which instance it is about; ``now`` is passed in and only recorded.
* Transitions are data (``TRANSITIONS``); only counting consecutive results is code.

Theory of operation. Each check result is itself a status: ``passing`` (2xx, or a TCP
connect), ``warning`` (HTTP 429: alive but asking for less work) or ``critical`` (anything
else). The machine keeps one of four phases and, inside a phase, a streak of results that
point the same way.

* ``new``: critical, never seen passing. The first passing result makes it ``passing`` at
  once: an instance that has just started should not wait ``rise`` intervals for its first
  traffic.
* ``critical``: seen passing before, then failed. ``rise`` consecutive passing results make it
  ``passing``; a warning or a failure breaks the streak.
* ``passing`` and ``warning`` are both *up* (HAProxy's UP). ``fall`` consecutive critical
  results make it ``critical``. Any other result breaks the streak, and warning is reported at
  once as its own status while up: a 429 says the instance is alive but overloaded, so it is
  not a failure and does not count towards ``fall``; one passing result turns it back to
  ``passing``. While *down*, a warning is not a success either: a recovering instance must
  answer ``rise`` clean passes before it gets traffic again.

A node that restarts builds each machine from the status the store kept, so health survives
the restart: a restored ``passing`` instance needs ``fall`` failures to turn critical, a
restored ``critical`` one needs ``rise`` passes, unless it has never been checked.
"""

from __future__ import annotations

from typing import Final, Literal

from interknit.registry.model import CheckStatus

Phase = Literal["new", "critical", "passing", "warning"]

# What a result does to the streak. ``go``: move to the target phase now. ``stay``: remain,
# and break any streak. ``rise``/``fall``: extend the streak; move once it reaches the
# machine's ``rise``/``fall``.
Action = Literal["go", "stay", "rise", "fall"]

# (phase, result) -> (action, target phase). Every pair is listed, so the table is the spec.
TRANSITIONS: Final[dict[tuple[Phase, CheckStatus], tuple[Action, Phase]]] = {
    ("new", "passing"): ("go", "passing"),
    ("new", "warning"): ("stay", "new"),
    ("new", "critical"): ("stay", "new"),
    ("critical", "passing"): ("rise", "passing"),
    ("critical", "warning"): ("stay", "critical"),
    ("critical", "critical"): ("stay", "critical"),
    ("passing", "passing"): ("stay", "passing"),
    ("passing", "warning"): ("go", "warning"),
    ("passing", "critical"): ("fall", "critical"),
    ("warning", "passing"): ("go", "passing"),
    ("warning", "warning"): ("stay", "warning"),
    ("warning", "critical"): ("fall", "critical"),
}

# The status the registry shows for each phase.
STATUS: Final[dict[Phase, CheckStatus]] = {
    "new": "critical",
    "critical": "critical",
    "passing": "passing",
    "warning": "warning",
}


class CheckMachine:
    """One instance's check status, driven by its check results."""

    __slots__ = ("fall", "phase", "rise", "since", "streak")

    def __init__(
        self,
        rise: int = 2,
        fall: int = 3,
        status: CheckStatus = "critical",
        *,
        checked: bool = False,
        since: float = 0.0,
    ) -> None:
        """Start at ``status`` (from the store); ``checked`` says whether a critical instance
        has ever been checked (if not, its first passing result passes it at once)."""
        if rise < 1 or fall < 1:
            raise ValueError("rise and fall must be at least 1")
        self.rise = rise
        self.fall = fall
        self.phase: Phase = "new" if status == "critical" and not checked else status
        # Consecutive results towards the pending rise or fall; 0 when none is pending.
        self.streak = 0
        # When the phase last changed (or the machine was built).
        self.since = since

    @property
    def status(self) -> CheckStatus:
        return STATUS[self.phase]

    def on_result(self, result: CheckStatus, now: float) -> CheckStatus | None:
        """Feed one check result; return the new status if it changed, else ``None``."""
        action, target = TRANSITIONS[self.phase, result]
        if action == "stay":
            self.streak = 0
            return None
        if action != "go":
            self.streak += 1
            if self.streak < (self.rise if action == "rise" else self.fall):
                return None
        old = STATUS[self.phase]
        self.phase = target
        self.streak = 0
        self.since = now
        new = STATUS[target]
        # new -> passing and passing <-> warning always change the status; kept general.
        return new if new != old else None

    def describe(self) -> str:
        """HAProxy-style progress, e.g. ``passing, 1/3 towards critical``."""
        if not self.streak:
            return self.status
        if self.phase == "critical":
            return f"critical, {self.streak}/{self.rise} towards passing"
        return f"{self.status}, {self.streak}/{self.fall} towards critical"
