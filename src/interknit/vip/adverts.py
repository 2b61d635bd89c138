"""Adverts: the small UDP datagrams VIP nodes send each other every ``advert_interval``, as VRRP
masters do, so that a dead node is noticed in ``dead_after`` rather than a lease TTL.

An advert only says "I am alive, in this epoch, with these flags". It moves nothing by itself:
a peer that stops hearing a node revokes that node's lease through the store, and nobody may
take a VIP until the store says so. So a lost, late or forged advert can delay a failover or
cause an early one, never give one address two owners; adverts are not authenticated.

Wire format (network byte order), at most 18 + 255 bytes::

    magic "IKV1" | flags u8 | name length u8 | epoch u64 | sequence u32 | name (UTF-8)
"""

from __future__ import annotations

import asyncio
import logging
import struct
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Final

log = logging.getLogger("interknit.vip")

MAGIC: Final = b"IKV1"
_HEAD = struct.Struct("!4sBBQI")
MAX_NAME = 255
MAX_SIZE: Final = _HEAD.size + MAX_NAME


@dataclass(frozen=True, slots=True)
class Advert:
    name: str
    epoch: int
    flags: int
    seq: int


def encode(advert: Advert) -> bytes:
    name = advert.name.encode()
    if not 0 < len(name) <= MAX_NAME:
        raise ValueError("an advert's node name is 1-255 bytes")
    return _HEAD.pack(MAGIC, advert.flags & 0xFF, len(name), advert.epoch, advert.seq) + name


def decode(data: bytes) -> Advert | None:
    """The advert in ``data``, or None for anything else (wrong size, magic or name)."""
    if not _HEAD.size < len(data) <= MAX_SIZE:
        return None
    magic, flags, size, epoch, seq = _HEAD.unpack_from(data)
    if magic != MAGIC or len(data) != _HEAD.size + size:
        return None
    try:
        name = data[_HEAD.size :].decode()
    except UnicodeDecodeError:
        return None
    if not name.isprintable():
        return None
    return Advert(name, epoch, flags, seq)


class AdvertProtocol(asyncio.DatagramProtocol):
    """Receives adverts and hands each well-formed one (not our own) to ``on_advert``."""

    def __init__(self, me: str, on_advert: Callable[[Advert], None]) -> None:
        self.me = me
        self.on_advert = on_advert
        self.transport: Any = None  # uvloop's UDP transport is not asyncio's class
        self.malformed = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport

    def datagram_received(self, data: bytes, addr: Any) -> None:
        advert = decode(data)
        if advert is None:
            self.malformed += 1
            return
        if advert.name != self.me:
            self.on_advert(advert)

    def error_received(self, exc: Exception) -> None:
        # An ICMP error for an earlier send (a peer that is gone): not a reason to stop.
        log.debug("advert socket error: %s", exc)

    def send(self, data: bytes, address: str, port: int) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.sendto(data, (address, port))
