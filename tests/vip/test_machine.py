"""The ownership table and the node's core: exhaustive over the table, step by step over the
core, with time passed in (nothing here sleeps)."""

from __future__ import annotations

import itertools

import pytest

from interknit.vip import machine as m
from interknit.vip.machine import (
    EVENTS,
    STATES,
    TRANSITIONS,
    AddAddress,
    Announce,
    Claim,
    ClaimVip,
    Core,
    Evict,
    Handover,
    Join,
    Leave,
    Member,
    RemoveAddress,
    SetLive,
    Timing,
    VipMachine,
)

VIPS = ["10.0.0.1", "10.0.0.2"]


def test_the_table_lists_every_pair() -> None:
    assert set(TRANSITIONS) == set(itertools.product(STATES, EVENTS))


def test_owned_is_entered_only_through_a_committed_transaction() -> None:
    """Being owned is what allows the address up: only our claim's success, or the store
    showing the claim as ours (handed to us, or our claim whose answer was lost) leads there."""
    entries = {(s, e) for (s, e), (t, _) in TRANSITIONS.items() if t == "owned" and s != "owned"}
    assert entries == {("claiming", "claimed"), ("free", "mine")}


def test_actions_come_only_where_they_belong() -> None:
    claims = {k for k, (_, a) in TRANSITIONS.items() if a == "claim"}
    handovers = {k for k, (_, a) in TRANSITIONS.items() if a == "handover"}
    assert claims == {
        ("free", "want"),
        ("free", "doubt"),
        ("owned", "doubt"),
        ("releasing", "mine"),
        ("releasing", "doubt"),
    }
    assert handovers == {("owned", "unwanted"), ("free", "unwanted"), ("releasing", "unwanted")}
    # Every action starts a transaction, and only claiming/releasing wait for one.
    for (_, _), (target, action) in TRANSITIONS.items():
        if action == "claim":
            assert target == "claiming"
        if action == "handover":
            assert target == "releasing"


def test_outcomes_of_nothing_in_flight_change_nothing() -> None:
    for state in ("free", "owned"):
        for event in ("claimed", "refused", "moved", "kept"):
            assert TRANSITIONS[state, event] == (state, None)


def test_every_sequence_keeps_the_rules() -> None:
    """All event sequences of length 6 from free: a failed or unknown handover never leads back
    to owned without a claim committing first (``claimed``)."""
    for seq in itertools.product(EVENTS, repeat=6):
        machine = VipMachine()
        doubtful = False
        for i, event in enumerate(seq):
            before = machine.state
            machine.on(event, float(i))
            if before == "releasing" and event == "kept":
                doubtful = True
            if machine.state == "owned" and before != "owned":
                assert not doubtful or event == "claimed", seq
                doubtful = False
            if machine.state == "free":
                doubtful = False  # the core then feeds "doubt", not "mine" (tested below)


# ---------------------------------------------------------------------- the core


def joined_core(name: str = "a", vips: list[str] = VIPS, **kw: object) -> Core:
    core = Core(name, vips, **kw)  # type: ignore[arg-type]
    assert core.start(0.0) == [Join()]
    return core


def kinds(effects: list[m.Effect]) -> list[str]:
    return [type(e).__name__ for e in effects]


def join(core: Core, epoch: int = 5, now: float = 0.0, lease: int = 77) -> list[m.Effect]:
    """Joined one dead_after before ``now`` (a new member claims nothing before that), and
    confirmed at ``now``: what it does then."""
    before = now - core.timing.dead_after
    effects = core.joined(epoch, lease, before, before)
    for i in range(1, 3):  # the shell's timer runs at least every dead_after / 3
        effects += core.tick(before + i * core.timing.dead_after / 3)
    assert not [e for e in effects if isinstance(e, ClaimVip)]
    return core.confirmed(epoch, sent_at=now, now=now)


def own_all(core: Core, epoch: int = 5, now: float = 0.0) -> list[m.Effect]:
    effects = join(core, epoch, now)
    claims = [e for e in effects if isinstance(e, ClaimVip)]
    assert [c.vip for c in claims] == core.vips
    out: list[m.Effect] = []
    for i, c in enumerate(claims):
        out += core.claim_result(c.vip, epoch + 1 + i, now)
    return out


def test_a_lone_node_claims_every_vip_and_adds_each_after_its_claim_commits() -> None:
    core = joined_core()
    effects = join(core)
    assert effects and all(
        isinstance(e, ClaimVip) and e.version == 0 and e.epoch == 5 for e in effects
    )
    assert not core.present  # nothing is added before a claim commits
    out = core.claim_result("10.0.0.1", 6, 0.001)
    assert out == [AddAddress("10.0.0.1"), Announce("10.0.0.1", "acquired")]
    assert core.state("10.0.0.1") == "owned" and core.state("10.0.0.2") == "claiming"


