"""Telling the segment where an address now lives: gratuitous ARP (IPv4) and unsolicited
neighbour advertisements (IPv6), sent from the owner, as keepalived's vrrp_arp.c and
vrrp_ndisc.c build them; and hearing another station claim one of our addresses.

The frames are built here byte by byte (pure functions, tested); ``RawLink`` sends them on an
``AF_PACKET`` socket bound to the interface, which needs CAP_NET_RAW, as keepalived does.

* Gratuitous ARP: an ARP *request* from the owner's MAC, broadcast, with sender and target
  protocol address both the VIP (RFC 5227's announcement; what keepalived sends). Hosts and
  switches that have the VIP in their cache take the new MAC.
* Unsolicited NA (RFC 4861 4.4, 7.2.6): to all-nodes ``ff02::1`` from the VIP itself, hop
  limit 255, the override flag set and the owner's MAC as target link-layer address, so that
  neighbours replace what they cached.
"""

from __future__ import annotations

import ipaddress
import socket
import struct
from collections.abc import Callable
from typing import Final

ETH_P_ARP: Final = 0x0806
ETH_P_IPV6: Final = 0x86DD
_BROADCAST: Final = b"\xff" * 6
_ALL_NODES_MAC: Final = b"\x33\x33\x00\x00\x00\x01"
_ALL_NODES: Final = ipaddress.IPv6Address("ff02::1").packed
_NA_OVERRIDE: Final = 0x20000000
_PACKET_OUTGOING: Final = 4
_MIN_FRAME: Final = 60  # Ethernet's minimum without the FCS


def mac_bytes(text: str) -> bytes:
    parts = text.split(":")
    if len(parts) != 6:
        raise ValueError(f"{text!r} is not a MAC address")
    return bytes(int(p, 16) for p in parts)


def gratuitous_arp(mac: bytes, vip: ipaddress.IPv4Address) -> bytes:
    eth = _BROADCAST + mac + struct.pack("!H", ETH_P_ARP)
    arp = struct.pack("!HHBBH", 1, 0x0800, 6, 4, 1) + mac + vip.packed + _BROADCAST + vip.packed
    frame = eth + arp
    return frame + b"\0" * (_MIN_FRAME - len(frame))


def _checksum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    total: int = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def unsolicited_na(mac: bytes, vip: ipaddress.IPv6Address) -> bytes:
    src = vip.packed
    option = struct.pack("!BB", 2, 1) + mac  # target link-layer address, 8 bytes
    body = struct.pack("!I", _NA_OVERRIDE) + src + option
    pseudo = src + _ALL_NODES + struct.pack("!I3xB", 4 + len(body), 58)
    checksum = _checksum(pseudo + struct.pack("!BBH", 136, 0, 0) + body)
    icmp = struct.pack("!BBH", 136, 0, checksum) + body
    ip6 = struct.pack("!IHBB", 6 << 28, len(icmp), 58, 255) + src + _ALL_NODES
    eth = _ALL_NODES_MAC + mac + struct.pack("!H", ETH_P_IPV6)
    return eth + ip6 + icmp


def frame_for(mac: bytes, vip: str) -> bytes:
    address = ipaddress.ip_address(vip)
    if isinstance(address, ipaddress.IPv4Address):
        return gratuitous_arp(mac, address)
    return unsolicited_na(mac, address)


def arp_claim(frame: bytes) -> tuple[str, bytes] | None:
    """(sender IPv4 address, sender MAC) of an ARP request or reply frame, or None."""
    if len(frame) < 42 or frame[12:14] != b"\x08\x06":
        return None
    hrd, pro, hln, pln, op = struct.unpack_from("!HHBBH", frame, 14)
    if hrd != 1 or pro != 0x0800 or hln != 6 or pln != 4 or op not in (1, 2):
        return None
    sender_mac = frame[22:28]
    sender_ip = str(ipaddress.IPv4Address(frame[28:32]))
    return sender_ip, sender_mac


class RawLink:
    """Frames out of one interface, and the ARP traffic seen on it."""

    def __init__(self, ifname: str, mac: bytes) -> None:
        self.ifname = ifname
        self.mac = mac
        # Protocol 0: a send-only socket, nothing is queued to it.
        self._out = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, 0)
        self._out.setblocking(False)
        self._arp: socket.socket | None = None
        self.sent = {4: 0, 6: 0}

    def send(self, vip: str) -> int:
        """Send one announcement for ``vip``; the address family sent, 4 or 6."""
        frame = frame_for(self.mac, vip)
        proto = ETH_P_ARP if len(frame) == _MIN_FRAME and frame[12:14] == b"\x08\x06" else 0
        self._out.sendto(frame, (self.ifname, proto or ETH_P_IPV6))
        family = 4 if proto else 6
        self.sent[family] += 1
        return family

    def listen_arp(self, on_claim: Callable[[str, bytes], None]) -> socket.socket:
        """Open the ARP listener; ``on_claim(ip, mac)`` for each ARP from another station.
        The caller registers the returned socket's reader (``read_arp``)."""
        sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ARP))
        sock.bind((self.ifname, ETH_P_ARP))
        sock.setblocking(False)
        self._arp = sock
        self._on_claim = on_claim
        return sock

    def read_arp(self) -> None:
        assert self._arp is not None
        for _ in range(64):
            try:
                frame, addr = self._arp.recvfrom(2048)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                return
            if len(addr) > 2 and addr[2] == _PACKET_OUTGOING:
                continue
            claim = arp_claim(frame)
            if claim is not None and claim[1] != self.mac:
                self._on_claim(*claim)

    def close(self) -> None:
        self._out.close()
        if self._arp is not None:
            self._arp.close()
