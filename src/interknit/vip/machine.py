"""Who holds each virtual IP, as one node sees it: the ownership state machine and the node's
core, sans-IO.

Rules of this file:

* Everything that decides whether this node may have a VIP on its interface lives here. The
  shell (``component.py``) reads the registry, sends adverts, runs netlink and the store's
  transactions, and feeds what happened back in; this file decides what to do next.
* No clock and no IO: ``now`` is passed to every call (the shell's monotonic clock), and
  decisions come out as effects, in the order they must be carried out.
* Each VIP's ownership is a table (``TRANSITIONS``); what does not fit a table (fencing, who is
  alive, the assignment) is the node's code below it.

Theory of operation (docs/vip.md has the whole argument).

*Membership.* A node joins by creating its member instance (service ``vip``, id = node name)
under a lease of its own; the revision that created it is its **epoch**. A membership ends when
the member instance goes: the node left, its lease ran out, or a peer revoked the lease after
not hearing the node's adverts for ``dead_after``. An epoch never comes back.

*Claims.* Each VIP has one claim instance, kept under no lease: it names the holder and the
holder's epoch. It changes only by compare-and-swap on its last revision: a claim (by the
node the assignment names), a handover (by the holder, to the node the assignment names, or to
nobody), all in one transaction with the memberships they rely on.

*Fencing.* A node has a VIP on its interface only while (a) its claim names this node and
epoch, and (b) the node confirmed, less than ``fence - lag`` ago by its own clock, that its
membership exists (a linearizable check through the store, every fraction of ``fence``).
Nobody else can take a claim while its epoch lives, and after the epoch ends the claimer waits
``wait_after_gone`` (about ``fence``) from when it saw the end: by then the old holder's
confirmations have run out and its addresses are gone. A holder that hands a VIP over removes
the address before the transaction, so the new holder may add it at once.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Final, Literal

from interknit.vip.assign import assign

# ---------------------------------------------------------------------- one VIP's table

State = Literal["free", "claiming", "owned", "releasing"]
# want: the assignment names this node and the VIP may be claimed now.  mine: the claim names
# this node's epoch and the assignment names this node.  doubt: the same, but at a revision
# that a handover of ours whose outcome we never learnt may still move (its answer was lost;
# the request may yet commit).  unwanted: the claim names this node's epoch but the assignment
# names another node (or none).  lost: the claim does not name this node's epoch.
# claimed / refused: our claim's outcome (refused also when the outcome is unknown).
# moved / kept: our handover's outcome (kept also when the outcome is unknown).
Event = Literal["want", "mine", "doubt", "unwanted", "lost", "claimed", "refused", "moved", "kept"]
# claim: a claim transaction pinned to the claim's last revision (from ``releasing`` it takes
# the VIP back: a new revision, so that no handover sent before can commit after it).
# handover: a handover transaction pinned the same way.
Action = Literal["claim", "handover"]

# (state, event) -> (next state, action). Every pair is listed, so the table is the spec.
# While a VIP's transaction is in flight its machine hears only that transaction's outcome, so
# ``claiming`` hears claimed/refused and ``releasing`` (right after a handover) moved/kept.
# Being ``owned`` is what lets the address be on the interface (if the node is fenced in too);
# no other state does, so an address is removed before any handover is sent and is added
# back only after a transaction made the claim ours at a new revision.
TRANSITIONS: Final[dict[tuple[State, Event], tuple[State, Action | None]]] = {
    ("free", "want"): ("claiming", "claim"),
    ("free", "mine"): ("owned", None),  # handed to us, or our claim whose answer was lost
    ("free", "doubt"): ("claiming", "claim"),  # take it back at a new revision first
    ("free", "unwanted"): ("releasing", "handover"),  # ours, never added: pass it on
    ("free", "lost"): ("free", None),
    ("free", "claimed"): ("free", None),  # outcomes of nothing in flight: ignored
    ("free", "refused"): ("free", None),
    ("free", "moved"): ("free", None),
    ("free", "kept"): ("free", None),
    ("claiming", "want"): ("claiming", None),
    ("claiming", "mine"): ("claiming", None),
    ("claiming", "doubt"): ("claiming", None),
    ("claiming", "unwanted"): ("claiming", None),
    ("claiming", "lost"): ("claiming", None),
    ("claiming", "claimed"): ("owned", None),
    ("claiming", "refused"): ("free", None),
    ("claiming", "moved"): ("claiming", None),
    ("claiming", "kept"): ("claiming", None),
    ("owned", "want"): ("owned", None),
    ("owned", "mine"): ("owned", None),
    ("owned", "doubt"): ("claiming", "claim"),  # cannot happen (owned is never in doubt)
    ("owned", "unwanted"): ("releasing", "handover"),
    ("owned", "lost"): ("free", None),  # our epoch ended and the claim moved on: drop it
    ("owned", "claimed"): ("owned", None),
    ("owned", "refused"): ("owned", None),
    ("owned", "moved"): ("owned", None),
    ("owned", "kept"): ("owned", None),
    ("releasing", "want"): ("releasing", None),
    ("releasing", "mine"): ("claiming", "claim"),  # wanted here again: take it back
    ("releasing", "doubt"): ("claiming", "claim"),
    ("releasing", "unwanted"): ("releasing", "handover"),  # try again
    ("releasing", "lost"): ("free", None),  # a handover went through
    ("releasing", "claimed"): ("releasing", None),
    ("releasing", "refused"): ("releasing", None),
    ("releasing", "moved"): ("free", None),
    ("releasing", "kept"): ("releasing", None),  # address stays off until we know
}

STATES: Final[tuple[State, ...]] = ("free", "claiming", "owned", "releasing")
EVENTS: Final[tuple[Event, ...]] = (
    "want", "mine", "doubt", "unwanted", "lost", "claimed", "refused", "moved", "kept",
)  # fmt: skip


class VipMachine:
    """One VIP's ownership as this node sees it."""

    __slots__ = ("since", "state")

    def __init__(self) -> None:
        self.state: State = "free"
        self.since = 0.0

    def on(self, event: Event, now: float) -> Action | None:
        state, action = TRANSITIONS[self.state, event]
        if state != self.state:
            self.state = state
            self.since = now
        return action


