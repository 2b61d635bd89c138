"""``[vip]``: the virtual IP pool, its interface, how fast failures are seen, what is tracked and
how moves are announced. ``config.py`` composes this section; nothing here reads TOML.

An empty ``addresses`` (the default) turns the component off.
"""

from __future__ import annotations

import ipaddress
import re
from typing import Annotated

from pydantic import AfterValidator, Field, model_validator

from interknit.names import parse_hostport
from interknit.registry.model import is_label
from interknit.sections import Seconds, Section

MAX_ADDRESSES = 1024
Address = ipaddress.IPv4Address | ipaddress.IPv6Address


def expand(entry: str) -> list[Address]:
    """One ``addresses`` entry: an address, or a range ``first-last`` of one family."""
    text = entry.strip()
    first, sep, last = text.partition("-")
    try:
        if not sep:
            return [ipaddress.ip_address(text)]
        start, end = ipaddress.ip_address(first.strip()), ipaddress.ip_address(last.strip())
    except ValueError:
        raise ValueError(
            f"{entry[:60]!r} is not an address or a range such as '10.0.0.10-10.0.0.13'"
        ) from None
    if start.version != end.version:
        raise ValueError(f"{entry!r} mixes IPv4 and IPv6")
    count = int(end) - int(start) + 1
    if count < 1:
        raise ValueError(f"{entry!r} ends before it starts")
    if count > MAX_ADDRESSES:
        raise ValueError(f"{entry!r} holds more than {MAX_ADDRESSES} addresses")
    return [ipaddress.ip_address(int(start) + i) for i in range(count)]


def _entry(value: str) -> str:
    for address in expand(value):
        if address.is_multicast or address.is_unspecified or address.is_loopback:
            raise ValueError(f"{address} cannot be a virtual IP (multicast, loopback or zero)")
        if address.version == 6 and address.is_link_local:
            raise ValueError(f"{address} is link-local: a virtual IP must be routable")
    return value


_IFNAME = re.compile(r"[^\s/:]{1,15}")


def _ifname(value: str) -> str:
    if not _IFNAME.fullmatch(value):
        raise ValueError("must be a network interface name such as 'eth0' (1-15 characters)")
    return value


def _url(value: str) -> str:
    if not re.fullmatch(r"http://[^\s/]+(/[^\s]*)?", value) or len(value) > 2000:
        raise ValueError("must be an http:// URL such as 'http://127.0.0.1:8080/health'")
    return value


def _hostport(value: str) -> str:
    parse_hostport(value)
    return value


def _address(value: str) -> str:
    try:
        return str(ipaddress.ip_address(value))
    except ValueError:
        raise ValueError(f"{value!r} is not an IP address") from None


def _label(value: str) -> str:
    # The addresses' service is "{service}-addresses": both must be DNS labels.
    if not is_label(value) or len(value) > 63 - len("-addresses"):
        raise ValueError("must be a DNS label of at most 53 characters")
    return value


class TrackSection(Section):
    """One thing this node's VIPs depend on (keepalived's ``track_script``): an HTTP URL that
    must answer 2xx, or a TCP address that must accept."""

    http: Annotated[str, AfterValidator(_url)] | None = None
    tcp: Annotated[str, AfterValidator(_hostport)] | None = None
    interval: Seconds = 0.5
    timeout: Seconds = 0.25
    rise: Annotated[int, Field(ge=1, le=100)] = 2
    fall: Annotated[int, Field(ge=1, le=100)] = 2

    @model_validator(mode="after")
    def _one_kind(self) -> TrackSection:
        if (self.http is None) == (self.tcp is None):
            raise ValueError("a track needs exactly one of http or tcp")
        if not 0 < self.timeout <= self.interval:
            raise ValueError("timeout must be above zero and at most the interval")
        return self


class AnnounceSection(Section):
    """Gratuitous ARPs (IPv4) and unsolicited neighbour advertisements (IPv6) from a new owner:
    ``count`` packets ``spacing`` apart, and the same again ``repeat_after`` later (keepalived's
    garp_master_repeat and garp_master_delay: 5, then 5 more after 5 s); ``0s`` sends no second
    burst."""

    count: Annotated[int, Field(ge=1, le=100)] = 5
    spacing: Seconds = 0.01
    repeat_after: Seconds = 5.0

    @model_validator(mode="after")
    def _limits(self) -> AnnounceSection:
        if self.spacing > 1.0:
            raise ValueError("spacing must be at most 1s")
        return self


class VipSection(Section):
    addresses: Annotated[
        list[Annotated[str, AfterValidator(_entry)]], Field(max_length=MAX_ADDRESSES)
    ] = Field(default_factory=list)
    interface: Annotated[str, AfterValidator(_ifname)] | None = None
    # The service whose instances are the VIP nodes; the addresses are held as instances of
    # "{service}-addresses".
    service: Annotated[str, AfterValidator(_label)] = "vip"
    weight: Annotated[int, Field(ge=1, le=1000)] = 1
    # The address peers send this node's adverts to (default: the interface's first address).
    advertise: Annotated[str, AfterValidator(_address)] | None = None
    port: Annotated[int, Field(ge=1, le=65535)] = 7462
    advert_interval: Seconds = 0.05
    dead_after: Seconds = 0.15
    fence: Seconds = 0.15
    lease_ttl: Seconds = 3.0
    track: list[TrackSection] = Field(default_factory=list, max_length=16)
    announce: AnnounceSection = Field(default_factory=AnnounceSection)

    @model_validator(mode="after")
    def _whole(self) -> VipSection:
        if not self.addresses:
            return self
        if self.interface is None:
            raise ValueError("interface is required when addresses are given")
        seen: set[Address] = set()
        for entry in self.addresses:
            for address in expand(entry):
                if address in seen:
                    raise ValueError(f"addresses: {address} is listed twice")
                seen.add(address)
        if len(seen) > MAX_ADDRESSES:
            raise ValueError(f"addresses: more than {MAX_ADDRESSES} in all")
        if not 0.01 <= self.advert_interval <= 10.0:
            raise ValueError("advert_interval must be between 10ms and 10s")
        if self.dead_after < 2 * self.advert_interval:
            raise ValueError("dead_after must be at least two advert intervals")
        if not 0.05 <= self.fence <= 60.0:
            raise ValueError("fence must be between 50ms and 60s")
        if not 1.0 <= self.lease_ttl <= 3600.0:
            raise ValueError("lease_ttl must be between 1s and 1h")
        if self.fence >= self.lease_ttl:
            raise ValueError("fence must be shorter than lease_ttl")
        return self

    @property
    def enabled(self) -> bool:
        return bool(self.addresses)

    def vips(self) -> list[Address]:
        """Every configured address, in the order written."""
        return [address for entry in self.addresses for address in expand(entry)]
