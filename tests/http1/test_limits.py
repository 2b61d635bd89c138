"""HeadGuard alone: a head is counted whole however it is split, and refused only past the
limit without its end."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from interknit.http1.limits import HeadGuard

LIMIT = 1024


def splits(data: bytes) -> st.SearchStrategy[list[bytes]]:
    """``data`` cut into pieces at random places."""
    return st.lists(st.integers(0, len(data)), max_size=12).map(
        lambda cuts: [
            data[a:b]
            for a, b in zip([0, *sorted(cuts)], [*sorted(cuts), len(data)], strict=True)
            if b > a
        ]
    )


def head(size: int, end: bytes = b"\r\n\r\n") -> bytes:
    start = b"GET / HTTP/1.1\r\nHost: x\r\nX-A: "
    return start + b"a" * (size - len(start) - len(end)) + end


def check_all(guard: HeadGuard, pieces: list[bytes]) -> int:
    for piece in pieces:
        status = guard.check(piece)
        if status:
            return status
    return 0


@given(st.integers(40, LIMIT).flatmap(lambda n: splits(head(n))))
def test_a_head_within_the_limit_passes_however_it_is_split(pieces: list[bytes]) -> None:
    assert check_all(HeadGuard(LIMIT), pieces) == 0


@given(st.integers(40, LIMIT), st.integers(1, 5000))
def test_what_follows_a_head_in_the_same_read_is_not_counted(size: int, more: int) -> None:
    """(The protocol resets the guard when the parser finishes a head, and checks no body.)"""
    assert HeadGuard(LIMIT).check(head(size) + b"b" * more) == 0
    guard = HeadGuard(LIMIT)
    assert guard.check(head(size)[: size // 2]) == 0
    assert guard.check(head(size)[size // 2 :] + b"b" * more) == 0


@given(st.integers(LIMIT + 1, 4 * LIMIT).flatmap(lambda n: splits(head(n))))
def test_a_head_past_the_limit_is_refused_431(pieces: list[bytes]) -> None:
    assert check_all(HeadGuard(LIMIT), pieces) == 431


@given(st.integers(LIMIT + 1, 4 * LIMIT).flatmap(lambda n: splits(b"GET /" + b"u" * n)))
def test_an_endless_target_is_414(pieces: list[bytes]) -> None:
    assert check_all(HeadGuard(LIMIT), pieces) == 414


def test_bare_lf_ends_count_and_reset_starts_over() -> None:
    guard = HeadGuard(LIMIT)
    assert guard.check(head(LIMIT, b"\n\n")) == 0
    guard.reset()
    assert guard.check(b"a" * LIMIT) == 0
    assert guard.check(b"a") == 414
