"""What the VIP component reads and writes byte by byte, and its config: adverts (hypothesis
over arbitrary bytes), announcement frames, ARP parsing, ids, the [vip] section."""

from __future__ import annotations

import ipaddress
import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from interknit.config import ConfigError, parse_config
from interknit.vip.adverts import MAX_SIZE, Advert, decode, encode
from interknit.vip.announce import (
    _checksum,
    arp_claim,
    gratuitous_arp,
    mac_bytes,
    unsolicited_na,
)
from interknit.vip.config import expand
from interknit.vip.store import claim_spec, read_claims, read_members, vip_id

MAC = mac_bytes("02:00:00:00:00:01")


@given(
    name=st.text(st.characters(blacklist_categories=("Cs", "Cc", "Zl", "Zp")), min_size=1,
                 max_size=60),
    epoch=st.integers(0, 2**64 - 1),
    flags=st.integers(0, 255),
    seq=st.integers(0, 2**32 - 1),
)  # fmt: skip
def test_adverts_round_trip(name: str, epoch: int, flags: int, seq: int) -> None:
    advert = Advert(name, epoch, flags, seq)
    if not name.isprintable() or len(name.encode()) > 255:
        return
    data = encode(advert)
    assert len(data) <= MAX_SIZE
    assert decode(data) == advert


@given(st.binary(max_size=400))
def test_anything_else_is_not_an_advert(data: bytes) -> None:
    advert = decode(data)  # never raises
    if advert is not None:
        assert encode(advert) == data


def test_truncated_or_padded_adverts_are_refused() -> None:
    data = encode(Advert("n1", 7, 1, 3))
    assert decode(data[:-1]) is None and decode(data + b"x") is None
    assert decode(b"XXXX" + data[4:]) is None
    with pytest.raises(ValueError):
        encode(Advert("", 1, 0, 0))


def test_gratuitous_arp_is_an_announcement_from_our_mac() -> None:
    frame = gratuitous_arp(MAC, ipaddress.IPv4Address("10.0.0.10"))
    assert len(frame) == 60
    assert frame[:6] == b"\xff" * 6 and frame[6:12] == MAC and frame[12:14] == b"\x08\x06"
    hrd, pro, hln, pln, op = struct.unpack_from("!HHBBH", frame, 14)
    assert (hrd, pro, hln, pln, op) == (1, 0x0800, 6, 4, 1)
    assert frame[22:28] == MAC
    assert frame[28:32] == frame[38:42] == bytes([10, 0, 0, 10])  # sender = target = the VIP
    assert arp_claim(frame) == ("10.0.0.10", MAC)
    assert arp_claim(frame[:30]) is None
    assert arp_claim(b"\0" * 12 + b"\x86\xdd" + b"\0" * 50) is None


def test_unsolicited_na_is_well_formed_with_a_valid_checksum() -> None:
    vip = ipaddress.IPv6Address("2001:db8::10")
    frame = unsolicited_na(MAC, vip)
    assert frame[:6] == b"\x33\x33\x00\x00\x00\x01" and frame[12:14] == b"\x86\xdd"
    ip6 = frame[14:54]
    version, length, next_header, hop_limit = struct.unpack_from("!IHBB", ip6)
    assert version >> 28 == 6 and next_header == 58 and hop_limit == 255
    assert ip6[8:24] == vip.packed and ip6[24:40] == ipaddress.IPv6Address("ff02::1").packed
    icmp = frame[54:]
    assert len(icmp) == length == 32
    assert icmp[0] == 136 and icmp[4] & 0x20  # neighbour advertisement, override
    assert icmp[8:24] == vip.packed and icmp[24:26] == b"\x02\x01" and icmp[26:32] == MAC
    # The checksum over the pseudo-header and the message (with its checksum) sums to zero.
    pseudo = ip6[8:40] + struct.pack("!I3xB", len(icmp), 58)
    assert _checksum(pseudo + icmp) == 0