# ---------------------------------------------------------------------- what the store holds


@dataclass(frozen=True, slots=True)
class Member:
    """A member instance: a node in the pool, in one epoch."""

    name: str
    epoch: int  # the revision that created it
    lease: int
    address: str = ""
    port: int = 0
    weight: int = 1
    live: bool = True  # passing: it may be given VIPs


@dataclass(frozen=True, slots=True)
class Claim:
    """A VIP's claim instance; ``holder`` "" when released, ``version`` its last revision
    (0: never claimed)."""

    vip: str
    holder: str
    epoch: int
    version: int


# ---------------------------------------------------------------------- effects


@dataclass(frozen=True, slots=True)
class AddAddress:
    vip: str


@dataclass(frozen=True, slots=True)
class RemoveAddress:
    vip: str
    reason: Literal["moved", "fenced", "stopping"]


@dataclass(frozen=True, slots=True)
class Announce:
    vip: str
    reason: Literal["acquired", "recovery", "conflict"]


@dataclass(frozen=True, slots=True)
class Join:
    pass


@dataclass(frozen=True, slots=True)
class Leave:
    epoch: int


@dataclass(frozen=True, slots=True)
class ClaimVip:
    """Take ``vip`` if its claim is still at ``version``, this node's epoch lives, and (when
    given) the epoch ``gone`` = (holder, epoch) that held it has ended."""

    vip: str
    version: int
    epoch: int
    gone: tuple[str, int] | None


@dataclass(frozen=True, slots=True)
class Handover:
    """Give ``vip`` (ours at ``version``) to ``to``, or release it to nobody (None)."""

    vip: str
    version: int
    epoch: int
    to: Member | None


