"""The check state machine: every table row, rise/fall counting, and a reference model."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from interknit.health.machine import STATUS, TRANSITIONS, CheckMachine, Phase
from interknit.registry.model import CheckStatus

RESULTS: tuple[CheckStatus, ...] = ("passing", "warning", "critical")


def machine_in(phase: Phase, rise: int = 2, fall: int = 3) -> CheckMachine:
    if phase == "new":
        return CheckMachine(rise, fall, "critical", checked=False)
    return CheckMachine(rise, fall, STATUS[phase], checked=True)


def feed(m: CheckMachine, results: list[CheckStatus], start: float = 0.0) -> list[CheckStatus]:
    """Feed results one a second; the reported changes, in order."""
    changes = []
    for i, result in enumerate(results):
        change = m.on_result(result, start + i)
        if change is not None:
            changes.append(change)
    return changes


def test_table_covers_every_phase_and_result() -> None:
    phases: tuple[Phase, ...] = ("new", "critical", "passing", "warning")
    assert set(TRANSITIONS) == {(p, r) for p in phases for r in RESULTS}


def test_restored_statuses_pick_their_phase() -> None:
    assert CheckMachine(status="critical").phase == "new"
    assert CheckMachine(status="critical", checked=True).phase == "critical"
    assert CheckMachine(status="passing").phase == "passing"
    assert CheckMachine(status="warning").phase == "warning"


@pytest.mark.parametrize(("rise", "fall"), [(0, 3), (2, 0)])
def test_rejects_rise_or_fall_below_one(rise: int, fall: int) -> None:
    with pytest.raises(ValueError):
        CheckMachine(rise, fall)


# ------------------------------------------------------------------ one row at a time


def test_new_passes_on_first_success_whatever_rise() -> None:
    m = machine_in("new", rise=5)
    assert m.on_result("passing", 7.0) == "passing"
    assert m.phase == "passing"
    assert m.since == 7.0


@pytest.mark.parametrize("result", ["warning", "critical"])
def test_new_stays_new_until_a_pass(result: CheckStatus) -> None:
    m = machine_in("new")
    assert feed(m, [result] * 10) == []
    assert m.phase == "new"
    assert m.status == "critical"


def test_critical_needs_rise_consecutive_passes() -> None:
    m = machine_in("critical", rise=3)
    assert m.on_result("passing", 1) is None
    assert m.on_result("passing", 2) is None
    assert m.describe() == "critical, 2/3 towards passing"
    assert m.on_result("passing", 3) == "passing"
    assert m.since == 3
    assert m.streak == 0


@pytest.mark.parametrize("breaker", ["warning", "critical"])
def test_critical_rise_streak_is_broken(breaker: CheckStatus) -> None:
    m = machine_in("critical", rise=2)
    assert feed(m, ["passing", breaker, "passing"]) == []
    assert m.phase == "critical"
    assert m.on_result("passing", 9) == "passing"


def test_passing_needs_fall_consecutive_failures() -> None:
    m = machine_in("passing", fall=3)
    assert feed(m, ["critical", "critical"]) == []
    assert m.describe() == "passing, 2/3 towards critical"
    assert m.status == "passing"
    assert m.on_result("critical", 5) == "critical"
    assert m.phase == "critical"  # seen passing: recovery needs rise passes, not one


def test_passing_fall_streak_is_broken_by_a_pass() -> None:
    m = machine_in("passing", fall=2)
    assert feed(m, ["critical", "passing", "critical", "passing"]) == []
    assert m.status == "passing"


def test_warning_is_immediate_while_up_and_breaks_the_fall_streak() -> None:
    m = machine_in("passing", fall=2)
    assert m.on_result("critical", 1) is None
    assert m.on_result("warning", 2) == "warning"
    assert m.on_result("critical", 3) is None  # the streak started again
    assert m.status == "warning"
    assert m.on_result("critical", 4) == "critical"


def test_warning_turns_passing_on_one_pass() -> None:
    m = machine_in("warning", rise=5)
    assert m.on_result("warning", 1) is None
    assert m.on_result("passing", 2) == "passing"


def test_warning_falls_like_passing() -> None:
    m = machine_in("warning", fall=2)
    assert feed(m, ["critical", "critical"]) == ["critical"]


def test_rise_and_fall_of_one_act_at_once() -> None:
    m = machine_in("passing", rise=1, fall=1)
    assert feed(m, ["critical", "passing", "critical"]) == ["critical", "passing", "critical"]


def test_steady_results_report_nothing() -> None:
    steady: list[tuple[Phase, CheckStatus]] = [
        ("passing", "passing"),
        ("warning", "warning"),
        ("critical", "critical"),
    ]
    for phase, result in steady:
        m = machine_in(phase)
        assert feed(m, [result] * 50) == []


def test_fails_then_recovers_example() -> None:
    # rise 2, fall 3, new instance: the example in docs/health.md.
    m = machine_in("new")
    results: list[CheckStatus] = ["critical", "passing", "critical", "critical", "critical"]
    results += ["passing", "passing", "warning", "passing"]
    changes = [(i, m.on_result(r, float(i))) for i, r in enumerate(results)]
    assert [(i, c) for i, c in changes if c] == [
        (1, "passing"),
        (4, "critical"),
        (6, "passing"),
        (7, "warning"),
        (8, "passing"),
    ]


# ------------------------------------------------------------------ against a reference


def reference(
    results: list[CheckStatus], rise: int, fall: int, start: CheckStatus, checked: bool
) -> list[CheckStatus]:
    """The rules, restated: count runs of identical results, no phases, no table."""
    status = start
    seen_passing = checked or start != "critical"
    passes = fails = 0
    out = []
    for r in results:
        passes = passes + 1 if r == "passing" else 0
        fails = fails + 1 if r == "critical" else 0
        if status == "critical":
            if r == "passing" and (not seen_passing or passes >= rise):
                status = "passing"
                seen_passing = True
        elif r == "critical":
            if fails >= fall:
                status = "critical"
        else:
            status = r
        out.append(status)
    return out


@given(
    results=st.lists(st.sampled_from(RESULTS), max_size=60),
    rise=st.integers(1, 5),
    fall=st.integers(1, 5),
    start=st.sampled_from(RESULTS),
    checked=st.booleans(),
)
def test_matches_reference(
    results: list[CheckStatus], rise: int, fall: int, start: CheckStatus, checked: bool
) -> None:
    m = CheckMachine(rise, fall, start, checked=checked)
    expected = reference(results, rise, fall, start, checked)
    previous = m.status
    for i, (result, want) in enumerate(zip(results, expected, strict=True)):
        change = m.on_result(result, float(i))
        assert m.status == want
        # A report exactly when the status changes, carrying the new status.
        assert change == (want if want != previous else None)
        previous = want