def test_vip_ids_are_dns_labels() -> None:
    assert vip_id("10.0.0.10") == "10-0-0-10"
    assert vip_id("fd00::10") == "fd00--10"
    assert vip_id("::1:2") == "0--1-2"
    assert vip_id("2001:db8::") == "2001-db8--0"


def test_claims_and_members_read_back_and_bad_records_are_skipped() -> None:
    from interknit.registry.model import Instance, InstanceSpec

    good = Instance("vip-addresses", "10-0-0-1", claim_spec("10.0.0.1", 7462, "n1", 9),
                    mod_revision=12)  # fmt: skip
    bad = Instance("vip-addresses", "x", InstanceSpec("not-an-ip", 1), mod_revision=3)
    [claim] = read_claims([good, bad])
    assert (claim.vip, claim.holder, claim.epoch, claim.version) == ("10.0.0.1", "n1", 9, 12)
    member = Instance("vip", "n1", InstanceSpec("10.0.0.5", 7462, meta=(("lease", "77"),)),
                      create_revision=9)  # fmt: skip
    broken = Instance("vip", "n2", InstanceSpec("10.0.0.6", 7462, meta=(("lease", "x"),)))
    [m] = read_members([member, broken])
    assert (m.name, m.epoch, m.lease, m.address, m.live) == ("n1", 9, 77, "10.0.0.5", True)


def test_address_ranges_expand() -> None:
    assert [str(a) for a in expand("10.0.0.254-10.0.1.1")] == [
        "10.0.0.254", "10.0.0.255", "10.0.1.0", "10.0.1.1",
    ]  # fmt: skip
    assert [str(a) for a in expand(" fd00::1 ")] == ["fd00::1"]


@pytest.mark.parametrize(
    ("vip", "message"),
    [
        ({"addresses": ["10.0.0.1"]}, "vip: interface is required"),
        ({"addresses": ["10.0.0.9-10.0.0.1"], "interface": "eth0"}, "vip.addresses[0]"),
        ({"addresses": ["10.0.0.1-fd00::1"], "interface": "eth0"}, "mixes IPv4 and IPv6"),
        ({"addresses": ["10.0.0.0-10.0.255.255"], "interface": "eth0"}, "more than 1024"),
        ({"addresses": ["224.0.0.1"], "interface": "eth0"}, "cannot be a virtual IP"),
        ({"addresses": ["10.0.0.1", "10.0.0.1"], "interface": "eth0"}, "listed twice"),
        ({"addresses": ["10.0.0.1"], "interface": "a/b"}, "vip.interface"),
        ({"addresses": ["10.0.0.1"], "interface": "eth0", "fence": "5s"}, "lease_ttl"),
        ({"addresses": ["10.0.0.1"], "interface": "eth0", "dead_after": "60ms"}, "two advert"),
        ({"addresses": ["10.0.0.1"], "interface": "eth0", "track": [{}]}, "vip.track[0]"),
        ({"addresses": ["x"], "interface": "eth0"}, "vip.addresses[0]"),
        ({"service": "Bad_Name"}, "vip.service"),
        ({"announce": {"spacing": "2s"}}, "vip.announce"),
    ],
)
def test_config_errors_name_the_key(vip: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_config({"vip": vip})
    assert message in str(info.value)


def test_config_defaults_and_a_full_section() -> None:
    assert not parse_config({}).vip.enabled
    section = parse_config(
        {
            "vip": {
                "addresses": ["10.0.0.1-10.0.0.2", "fd00::1"],
                "interface": "eth0",
                "weight": 2,
                "track": [{"http": "http://127.0.0.1:8080/health"}, {"tcp": "[::1]:443"}],
                "announce": {"count": 3, "repeat_after": "0s"},
            }
        }
    ).vip
    assert [str(v) for v in section.vips()] == ["10.0.0.1", "10.0.0.2", "fd00::1"]
    assert section.fence == 0.15 and section.advert_interval == 0.05
    assert section.announce.count == 3 and section.announce.repeat_after == 0