def test_the_fence_takes_addresses_down_when_confirmations_stop() -> None:
    t = Timing()
    core = joined_core(timing=t)
    own_all(core, now=0.0)
    assert core.present == set(VIPS)
    assert core.tick(t.hold - 0.001) == []
    assert core.next_wakeup(t.hold - 0.01) <= t.hold
    effects = core.tick(t.hold)
    assert effects == [RemoveAddress(v, "fenced") for v in VIPS]
    # A confirmation sent later brings them back (the claims are still ours).
    effects = core.confirmed(5, sent_at=t.hold + 0.01, now=t.hold + 0.02)
    assert kinds(effects) == ["AddAddress", "Announce", "AddAddress", "Announce"]
    # A confirmation of another epoch counts for nothing.
    core.confirmed(4, sent_at=10.0, now=10.0)
    assert core.valid_until == t.hold + 0.01 + t.hold


def test_a_refuted_membership_drops_everything_at_once() -> None:
    core = joined_core()
    own_all(core, now=0.0)
    effects = core.refuted(5, now=0.01)
    assert effects[:2] == [RemoveAddress(v, "fenced") for v in VIPS][:0] + effects[:2]
    assert {e.vip for e in effects if isinstance(e, RemoveAddress)} == set(VIPS)
    assert core.epoch == 0 and not core.present
    # It joins again after a back-off, not at once.
    assert Join() not in core.tick(0.02)
    assert Join() in core.tick(0.01 + core.timing.rejoin_backoff)


def members(*specs: tuple[str, int]) -> list[Member]:
    return [Member(name, epoch, lease=epoch * 10) for name, epoch in specs]


def test_a_handover_removes_the_address_before_the_transaction() -> None:
    core = joined_core()
    own_all(core, now=0.0)
    claims = [Claim(v, "a", 5, 6 + i) for i, v in enumerate(VIPS)]
    core.heard("b", 9, 0, now=0.01)
    effects = core.view(10, members(("a", 5), ("b", 9)), claims, now=0.01)
    # Balance: one of the two goes to b. The address goes first, then the transaction.
    assert kinds(effects) == ["RemoveAddress", "Handover"]
    removed, handover = effects
    assert isinstance(removed, RemoveAddress) and isinstance(handover, Handover)
    assert handover.vip == removed.vip and handover.to is not None and handover.to.name == "b"
    assert handover.version in (6, 7) and handover.epoch == 5
    assert core.state(handover.vip) == "releasing"
    assert core.handover_result(handover.vip, handover.to, 11, now=0.02) == []
    assert core.state(handover.vip) == "free"


def test_an_unknown_handover_outcome_needs_a_new_revision_before_holding_again() -> None:
    core = joined_core()
    own_all(core, now=0.0)
    claims = [Claim(v, "a", 5, 6 + i) for i, v in enumerate(VIPS)]
    core.heard("b", 9, 0, now=0.01)
    [_, handover] = core.view(10, members(("a", 5), ("b", 9)), claims, now=0.01)
    assert isinstance(handover, Handover)
    vip = handover.vip
    # The answer was lost: the request may still commit later.
    core.handover_result(vip, handover.to, None, now=0.5, version=handover.version, unknown=True)
    assert core.state(vip) == "releasing" and vip not in core.present
    # b falls silent; the assignment wants the VIP back here, and the store still shows it ours
    # at the pinned revision: we take it back with a claim first, and add only once it commits.
    effects = core.confirmed(5, sent_at=0.6, now=0.6)
    assert ClaimVip(vip, handover.version, 5, None) in effects
    assert AddAddress(vip) not in effects
    # That claim's answer is lost too; the store still shows the VIP ours at the pinned
    # revision: still in doubt, so another claim, and still no address.
    core.claim_result(vip, None, now=0.65)
    effects = core.confirmed(5, sent_at=0.8, now=0.8)
    effects += core.view(13, members(("a", 5)), claims, now=0.8)
    assert ClaimVip(vip, handover.version, 5, None) in effects
    assert vip not in core.present
    # It commits: a new revision no old handover can move. Now the address comes back.
    effects = core.claim_result(vip, 14, now=0.85)
    assert effects == [AddAddress(vip), Announce(vip, "acquired")]


