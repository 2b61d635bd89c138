from __future__ import annotations

import random

import pytest

from interknit.balance.pool import Pool, make_balancer
from interknit.balance.sticky import StickyCookie, find_cookie, new_secret
from tests.balance.helpers import endpoints, instance

SECRET = b"0123456789abcdef0123456789abcdef"


def pool_of(*ids: str) -> Pool:
    pool = Pool("svc", make_balancer("round_robin"))
    pool.update(
        [instance(i, address=f"10.9.8.{n + 1}", port=8000 + n) for n, i in enumerate(ids)], now=0.0
    )
    return pool


def test_round_trip() -> None:
    sticky = StickyCookie(SECRET)
    eps = endpoints(1, 1, 1)
    for ep in eps:
        assert sticky.lookup(sticky.encode(ep), eps) is ep


def test_value_leaks_neither_address_nor_name() -> None:
    sticky = StickyCookie(SECRET)
    ep = endpoints(1)[0]
    value = sticky.encode(ep)
    assert len(value) == 16
    for secret in (ep.address, str(ep.port), ep.key, "svc", "10.0.0"):
        assert secret not in value
    header = sticky.set_cookie(ep)
    assert ep.address not in header and ep.key not in header


def test_value_depends_on_the_secret() -> None:
    ep = endpoints(1)[0]
    assert StickyCookie(SECRET).encode(ep) != StickyCookie(b"x" * 32).encode(ep)
    # Another node (or a restart) with the same secret recognises the cookie.
    value = StickyCookie(SECRET).encode(ep)
    assert StickyCookie(SECRET).lookup(value, [ep]) is ep
    assert StickyCookie(b"x" * 32).lookup(value, [ep]) is None


@pytest.mark.parametrize("value", [None, "", "short", "!" * 16, "A" * 17, "AAAAAAAAAAAAAAAA"])
def test_bad_or_unknown_values_find_nothing(value: str | None) -> None:
    sticky = StickyCookie(SECRET)
    assert sticky.lookup(value, endpoints(1, 1)) is None


def test_set_cookie_attributes() -> None:
    ep = endpoints(1)[0]
    plain = StickyCookie(SECRET, "ik_affinity").set_cookie(ep)
    assert plain.startswith("ik_affinity=")
    assert plain.endswith("; Path=/; HttpOnly; SameSite=Lax")
    secure = StickyCookie(SECRET, "s", secure=True, max_age=3600).set_cookie(ep)
    assert secure.endswith("; HttpOnly; SameSite=Lax; Secure; Max-Age=3600")


def test_constructor_checks() -> None:
    with pytest.raises(ValueError):
        StickyCookie(b"short")
    with pytest.raises(ValueError):
        StickyCookie(SECRET, "bad name;")
    assert len(new_secret()) == 32 and new_secret() != new_secret()


def test_find_cookie() -> None:
    header = 'a=1; ik_affinity="abc"; other=x=y'
    assert find_cookie(header, "ik_affinity") == "abc"
    assert find_cookie(header, "a") == "1"
    assert find_cookie(header, "other") == "x=y"
    assert find_cookie(header, "missing") is None
    assert find_cookie(None, "a") is None
    assert find_cookie("ik_affinity", "ik_affinity") is None


def test_choose_binds_then_sticks() -> None:
    sticky = StickyCookie(SECRET)
    pool = pool_of("a", "b", "c")
    ep, set_cookie = sticky.choose(None, pool, None, now=0.0)
    assert ep is not None and set_cookie is not None
    value = find_cookie(set_cookie.split(";")[0], sticky.name)
    # Round robin would move on; the cookie keeps the client where it was.
    for _ in range(5):
        again, rewrite = sticky.choose(value, pool, None, now=1.0)
        assert again is ep and rewrite is None


def test_unusable_endpoint_rebinds_and_rewrites() -> None:
    sticky = StickyCookie(SECRET)
    pool = pool_of("a", "b", "c")
    a = pool.get("svc/a")
    assert a is not None
    value = sticky.encode(a)
    pool.update([instance("a", "critical"), instance("b"), instance("c")], now=5.0)
    ep, set_cookie = sticky.choose(value, pool, None, now=5.0)
    assert ep is not None and ep is not a
    assert set_cookie == sticky.set_cookie(ep)
    # Back to health: the client stays on its new endpoint (the cookie names it now).
    pool.update([instance("a"), instance("b"), instance("c")], now=6.0)
    new_value = find_cookie(set_cookie, sticky.name)
    assert sticky.choose(new_value, pool, None, now=6.0) == (ep, None)


def test_draining_and_removed_endpoints_rebind() -> None:
    sticky = StickyCookie(SECRET)
    pool = pool_of("a", "b")
    value = sticky.encode(pool.get("svc/a"))  # type: ignore[arg-type]
    pool.update([instance("a", "draining"), instance("b")], now=1.0)
    assert sticky.choose(value, pool, None, now=1.0)[0] is pool.get("svc/b")
    pool.update([instance("b"), instance("c")], now=2.0)
    ep, rewrite = sticky.choose(value, pool, None, now=2.0)
    assert ep is not None and rewrite is not None


def test_retry_of_a_sticky_request_goes_elsewhere() -> None:
    sticky = StickyCookie(SECRET)
    pool = pool_of("a", "b")
    a = pool.get("svc/a")
    assert a is not None
    ep, rewrite = sticky.choose(sticky.encode(a), pool, None, now=0.0, exclude=[a])
    assert ep is pool.get("svc/b") and rewrite is not None


def test_expired_ejection_is_seen_without_an_update() -> None:
    sticky = StickyCookie(SECRET)
    pool = Pool("svc", make_balancer("random", rng=random.Random(1)))
    pool.update([instance("a", ejected_until=10.0), instance("b")], now=0.0)
    value = sticky.encode(pool.get("svc/a"))  # type: ignore[arg-type]
    assert sticky.choose(value, pool, None, now=5.0)[0] is pool.get("svc/b")
    assert sticky.choose(value, pool, None, now=10.0) == (pool.get("svc/a"), None)


def test_empty_pool() -> None:
    sticky = StickyCookie(SECRET)
    pool = pool_of()
    assert sticky.choose("AAAAAAAAAAAAAAAA", pool, None, now=0.0) == (None, None)