@dataclass(frozen=True, slots=True)
class Evict:
    """Revoke the lease of a member not heard for ``dead_after`` (or that said it is fenced)."""

    member: Member


@dataclass(frozen=True, slots=True)
class SetLive:
    """Mark our member passing (True) or critical (False): whether we may be given VIPs."""

    live: bool
    reason: str


Effect = (
    AddAddress | RemoveAddress | Announce | Join | Leave | ClaimVip | Handover | Evict | SetLive
)

# Advert flags (see adverts.py).
FENCED: Final = 1  # a member that cannot confirm its membership: it holds nothing
STOPPING: Final = 2
INELIGIBLE: Final = 4


@dataclass(slots=True)
class Timing:
    """Durations in seconds. ``rho`` bounds how far any clock's rate strays from true time;
    ``lag`` is the share of ``fence`` kept for a late timer on the holder."""

    fence: float = 0.15
    dead_after: float = 0.15
    rho: float = 0.001
    lag_share: float = 0.2
    rejoin_backoff: float = 0.5
    rejoin_max: float = 8.0
    evict_retry: float = 0.5
    startup_grace: float = 1.0
    txn_retry: float = 0.05

    @property
    def lag(self) -> float:
        return self.fence * self.lag_share

    @property
    def hold(self) -> float:
        """How long after sending a confirmation that succeeded the holder may keep its VIPs."""
        return self.fence - self.lag

    @property
    def wait_after_gone(self) -> float:
        """How long a claimer waits, by its clock, after seeing an epoch end. The old holder
        drops by ``hold / (1 - rho) + lag`` of true time after the end; this is that, read on
        a clock that may run fast by ``rho``."""
        return (1 + self.rho) * (self.hold / (1 - self.rho) + self.lag)


# ---------------------------------------------------------------------- the node's core


@dataclass(slots=True)
class _Peer:
    heard: float = -math.inf
    epoch: int = 0
    flags: int = 0