def test_a_claim_waits_after_the_holders_epoch_ends() -> None:
    t = Timing()
    core = joined_core(vips=["10.0.0.1"], timing=t)
    join(core)
    core.claim_result("10.0.0.1", None, now=0.0)  # b had it
    held = [Claim("10.0.0.1", "b", 3, 4)]
    core.heard("b", 3, 0, now=0.0)
    assert core.view(6, members(("a", 5), ("b", 3)), held, now=0.0) == []
    # b's membership ends (evicted or expired) at 1.0 as far as we can see.
    core.confirmed(5, sent_at=1.0, now=1.0)
    assert core.view(8, members(("a", 5)), held, now=1.0) == []
    core.confirmed(5, sent_at=1.1, now=1.1)
    assert core.tick(1.0 + t.wait_after_gone - 0.001) == []
    effects = core.tick(1.0 + t.wait_after_gone)
    assert effects == [ClaimVip("10.0.0.1", 4, 5, ("b", 3))]


def test_a_released_vip_is_claimed_at_once() -> None:
    core = joined_core(vips=["10.0.0.1"])
    join(core)
    core.claim_result("10.0.0.1", None, now=0.0)
    effects = core.view(9, members(("a", 5)), [Claim("10.0.0.1", "", 0, 8)], now=0.1)
    assert effects == [ClaimVip("10.0.0.1", 8, 5, None)]


def test_eviction_needs_silence_and_a_majority() -> None:
    t = Timing()
    core = joined_core(timing=t)
    own_all(core)
    view = members(("a", 5), ("b", 6), ("c", 7))
    core.heard("b", 6, 0, now=0.0)
    core.heard("c", 7, 0, now=0.0)
    core.view(10, view, [], now=0.0)
    effects = []
    for i in range(1, 7):
        effects += core.heard("c", 7, 0, now=i * 0.05)
        effects += core.confirmed(5, sent_at=i * 0.05, now=i * 0.05)
    evicted = [(e.member.name, e.member.lease) for e in effects if isinstance(e, Evict)]
    assert evicted == [("b", 60)]  # asked once, by lease, after dead_after of silence
    effects = []
    for i in range(7, 7 + int(t.evict_retry / 0.05) + 1):
        effects += core.heard("c", 7, 0, now=i * 0.05)
        effects += core.confirmed(5, sent_at=i * 0.05, now=i * 0.05)
    assert [e for e in effects if isinstance(e, Evict)]  # asked again after evict_retry
    # A node that hears nobody (its own link is down) evicts nobody.
    lonely = joined_core(timing=t)
    own_all(lonely)
    lonely.view(10, view, [], now=0.0)
    lonely.confirmed(5, sent_at=0.3, now=0.3)
    assert not [e for e in lonely.tick(0.31) if isinstance(e, Evict)]


def test_after_a_stall_of_our_own_nobody_is_evicted_until_we_caught_up() -> None:
    """A busy machine stalls our event loop: when we run again every peer looks silent, but
    their adverts are waiting unread. We evict no one until we have run for dead_after."""
    t = Timing()
    core = joined_core(timing=t)
    own_all(core)
    core.view(10, members(("a", 5), ("b", 6), ("c", 7)), [], now=0.0)
    for name, epoch in (("b", 6), ("c", 7)):
        core.heard(name, epoch, 0, now=0.0)
    core.heard("c", 7, 0, now=0.01)
    core.confirmed(5, sent_at=0.01, now=0.01)
    stalled = 0.01 + t.dead_after * 2  # nothing ran for this long
    core.confirmed(5, sent_at=stalled, now=stalled)
    effects = core.heard("c", 7, 0, now=stalled)  # c's queued advert, read first
    assert not [e for e in effects if isinstance(e, Evict)]
    # Still silent once we have been running for dead_after: b is evicted then.
    effects = []
    for i in range(1, 6):
        now = stalled + i * t.dead_after / 4
        effects += core.heard("c", 7, 0, now=now)
        effects += core.confirmed(5, sent_at=now, now=now)
        if now < stalled + t.dead_after:
            assert not [e for e in effects if isinstance(e, Evict)]
    assert [e.member.name for e in effects if isinstance(e, Evict)] == ["b"]


def test_a_member_that_says_it_is_fenced_is_evicted_at_once() -> None:
    core = joined_core()
    own_all(core)
    core.heard("b", 6, 0, now=0.0)
    core.view(10, members(("a", 5), ("b", 6)), [], now=0.0)
    effects = core.heard("b", 6, m.FENCED, now=0.01)
    assert [e.member.name for e in effects if isinstance(e, Evict)] == ["b"]


