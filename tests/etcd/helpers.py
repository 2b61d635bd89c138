"""Waiting helpers for the etcd tests (conditions, not fixed sleeps)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

from interknit.registry.etcd import EtcdRegistry
from interknit.registry.registry import Unavailable

T = TypeVar("T")


async def eventually(predicate: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.02)


async def retrying(write: Callable[[], Awaitable[T]], timeout: float = 10.0) -> T:
    """What a client does with a 503: try again (a write during a leader election fails)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return await write()
        except Unavailable:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.1)


def ids(registry: EtcdRegistry, service: str = "web") -> list[str]:
    return [i.id for i in registry.state.instances(service)]
