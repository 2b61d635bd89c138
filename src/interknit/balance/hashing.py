"""The one stable hash every hashing policy uses.

Python's ``hash()`` is salted per process, so two nodes (or one node after a restart) would
disagree about where a key belongs. blake2b is in the standard library, keyed by nothing, the
same everywhere, and fast enough for one call per request (about a microsecond).
"""

from __future__ import annotations

from hashlib import blake2b


def hash64(data: bytes) -> int:
    """A 64-bit unsigned hash of ``data``, identical on every machine and in every process."""
    return int.from_bytes(blake2b(data, digest_size=8).digest(), "little")


def hash128(data: bytes) -> tuple[int, int]:
    """Two independent 64-bit hashes of ``data`` (Maglev's offset and skip)."""
    digest = blake2b(data, digest_size=16).digest()
    return int.from_bytes(digest[:8], "little"), int.from_bytes(digest[8:], "little")
