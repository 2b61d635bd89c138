"""HeadCache alone: a head is kept from its second offer, and the tables stay bounded."""

from __future__ import annotations

from interknit.http1 import headcache
from interknit.http1.headcache import HeadCache


def test_kept_from_the_second_offer_and_bounded() -> None:
    cache: HeadCache[int] = HeadCache(max_bytes=16)
    cache.offer(b"head", 1)
    assert cache.get(b"head") is None  # seen once: a set entry, no value kept
    cache.offer(b"head", 1)
    assert cache.get(b"head") == 1
    cache.offer(b"x" * 17, 2)
    cache.offer(b"x" * 17, 2)
    assert cache.get(b"x" * 17) is None  # too long to keep
    for i in range(headcache.MAX_ENTRIES * 3):
        key = b"%d" % i
        cache.offer(key, i)
        cache.offer(key, i)
    assert len(cache) <= headcache.MAX_ENTRIES
    assert len(cache.seen) <= headcache.MAX_SEEN
    cache.clear()
    assert cache.get(b"head") is None and not cache.seen
