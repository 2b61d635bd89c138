"""The VIPs on the interface, through netlink (pyroute2): add, remove, list, and the link's
state. IPv4 addresses are added as /32 and IPv6 as /128 with ``nodad``: duplicate address
detection would hold a moved address back for a second or more, and ownership is already
decided through the store.

pyroute2's synchronous ``IPRoute`` runs on a thread of its own (uvloop cannot wrap a netlink
socket in a datagram transport): one thread, so requests keep their order; each is a fraction
of a millisecond.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

log = logging.getLogger("interknit.vip")

IFA_F_NODAD = 0x02
_EEXIST = 17
_EADDRNOTAVAIL = 99
_ENODEV = 19
IFF_UP = 0x1
IFF_RUNNING = 0x40  # carrier: the link is really up (IFF_LOWER_UP's userspace shadow)


class LinkError(Exception):
    """The interface is missing, or an address could not be changed; one sentence."""


def prefix(vip: str) -> int:
    return 32 if ipaddress.ip_address(vip).version == 4 else 128


class Interface:
    """One interface's VIPs. Every call is one netlink request, awaited."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.index = 0
        self.mac = ""
        self._ipr: IPRoute | None = None
        self._thread = ThreadPoolExecutor(1, thread_name_prefix="interknit-netlink")

    async def _call(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._thread, lambda: fn(*args, **kwargs))

    async def open(self) -> None:
        def setup() -> tuple[int, str] | None:
            self._ipr = IPRoute()
            for link in self._ipr.link("dump"):
                if link.get("ifname") == self.name:
                    return int(link["index"]), str(link.get("address") or "")
            return None

        found = await self._call(setup)
        if found is None:
            await self.close()
            raise LinkError(f"vip.interface: there is no interface named {self.name!r}")
        self.index, self.mac = found

    async def close(self) -> None:
        if self._ipr is not None:
            ipr, self._ipr = self._ipr, None
            await self._call(ipr.close)
        self._thread.shutdown(wait=False)

    async def up(self) -> bool:
        """The link is administratively up and has carrier."""
        assert self._ipr is not None
        links = await self._call(self._ipr.link, "get", index=self.index)
        flags = int(links[0]["flags"]) if links else 0
        return bool(flags & IFF_UP and flags & IFF_RUNNING)

    async def addresses(self) -> list[tuple[str, int]]:
        """(address, prefix length) of every address on the interface."""
        assert self._ipr is not None
        found = await self._call(lambda: list(self._ipr.addr("dump", index=self.index)))  # type: ignore[union-attr]
        out = []
        for msg in found:
            address = msg.get("address")
            if address:
                out.append((str(ipaddress.ip_address(address)), int(msg["prefixlen"])))
        return out

    async def first_address(self) -> str | None:
        """The interface's own first IPv4 (else global IPv6) address that is not a VIP."""
        found = await self.addresses()
        for family in (4, 6):
            for address, plen in found:
                ip = ipaddress.ip_address(address)
                if ip.version == family and plen < (32 if family == 4 else 128):
                    if family == 6 and ip.is_link_local:
                        continue
                    return address
        return None

    async def add(self, vip: str) -> None:
        assert self._ipr is not None
        options: dict[str, Any] = {}
        if ":" in vip:
            options["flags"] = IFA_F_NODAD
        try:
            await self._call(
                self._ipr.addr, "add", index=self.index, address=vip, prefixlen=prefix(vip),
                **options,
            )  # fmt: skip
        except NetlinkError as exc:
            if exc.code != _EEXIST:
                raise LinkError(f"cannot add {vip} to {self.name}: {exc}") from None

    async def remove(self, vip: str) -> None:
        assert self._ipr is not None
        try:
            await self._call(
                self._ipr.addr, "del", index=self.index, address=vip, prefixlen=prefix(vip)
            )
        except NetlinkError as exc:
            if exc.code not in (_EADDRNOTAVAIL, _ENODEV):
                raise LinkError(f"cannot remove {vip} from {self.name}: {exc}") from None

    async def remove_leftovers(self, vips: list[str]) -> list[str]:
        """Remove configured VIPs left on the interface (by a process that died without its
        guard): this node holds nothing until the store gives it something."""
        wanted = set(vips)
        removed = []
        for address, plen in await self.addresses():
            if address in wanted and plen == prefix(address):
                await self.remove(address)
                removed.append(address)
        return removed


class LinkWatcher:
    """Polls the interface's state (up with carrier, or not) and reports changes. A poll is
    one netlink dump; at 5 a second it costs nothing and needs no multicast subscription."""

    def __init__(self, iface: Interface, on_change: Callable[[bool], None], every: float = 0.2):
        self.iface = iface
        self.on_change = on_change
        self.every = every
        self.state: bool | None = None

    async def run(self) -> None:
        while True:
            try:
                up = await self.iface.up()
            except (NetlinkError, OSError) as exc:
                log.debug("link poll failed: %s", exc)
                up = False
            if up != self.state:
                self.state = up
                self.on_change(up)
            await asyncio.sleep(self.every)
