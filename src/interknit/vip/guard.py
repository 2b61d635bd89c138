"""The guard: a small process that takes the node's VIPs off the interface if the node dies
without doing it itself (``kill -9``, a crash, the OOM killer).

A machine that dies takes its addresses with it; a process does not, and an address left on a
live machine's interface keeps answering ARP for a VIP that another node now holds. So the node
starts this process first, holding the write end of a pipe to it. The guard reads the
interface and the addresses on the first line, then waits for the pipe to close. When the node
exits, cleanly or not, the kernel closes its end; the guard then removes whichever of those
addresses are on the interface and exits. A node that stops cleanly has removed them already,
and writes ``done`` before closing, which the guard takes as nothing to do.

The guard ignores SIGINT and SIGTERM (they are the node's to handle) and runs in a session of
its own, so that a signal to the node's process group does not take it down first.

Run as ``python -m interknit.vip.guard``.
"""

from __future__ import annotations

import json
import signal
import sys

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from interknit.vip.netlink import prefix


def clear(ifname: str, vips: list[str]) -> list[str]:
    removed: list[str] = []
    with IPRoute() as ipr:
        links = ipr.link_lookup(ifname=ifname)
        if not links:
            return removed
        index = links[0]
        present = {str(a.get("address")) for a in ipr.addr("dump", index=index)}
        for vip in vips:
            if vip in present:
                try:
                    ipr.addr("del", index=index, address=vip, prefixlen=prefix(vip))
                    removed.append(vip)
                except NetlinkError:
                    pass
    return removed


def main() -> int:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    first = sys.stdin.readline()
    try:
        spec = json.loads(first)
        ifname, vips = str(spec["interface"]), [str(v) for v in spec["addresses"]]
    except (ValueError, KeyError, TypeError):
        return 2
    sys.stdout.write("ready\n")
    sys.stdout.flush()
    last = ""
    for line in sys.stdin:  # until the node's end closes
        last = line.strip()
    if last == "done":
        return 0
    removed = clear(ifname, vips)
    if removed:
        sys.stderr.write(f"interknit vip guard: removed {', '.join(removed)} from {ifname}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