@dataclass(slots=True)
class Core:
    """One node's view and decisions. Feed it what happens; carry out what it returns."""

    name: str
    vips: Sequence[str]
    weight: int = 1
    timing: Timing = field(default_factory=Timing)
    solo: bool = False  # the embedded store: one node, no peers, no fencing through a store

    # Membership: our epoch (0: not a member), our lease, and until when we may hold VIPs.
    epoch: int = 0
    lease: int = 0
    valid_until: float = -math.inf
    joining: bool = False
    rejoin_at: float = 0.0
    joined_at: float = -math.inf
    rejoin_delay: float = 0.0
    eligible: bool = True
    eligible_reason: str = ""
    live_inflight: bool = False
    live_retry_at: float = 0.0
    # Going down (stopping, or our health failing): the store is first told we are not live,
    # so that no peer hands our VIPs straight back; only then do we hand them over.
    marked_down: bool = False
    stopping: bool = False
    leaving: bool = False
    left: bool = False
    # The store as last seen, with our own newer writes merged in.
    revision: int = 0
    members: dict[str, Member] = field(default_factory=dict)
    claims: dict[str, Claim] = field(default_factory=dict)
    # When each (name, epoch) was first seen, and when each was seen gone.
    first_seen: dict[tuple[str, int], float] = field(default_factory=dict)
    gone_since: dict[tuple[str, int], float] = field(default_factory=dict)
    peers: dict[str, _Peer] = field(default_factory=dict)
    evicting: dict[int, float] = field(default_factory=dict)  # lease -> when asked
    machines: dict[str, VipMachine] = field(default_factory=dict)
    present: set[str] = field(default_factory=set)  # addresses on our interface
    inflight: set[str] = field(default_factory=set)  # VIPs with a transaction in flight
    # VIP -> the revision a handover of ours was pinned to when its answer was lost: until the
    # claim moves past it, that handover may still commit, so we must not hold at it.
    doubtful: dict[str, int] = field(default_factory=dict)
    retry_at: dict[str, float] = field(default_factory=dict)
    started: float | None = None
    # When we last ran, and until when our own sense of who is silent is not to be trusted:
    # after a stall of our event loop, the adverts that came meanwhile are still unread.
    last_step: float = -math.inf
    stalled_until: float = -math.inf

    def __post_init__(self) -> None:
        self.machines = {vip: VipMachine() for vip in self.vips}

    # ------------------------------------------------------------------ reads

    def valid(self, now: float) -> bool:
        return self.epoch != 0 and (self.solo or now < self.valid_until)

    def state(self, vip: str) -> State:
        return self.machines[vip].state

    @property
    def done(self) -> bool:
        """Stopping, and nothing is ours any more."""
        idle = not self.inflight and all(m.state == "free" for m in self.machines.values())
        return self.stopping and idle and (self.left or self.epoch == 0) and not self.joining

    def advert_flags(self, now: float) -> int:
        flags = 0
        if self.epoch and not self.valid(now) and now - self.valid_until > self.timing.dead_after:
            flags |= FENCED
        if self.stopping:
            flags |= STOPPING
        if not self.eligible:
            flags |= INELIGIBLE
        return flags

    def heard_recently(self, name: str, now: float) -> bool:
        peer = self.peers.get(name)
        return peer is not None and now - peer.heard <= self.timing.dead_after

    def next_wakeup(self, now: float) -> float:
        """When ``tick`` must run next at the latest (a timer; sooner is harmless)."""
        times = [now + max(self.timing.dead_after / 3, 0.01)]
        if self.present and not self.solo:
            times.append(self.valid_until)
        for key, since in self.gone_since.items():
            if any(c.holder == key[0] and c.epoch == key[1] for c in self.claims.values()):
                times.append(since + self.timing.wait_after_gone)
        if self.epoch == 0 and not self.joining and not self.stopping:
            times.append(self.rejoin_at)
        times.append(self.joined_at + self.timing.dead_after)
        return min(t for t in times if t > now)

    # ------------------------------------------------------------------ inputs

    def start(self, now: float) -> list[Effect]:
        self.started = now
        self.joining = True
        return [Join()]

    def joined(self, epoch: int, lease: int, sent_at: float, now: float) -> list[Effect]:
        """Our member instance was created at ``epoch`` by a request sent at ``sent_at``."""
        self.joining = False
        if self.stopping:
            self.epoch, self.lease = epoch, lease
            return self._step(now)
        self.epoch, self.lease = epoch, lease
        # Claim nothing for one dead_after: by then we hear the peers that are up, and do not
        # take everything only to hand most of it over a moment later.
        self.joined_at = now
        self.rejoin_delay = 0.0
        self.valid_until = sent_at + self.timing.hold
        self.first_seen.setdefault((self.name, epoch), now)
        self.members[self.name] = Member(self.name, epoch, lease, weight=self.weight)
        self.revision = max(self.revision, epoch)
        return self._step(now)

    def join_failed(self, now: float) -> list[Effect]:
        self.joining = False
        self._backoff(now)
        return self._step(now)

    def confirmed(self, epoch: int, sent_at: float, now: float) -> list[Effect]:
        """A check sent at ``sent_at`` found our membership ``epoch`` alive."""
        if epoch == self.epoch and epoch:
            self.valid_until = max(self.valid_until, sent_at + self.timing.hold)
        return self._step(now)

    def refuted(self, epoch: int, now: float) -> list[Effect]:
        """A check found our membership ``epoch`` gone (our lease ran out or was revoked)."""
        if epoch == self.epoch and epoch:
            self._lose_membership(now)
        return self._step(now)

    def view(
        self, revision: int, members: Iterable[Member], claims: Iterable[Claim], now: float
    ) -> list[Effect]:
        """The store's members and claims as of ``revision`` (a whole snapshot)."""
        if revision < self.revision:
            return self._step(now)  # older than what we know already
        seen = {m.name: m for m in members}
        for m in seen.values():
            self.first_seen.setdefault((m.name, m.epoch), now)
        for old in self.members.values():
            new = seen.get(old.name)
            if (new is None or new.epoch != old.epoch) and revision >= old.epoch:
                self.gone_since.setdefault((old.name, old.epoch), now)
        mine = seen.get(self.name)
        if self.epoch and revision >= self.epoch and (mine is None or mine.epoch != self.epoch):
            self._lose_membership(now)
        self.members = seen
        if self.epoch and self.name not in seen and revision < self.epoch:
            self.members[self.name] = Member(self.name, self.epoch, self.lease, weight=self.weight)
        for claim in claims:
            known = self.claims.get(claim.vip)
            if known is None or claim.version >= known.version:
                self.claims[claim.vip] = claim
        self.revision = revision
        return self._step(now)

    def heard(self, name: str, epoch: int, flags: int, now: float) -> list[Effect]:
        """An advert from ``name``."""
        if name == self.name:
            return []
        peer = self.peers.setdefault(name, _Peer())
        effects: list[Effect] = []
        if now - peer.heard > self.timing.dead_after and peer.heard > -math.inf:
            # A peer we had stopped hearing is back (a partition healed, a node restarted): say
            # again where our addresses are, in case anyone believed another owner meanwhile
            # (keepalived issue 166: the node that stayed master never re-announced).
            effects.extend(Announce(vip, "recovery") for vip in sorted(self.present))
        peer.heard, peer.epoch, peer.flags = now, epoch, flags
        return effects + self._step(now)

    def conflict(self, vip: str, now: float) -> list[Effect]:
        """Another link-layer address claimed ``vip`` on our segment."""
        if vip in self.present:
            return [Announce(vip, "conflict")]
        return []

    def link_up(self, now: float) -> list[Effect]:
        return [Announce(vip, "recovery") for vip in sorted(self.present)]

    def set_eligible(self, eligible: bool, reason: str, now: float) -> list[Effect]:
        self.eligible, self.eligible_reason = eligible, reason
        if eligible and not self.stopping:
            self.marked_down = False
        return self._step(now)

    def claim_result(self, vip: str, revision: int | None, now: float) -> list[Effect]:
        """Our claim of ``vip`` committed at ``revision`` (None: refused, or unknown)."""
        machine = self.machines.get(vip)
        if machine is None or vip not in self.inflight:
            return []
        self.inflight.discard(vip)
        if revision is None:
            self.retry_at[vip] = now + self.timing.txn_retry
            machine.on("refused", now)
        else:
            self.claims[vip] = Claim(vip, self.name, self.epoch, revision)
            machine.on("claimed", now)
        return self._step(now)

    def handover_result(
        self,
        vip: str,
        to: Member | None,
        revision: int | None,
        now: float,
        *,
        version: int = 0,
        unknown: bool = False,
    ) -> list[Effect]:
        """Our handover of ``vip`` (pinned to ``version``) committed at ``revision``; None:
        refused, or with ``unknown`` its answer was lost and it may still commit."""
        machine = self.machines.get(vip)
        if machine is None or vip not in self.inflight:
            return []
        self.inflight.discard(vip)
        if revision is None:
            if unknown:
                self.doubtful[vip] = max(version, self.doubtful.get(vip, 0))
            self.retry_at[vip] = now + self.timing.txn_retry
            machine.on("kept", now)
        else:
            holder = to.name if to is not None else ""
            self.claims[vip] = Claim(vip, holder, to.epoch if to is not None else 0, revision)
            machine.on("moved", now)
        return self._step(now)

    def live_result(self, live: bool, ok: bool, now: float) -> list[Effect]:
        """Marking our member passing or critical went through (or not: the next step
        compares the store's copy again)."""
        self.live_inflight = False
        if not live:
            self.marked_down = True  # told, or the store is away: go on either way
        if not ok:
            self.live_retry_at = now + self.timing.txn_retry
        return self._step(now)

    def evicted(self, lease: int, now: float) -> list[Effect]:
        """An eviction we asked for was carried out (or failed: it may be asked again)."""
        return self._step(now)

    def left_store(self, now: float) -> list[Effect]:
        self.left = True
        self.epoch = 0
        return self._step(now)

    def stop(self, now: float) -> list[Effect]:
        """Graceful stop: hand every VIP over, then leave."""
        self.stopping = True
        return self._step(now)

    def tick(self, now: float) -> list[Effect]:
        return self._step(now)

    # ------------------------------------------------------------------ decisions

    def _lose_membership(self, now: float) -> None:
        if self.epoch:
            self.gone_since.setdefault((self.name, self.epoch), now)
        self.epoch = 0
        self.lease = 0
        self.valid_until = -math.inf
        if self.stopping:
            self.left = True
        self._backoff(now)

    def _backoff(self, now: float) -> None:
        t = self.timing
        self.rejoin_delay = min(max(self.rejoin_delay * 2, t.rejoin_backoff), t.rejoin_max)
        self.rejoin_at = now + self.rejoin_delay

    def _holds(self, claim: Claim | None) -> bool:
        return claim is not None and claim.holder == self.name and claim.epoch == self.epoch > 0

    def _alive(self, name: str, epoch: int) -> bool:
        member = self.members.get(name)
        return member is not None and member.epoch == epoch

    def _claimable(self, claim: Claim | None, now: float) -> tuple[bool, tuple[str, int] | None]:
        """May we claim now, and which ended epoch the claim must still name."""
        if claim is None or claim.holder == "":
            return True, None
        if claim.holder == self.name:
            # An epoch of ours that ended: this process removed (or never had) its addresses.
            return claim.epoch != self.epoch, (claim.holder, claim.epoch)
        key = (claim.holder, claim.epoch)
        if self._alive(*key):
            return False, None
        since = self.gone_since.setdefault(key, now)
        return now - since >= self.timing.wait_after_gone, key

    def _quorum(self, now: float) -> bool:
        """We and the peers we hear are a majority of the members: a node cut off from the
        others (its own link down) must not take what they hold once they look gone."""
        others = [m for m in self.members.values() if m.name != self.name]
        heard = sum(1 for m in others if self.heard_recently(m.name, now))
        return (1 + heard) * 2 > 1 + len(others)

    def _live_weights(self, now: float) -> dict[str, int]:
        # Only peers we hear may be given VIPs: one we cannot hear may be dead, and one that
        # cannot hear us will be evicted by us.
        weights = {
            m.name: max(1, m.weight)
            for m in self.members.values()
            if m.live and m.name != self.name and self.heard_recently(m.name, now)
        }
        down = self.stopping or not self.eligible
        if self.epoch and not (down and self.marked_down):
            weights[self.name] = max(1, self.weight)
        return weights

    def _step(self, now: float) -> list[Effect]:
        # The timer runs us at least every dead_after / 3; a longer gap is a stall.
        if now - self.last_step > self.timing.dead_after * 2 / 3 and self.last_step > -math.inf:
            self.stalled_until = now + self.timing.dead_after
        self.last_step = now
        store: list[Effect] = []
        if self.solo:
            self.valid_until = math.inf
        if self.epoch == 0 and not self.joining and not self.stopping and now >= self.rejoin_at:
            self.joining = True
            store.append(Join())
        down = self.stopping or not self.eligible
        if self.epoch and not self.live_inflight and now >= self.live_retry_at:
            me = self.members.get(self.name)
            stored = me.live if me is not None and me.epoch == self.epoch else not down
            if (down and not self.marked_down) or (
                stored == down and (not down or self.marked_down)
            ):
                # Not told yet, or the store's copy says otherwise (writes may land out of order).
                self.live_inflight = True
                self.live_retry_at = now + self.timing.txn_retry
                why = "stopping" if self.stopping else self.eligible_reason
                store.append(SetLive(not down, "" if not down else why))
        valid = self.valid(now)
        weights = self._live_weights(now)
        quorum = self.solo or self._quorum(now)
        current = {
            vip: c.holder
            for vip, c in self.claims.items()
            if c.holder and (self._alive(c.holder, c.epoch) or self._holds(c))
        }
        target = assign(list(self.vips), weights, current)
        for vip, machine in self.machines.items():
            if vip in self.inflight or now < self.retry_at.get(vip, -math.inf):
                continue
            claim = self.claims.get(vip)
            want = target.get(vip) == self.name
            if claim is not None and claim.version > self.doubtful.get(vip, claim.version):
                del self.doubtful[vip]  # moved past the pinned revision: it can never commit
            if self._holds(claim):
                assert claim is not None
                event: Event = "mine" if want else "unwanted"
                if want and self.doubtful.get(vip) == claim.version:
                    event = "doubt"
                action = machine.on(event, now)
                if action == "handover":
                    to = self.members.get(target[vip]) if vip in target else None
                    store.append(Handover(vip, claim.version, self.epoch, to))
                    self.inflight.add(vip)
                elif action == "claim":
                    store.append(ClaimVip(vip, claim.version, self.epoch, None))
                    self.inflight.add(vip)
                continue
            machine.on("lost", now)
            settled = self.solo or now - self.joined_at >= self.timing.dead_after
            if want and valid and quorum and settled and not self.stopping and self.eligible:
                ok, gone = self._claimable(claim, now)
                if ok and machine.on("want", now) == "claim":
                    version = claim.version if claim is not None else 0
                    store.append(ClaimVip(vip, version, self.epoch, gone))
                    self.inflight.add(vip)
        store.extend(self._evictions(now))
        if (
            self.stopping
            and not self.leaving
            and self.epoch
            and not self.inflight
            and all(m.state == "free" for m in self.machines.values())
        ):
            store.append(Leave(self.epoch))
            self.leaving = True
        # Removals go first (a handover above relies on it), then the store's work, then adds.
        desired = {vip for vip, m in self.machines.items() if m.state == "owned" and valid}
        effects: list[Effect] = []
        for vip in sorted(self.present - desired):
            reason: Literal["moved", "fenced", "stopping"] = "moved"
            if self.machines[vip].state == "owned" or not self.epoch:
                reason = "fenced"
            elif self.stopping:
                reason = "stopping"
            effects.append(RemoveAddress(vip, reason))
        effects.extend(store)
        for vip in sorted(desired - self.present):
            effects.append(AddAddress(vip))
            effects.append(Announce(vip, "acquired"))
        self.present = desired
        return effects

    def _evictions(self, now: float) -> list[Effect]:
        if self.solo or not self.valid(now) or now < self.stalled_until:
            return []
        t = self.timing
        others = [m for m in self.members.values() if m.name != self.name]
        out: list[Effect] = []
        for member in others:
            if member.name == self.name:
                continue
            asked = self.evicting.get(member.lease)
            if asked is not None and now - asked < t.evict_retry:
                continue
            peer = self.peers.get(member.name, _Peer())
            # Silence counts from when we could first expect to hear it: peers send adverts to
            # the members they see, so not before it was a member or before we were one. A
            # member never heard since it joined may still be starting (a busy machine): it
            # gets ``startup_grace`` instead.
            since = max(self.first_seen.get((member.name, member.epoch), now), self.joined_at)
            limit = t.dead_after if peer.heard >= since else max(t.dead_after, t.startup_grace)
            silent = now - max(peer.heard, since) > limit
            # A member that says it cannot confirm its membership holds nothing: let it go now
            # rather than after its lease.
            fenced = peer.flags & FENCED and peer.epoch == member.epoch and not silent
            if not (silent or fenced):
                continue
            # Only evict when we hear a majority of the rest: a node whose own link is down
            # hears nobody, and must not evict everyone else.
            rest = [m for m in others if m.name != member.name]
            heard = 1 + sum(1 for m in rest if self.heard_recently(m.name, now))
            if heard * 2 <= len(rest) + 1:
                continue
            self.evicting[member.lease] = now
            out.append(Evict(member))
        return out