def test_a_peer_heard_again_after_silence_makes_us_announce_again() -> None:
    t = Timing()
    core = joined_core(timing=t)
    own_all(core)
    core.heard("b", 6, 0, now=0.0)
    assert not [e for e in core.heard("b", 6, 0, now=0.05) if isinstance(e, Announce)]
    later = 0.05 + t.dead_after + 0.01
    core.confirmed(5, sent_at=later, now=later)
    effects = core.heard("b", 6, 0, now=later)
    assert [e for e in effects if isinstance(e, Announce)] == [
        Announce(v, "recovery") for v in VIPS
    ]
    assert core.conflict("10.0.0.1", later) == [Announce("10.0.0.1", "conflict")]
    assert core.conflict("10.0.0.9", later) == []


def test_a_graceful_stop_marks_the_node_down_hands_over_then_leaves() -> None:
    core = joined_core()
    own_all(core)
    claims = [Claim(v, "a", 5, 6 + i) for i, v in enumerate(VIPS)]
    core.heard("b", 9, 0, now=0.0)
    core.view(10, [*members(("a", 5)), Member("b", 9, 90)], claims, now=0.0)
    # (b has one of them now; a keeps the other until it stops.)
    core.handover_result(next(iter(core.inflight)), None, 11, now=0.0)
    claims = [core.claims[v] for v in VIPS]
    core.view(11, [*members(("a", 5)), Member("b", 9, 90)], claims, now=0.0)
    kept = sorted(core.present)
    assert len(kept) == 1
    effects = core.stop(0.01)
    assert effects == [SetLive(False, "stopping")]  # first, so b does not hand it back
    assert core.present == set(kept)  # still serving meanwhile
    effects = core.live_result(False, True, 0.02)
    assert kinds(effects) == ["RemoveAddress", "Handover"]
    handover = effects[1]
    assert isinstance(handover, Handover) and handover.to is not None
    effects = core.handover_result(handover.vip, handover.to, 20, 0.03)
    assert effects == [Leave(5)]
    assert not core.done
    core.left_store(0.04)
    assert core.done


def test_an_older_view_is_ignored() -> None:
    core = joined_core(vips=["10.0.0.1"])
    join(core)
    core.claim_result("10.0.0.1", 6, now=0.0)
    assert core.present == {"10.0.0.1"}
    # A view from before our claim shows it free: we keep what we know.
    assert core.view(4, members(("a", 5)), [], now=0.01) == []
    assert core.view(5, members(("a", 5)), [], now=0.01) == []
    assert core.present == {"10.0.0.1"}
    # A newer view where our membership is gone: we are out.
    effects = core.view(9, members(("b", 8)), [Claim("10.0.0.1", "a", 5, 6)], now=0.02)
    assert RemoveAddress("10.0.0.1", "fenced") in effects and core.epoch == 0


def test_health_failing_hands_everything_over() -> None:
    core = joined_core()
    own_all(core)
    claims = [Claim(v, "a", 5, 6 + i) for i, v in enumerate(VIPS)]
    core.heard("b", 9, 0, now=0.0)
    core.view(10, [Member("a", 5, 50, live=True), Member("b", 9, 90)], claims, now=0.0)
    core.handover_result(next(iter(core.inflight)), None, 11, now=0.0)
    core.view(11, [Member("a", 5, 50), Member("b", 9, 90)], [core.claims[v] for v in VIPS], 0.0)
    assert core.set_eligible(False, "track http://x failing", 0.01) == [
        SetLive(False, "track http://x failing")
    ]
    effects = core.live_result(False, True, 0.02)
    assert kinds(effects) == ["RemoveAddress", "Handover"]
    assert core.advert_flags(0.02) & m.INELIGIBLE


def test_solo_holds_everything_without_a_store_to_confirm() -> None:
    core = Core("a", VIPS, solo=True)
    core.start(0.0)
    core.joined(3, 0, sent_at=0.0, now=0.0)  # solo: claims at once
    for i, vip in enumerate(VIPS):
        core.claim_result(vip, 4 + i, now=0.0)
    assert core.present == set(VIPS)
    assert core.tick(1e6) == []  # no fence to run out


@pytest.mark.parametrize("fence", [0.05, 0.15, 1.0])
def test_the_claimers_wait_covers_the_holders_hold_on_any_clocks(fence: float) -> None:
    """The timing argument in numbers: a holder whose clock runs slow by rho and whose timer is
    late by lag still drops before a claimer whose clock runs fast by rho is done waiting."""
    t = Timing(fence=fence)
    holder_drops = t.hold / (1 - t.rho) + t.lag  # true time after its last confirmation
    claimer_waits = t.wait_after_gone / (1 + t.rho)  # true time, fast clock
    assert holder_drops <= claimer_waits + 1e-12
    assert t.hold < fence <= t.wait_after_gone < fence * 1.01
