"""Source IP affinity: the same client address goes to the same endpoint.

HAProxy's ``balance source`` and nginx's ``ip_hash`` divide a hash by the number of servers, so
one server going down remaps nearly every client. Here the client address is looked up in a
Maglev table instead: when an endpoint leaves, only its clients move. The proxy passes the
client's address bytes (the packed IP, or its text) as ``hash_key``.

Clients behind one NAT share an address and so an endpoint; prefer a cookie (``sticky``) or
``ring_hash``/``maglev`` on a header for HTTP when that matters.
"""

from __future__ import annotations

from interknit.balance.maglev import Maglev


class SourceIp(Maglev):
    """Maglev keyed by the client address; the policy name tells the proxy what to hash."""

    name = "source_ip"
