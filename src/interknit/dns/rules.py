"""The DNS answer rules: which names exist in the zone and what each answers, as data.

Rules of this file:

* Everything that decides *what* a name answers lives here: the kinds of names, and a table from
  (kind, query type) to the builder that makes the answer. The zone (``zone.py``) knows how to
  build each answer and when to rebuild it; it does not decide which answers exist.
* A name that exists but has no row for the asked type answers NOERROR with no records
  (NODATA); a name that does not exist answers NXDOMAIN. Both carry the zone's SOA.
* This file does not know about the wire, sockets or time.

The names, for zone ``ik.internal.``, service ``search``, instance ``s1``, tag ``eu``:

====================================  ==============  ===========================================
name                                  kind            answers
====================================  ==============  ===========================================
``ik.internal.``                      APEX            SOA, NS
``ns.ik.internal.``                   NAMESERVER      A/AAAA of the server itself
``search.ik.internal.``               SERVICE         A/AAAA of healthy instances, rotated
``eu.search.ik.internal.``            TAG             A/AAAA of healthy instances tagged ``eu``
``s1.search.ik.internal.``            INSTANCE        A/AAAA of ``s1`` while healthy; TXT meta
``_search._tcp.ik.internal.``         SRV             SRV of healthy instances (RFC 2782)
``_search._eu.ik.internal.``          SRV_TAG         SRV of healthy instances tagged ``eu``
``search.global.ik.internal.``        GLOBAL          A/AAAA of the region GSLB picks (its
                                                      instances, or its declared gateways)
``_tcp.``, ``_eu.``, ``global.``      EMPTY           nothing (empty non-terminals: NODATA)
====================================  ==============  ===========================================

An instance id that is also a tag of the same service names the instance. ``ns`` and
``global`` are reserved: a service of that name is not answered. Every existing name answers
ANY with one synthesized HINFO record (RFC 8482) instead of everything it has.
"""

from __future__ import annotations

import enum
from typing import Literal

from interknit.dns.wire import AAAA, ANY, NS, SOA, SRV, TXT, A


class Kind(enum.Enum):
    APEX = "apex"
    NAMESERVER = "nameserver"
    SERVICE = "service"
    TAG = "tag"
    INSTANCE = "instance"
    SRV = "srv"
    SRV_TAG = "srv_tag"
    GLOBAL = "global"
    EMPTY = "empty"


Builder = Literal["soa", "ns", "self", "addresses", "meta", "srv", "regional", "any"]

RULES: dict[tuple[Kind, int], Builder] = {
    (Kind.APEX, SOA): "soa",
    (Kind.APEX, NS): "ns",
    (Kind.NAMESERVER, A): "self",
    (Kind.NAMESERVER, AAAA): "self",
    (Kind.SERVICE, A): "addresses",
    (Kind.SERVICE, AAAA): "addresses",
    (Kind.TAG, A): "addresses",
    (Kind.TAG, AAAA): "addresses",
    (Kind.INSTANCE, A): "addresses",
    (Kind.INSTANCE, AAAA): "addresses",
    (Kind.INSTANCE, TXT): "meta",
    (Kind.SRV, SRV): "srv",
    (Kind.SRV_TAG, SRV): "srv",
    (Kind.GLOBAL, A): "regional",
    (Kind.GLOBAL, AAAA): "regional",
}
RULES.update({(kind, ANY): "any" for kind in Kind if kind is not Kind.EMPTY})

# Answers that rotate (round robin, or weighted draws when weights differ).
ROTATED: frozenset[Builder] = frozenset({"addresses", "srv", "regional"})

RESERVED_LABELS = frozenset({"ns", "global"})
SRV_ALL_LABEL = "_tcp"
GLOBAL_LABEL = "global"
NAMESERVER_LABEL = "ns"
