"""The container agent's decision, for any registry and any wish: exact, minimal, and blind to
what others own."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from interknit.agent.reconcile import Held, Key, Plan, apply, reconcile
from interknit.registry.model import Check, InstanceSpec

ME = "agent:h1"
KEYS = st.tuples(st.sampled_from(["web", "api", "db"]), st.sampled_from(["a", "b", "c", "d"]))


def spec(port: int, owner: str = ME, check: bool = False) -> InstanceSpec:
    return InstanceSpec(
        address="127.0.0.1",
        port=port,
        meta=(("owner", owner),),
        check=Check(ttl=30.0) if check else None,
    )


SPECS = st.builds(spec, st.integers(1, 4), st.just(ME), st.booleans())
HELD = st.builds(
    lambda s, owner: Held(s, owner),
    st.builds(spec, st.integers(1, 4), st.just(ME), st.booleans()),
    st.sampled_from([ME, ME, "agent:h2", "run:7@h1", None]),
)


def test_a_new_container_is_put_and_a_gone_one_deleted() -> None:
    held = {("web", "old"): Held(spec(1), ME), ("web", "theirs"): Held(spec(2), "agent:h2")}
    plan = reconcile({("web", "new"): spec(3)}, held, ME)
    assert plan == Plan(puts=((("web", "new"), spec(3)),), deletes=(("web", "old"),))


def test_nothing_changed_writes_nothing() -> None:
    held = {("web", "a"): Held(spec(1), ME)}
    plan = reconcile({("web", "a"): spec(1)}, held, ME)
    assert not plan and plan == Plan()


def test_another_owners_instance_is_a_conflict_left_alone() -> None:
    held = {("web", "a"): Held(spec(1, "agent:h2"), "agent:h2")}
    plan = reconcile({("web", "a"): spec(5)}, held, ME)
    assert plan.conflicts == (("web", "a"),) and not plan


@settings(max_examples=300)
@given(
    wanted=st.dictionaries(KEYS, SPECS, max_size=8),
    held=st.dictionaries(KEYS, HELD, max_size=8),
)
def test_any_registry_ends_as_wished_with_the_fewest_writes(
    wanted: dict[Key, InstanceSpec], held: dict[Key, Held]
) -> None:
    plan = reconcile(wanted, held, ME)
    after = apply(plan, held, ME)
    theirs = {k for k, h in held.items() if h.owner != ME}
    # Exactly what is wanted, except where someone else holds the key.
    mine = {k: h.spec for k, h in after.items() if h.owner == ME}
    assert mine == {k: s for k, s in wanted.items() if k not in theirs}
    assert set(plan.conflicts) == set(wanted) & theirs
    # Others' instances are untouched.
    assert {k: after[k] for k in theirs} == {k: held[k] for k in theirs}
    # Minimal: a put only where the registry differs, a delete only of ours not wanted.
    for key, s in plan.puts:
        assert key not in held or (held[key].owner == ME and held[key].spec != s)
    for key in plan.deletes:
        assert held[key].owner == ME and key not in wanted
    assert len(set(plan.deletes)) == len(plan.deletes)
    # And once done, there is nothing left to do: a resync of a quiet system writes nothing.
    again = reconcile(wanted, after, ME)
    assert not again and again.conflicts == plan.conflicts
