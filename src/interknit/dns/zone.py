"""The authoritative zone: a copy of the registry turned into pre-encoded DNS answers.

Sans-IO. The node feeds the zone the registry's state (``sync`` for a full snapshot, ``apply``
for one event) and hands it each query packet with the client's address and the time; the zone
returns the reply packet. It owns no socket, no clock and no randomness source of its own (the
random generator is passed in, so tests seed it).

Theory of operation. The zone keeps one ``Node`` per name that exists (see ``rules.py`` for the
names and what each answers). A node caches one ``Entry`` per query type: the answer records
already packed, twice in a row when they rotate, so that a rotated answer of ``m`` records
starting at record ``k`` is one slice of bytes. Records never point anywhere but into the
question, so their order can change freely. What differs per query is added around the slice:
the header (id, flags, counts), the client's question as sent, and the OPT record.

When an event changes a service, its nodes are rebuilt (dropping their cached entries) and the
service is marked changed at ``now``: for one TTL after that its answers carry ``changed_ttl``
(1s) so that caches let go of the old addresses quickly. The SOA (its serial is the registry
revision) is packed once per revision and appended to negative answers.

The reply cache. Most UDP queries repeat one another byte for byte except for the id: the same
name, type, flags and OPT record. ``answer_cached`` looks the packet minus its id up in a dict
of replies already built for it, one per rotation, and serves the next rotation with only the id
spliced in: no parsing, no packing. It holds only answers that depend on nothing but the packet
and the client's GSLB region (no client subnet, no weighted draw), each until its TTL changes
(``Cached.until``), and it is emptied by every change of the zone. Its size is capped; a
client that varies its questions (0x20 case randomisation) only misses and takes the normal
path.
"""

from __future__ import annotations

import ipaddress
import math
import random
from bisect import bisect_right
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from interknit.dns import wire
from interknit.dns.gslb import Gslb, GslbConfig, Location
from interknit.dns.rules import (
    GLOBAL_LABEL,
    NAMESERVER_LABEL,
    RESERVED_LABELS,
    ROTATED,
    RULES,
    SRV_ALL_LABEL,
    Builder,
    Kind,
)
from interknit.dns.wire import (
    AAAA,
    AXFR,
    BADVERS,
    CLASS_IN,
    FORMERR,
    HEADER,
    HINFO,
    IXFR,
    NOERROR,
    NOTIMP,
    NS,
    NXDOMAIN,
    OPCODE_MASK,
    OPT,
    QNAME_POINTER,
    REFUSED,
    SOA,
    SRV,
    TC,
    TXT,
    A,
    FormatError,
    Query,
)
from interknit.names import is_label
from interknit.registry.model import Event, Instance

ANSWERED_HEALTH = frozenset({"passing", "warning"})
SOA_REFRESH, SOA_RETRY, SOA_EXPIRE = 60, 10, 600
_HINFO_RDATA = b"\x07RFC8482\x00"


@dataclass(frozen=True)
class ZoneConfig:
    """``[dns]`` as the zone needs it (the listen address belongs to the server)."""

    zone: str = "ik.internal."
    ttl: float = 5.0
    service_ttls: Mapping[str, float] = field(default_factory=dict)
    changed_ttl: float = 1.0
    max_answers: int = 8
    nameserver_addresses: Sequence[str] = ("127.0.0.1",)
    hostmaster: str = "hostmaster"
    udp_payload: int = 1232  # what we advertise and the most we send over UDP (DNS flag day 2020)
    gslb: GslbConfig | None = None

    def __post_init__(self) -> None:
        wire.name_to_wire(self.zone)  # raises ValueError for a bad zone name
        if self.max_answers < 1:
            raise ValueError("max_answers must be at least 1")
        if not 512 <= self.udp_payload <= 65535:
            raise ValueError("udp_payload must be between 512 and 65535")
        for address in self.nameserver_addresses:
            ipaddress.ip_address(address)

    def ttl_of(self, service: str) -> float:
        return self.service_ttls.get(service, self.ttl)


class Reply:
    """A packed reply and what the metrics want to know about it."""

    __slots__ = ("qtype", "rcode", "service", "truncated", "udp_key", "wire")

    def __init__(
        self, wire: bytes, qtype: int, rcode: int, service: str | None, truncated: bool
    ) -> None:
        self.wire = wire
        self.qtype = qtype
        self.rcode = rcode
        self.service = service
        self.truncated = truncated
        # The metrics key of this reply over UDP, built once: cached replies are counted on
        # every hit.
        self.udp_key = (qtype if qtype < 256 else 256, rcode, "udp")


# One packed record: (answer record, additional records, how many additional records).
Packed = tuple[bytes, bytes, int]


class Entry:
    """One name's answer to one query type, packed; see the module docstring."""

    __slots__ = (
        "blob",
        "blob_low",
        "count",
        "cum",
        "cursor",
        "extra",
        "extra_counts",
        "extra_low",
        "extra_starts",
        "low_until",
        "rotating",
        "service",
        "starts",
        "take",
        "total",
    )

    def __init__(
        self,
        service: str | None,
        normal: list[Packed],
        low: list[Packed],
        weights: Sequence[int],
        take: int,
        low_until: float,
        rotate: bool,
    ) -> None:
        n = len(normal)
        reps = 2 if rotate and n > 1 else 1
        self.service = service
        self.rotating = reps == 2
        self.count = n
        self.take = min(n, take) if rotate else n
        self.cursor = 0
        self.low_until = low_until
        self.blob = b"".join(p[0] for p in normal) * reps
        self.blob_low = b"".join(p[0] for p in low) * reps
        self.extra = b"".join(p[1] for p in normal) * reps
        self.extra_low = b"".join(p[1] for p in low) * reps
        starts, extra_starts, extra_counts = [0], [0], [0]
        for packed in normal * reps:
            starts.append(starts[-1] + len(packed[0]))
            extra_starts.append(extra_starts[-1] + len(packed[1]))
            extra_counts.append(extra_counts[-1] + packed[2])
        self.starts = starts
        self.extra_starts = extra_starts
        self.extra_counts = extra_counts
        self.cum: list[int] | None = None
        self.total = 0
        if rotate and n > 1 and len(set(weights)) > 1 and sum(weights) > 0:
            cum, acc = [], 0
            for weight in weights:
                acc += weight
                cum.append(acc)
            self.cum = cum
            self.total = acc


class Cached:
    """Every rotation of one UDP reply, without its id; see "The reply cache" above."""

    __slots__ = ("entry", "replies", "tails", "until")

    def __init__(self, entry: Entry, until: float) -> None:
        self.entry = entry
        self.until = until  # the answer's TTL changes then (the lowered TTL after a change ends)
        rotations = entry.count if entry.rotating else 1
        self.replies: list[Reply | None] = [None] * rotations
        self.tails: list[bytes] = [b""] * rotations


# The query after its id; for a global name, with the client's region in front.
CacheKey = bytes | tuple[str | None, bytes]
CACHE_MAX_BYTES = 8 * 1024 * 1024
CACHE_MAX_ROTATIONS = 64  # a bigger answer set rotates through the normal path


class Node:
    """A name that exists in the zone, with its cached answers."""

    __slots__ = ("entries", "kind", "label", "regional", "service")

    def __init__(self, kind: Kind, service: str | None = None, label: str | None = None) -> None:
        self.kind = kind
        self.service = service
        self.label = label  # the tag (TAG, SRV_TAG) or the instance id (INSTANCE)
        self.entries: dict[int, Entry] = {}
        self.regional: dict[tuple[int, str | None], Entry] = {}


class _Service:
    __slots__ = ("changed_at", "fingerprint", "instances", "name", "names", "regions")

    def __init__(self, name: str) -> None:
        self.name = name
        self.instances: dict[str, Instance] = {}
        self.names: list[bytes] = []
        self.changed_at = -math.inf
        self.fingerprint: frozenset[tuple[object, ...]] = frozenset()
        self.regions: dict[str, int] = {}


def _fingerprint(instances: Iterable[Instance]) -> frozenset[tuple[object, ...]]:
    """Everything about a service that can change an answer; equal means nothing to do."""
    return frozenset(
        (
            i.id,
            i.address,
            i.port,
            i.weight,
            i.tags,
            i.spec.meta,
            i.region,
            i.health in ANSWERED_HEALTH,
        )
        for i in instances
    )


def _ip(address: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        return ipaddress.ip_address(address)
    except ValueError:
        return None


def _name_or_none(text: str) -> bytes | None:
    """Wire form of a name, or ``None`` when labels add up past 255 octets (a long zone)."""
    try:
        return wire.name_to_wire(text)
    except ValueError:
        return None


def _ttl(seconds: float) -> int:
    return max(0, min(0x7FFFFFFF, math.ceil(seconds)))


class Zone:
    def __init__(self, config: ZoneConfig | None = None, *, rng: random.Random | None = None):
        self.config = config or ZoneConfig()
        self._random = (rng or random.Random()).random
        self._zone_wire = wire.name_to_wire(self.config.zone)
        self._zone_len = len(self._zone_wire)
        self._gslb = Gslb(self.config.gslb) if self.config.gslb is not None else None
        self._services: dict[str, _Service] = {}
        # Events only note what changed; a service's names and answers are rebuilt once, when
        # the next query arrives. A burst of N registrations into one service then costs one
        # rebuild instead of N (each is O(size of the service)).
        self._members: dict[str, dict[str, Instance]] = {}
        self._dirty: dict[str, float] = {}
        self._names: dict[bytes, Node] = {}
        self._cache: dict[CacheKey, Cached] = {}  # the query after its id -> its replies
        self._cache_bytes = 0
        self._locations: dict[str, Location] = {}  # source address -> GSLB location
        self._empty: Counter[bytes] = Counter()  # empty non-terminals, counted by users
        self._empty_node = Node(Kind.EMPTY)
        self._opt = wire.opt_record(self.config.udp_payload)
        self._revision = 0
        self._soa_rr = b""
        self._soa_built = -1
        self._set_revision(0)
        self._add_static_names()

    # -- feeding the zone ---------------------------------------------------------------------

    @property
    def revision(self) -> int:
        return self._revision

    @property
    def services(self) -> list[str]:
        self.flush()
        return sorted(self._services)

    def sync(self, instances: Iterable[Instance], revision: int, now: float = -math.inf) -> None:
        """Replace everything with a full snapshot (start-up, or a resync after compaction).

        Services whose answers differ from what the zone had are marked changed at ``now``; the
        default (minus infinity) marks none, which suits the first load.
        """
        self._clear_cache()
        grouped: dict[str, list[Instance]] = {}
        for instance in instances:
            grouped.setdefault(instance.service, []).append(instance)
        self._dirty.clear()
        self._members = {name: {i.id: i for i in group} for name, group in grouped.items()}
        for name in list(self._services):
            if name not in grouped:
                self._drop_service(name)
        for name, members in grouped.items():
            self._set_service(name, members, now)
        self._set_revision(revision)

    def apply(self, event: Event, now: float = -math.inf) -> None:
        """One registry event; ``now`` is when it arrived, for the lowered TTL after a change."""
        self.apply_all((event,), now)

    def apply_all(self, events: Iterable[Event], now: float = -math.inf) -> None:
        """A commit's events, in order (``apply`` for each, for less)."""
        self._clear_cache()
        members_of = self._members
        dirty = self._dirty
        revision = self._revision
        for event in events:
            instance = event.instance
            members = members_of.setdefault(instance.service, {})
            if event.type == "delete":
                members.pop(instance.id, None)
                if not members:
                    del members_of[instance.service]
            else:
                members[instance.id] = instance
            dirty[instance.service] = now
            revision = max(revision, event.revision)
        if revision > self._revision:
            self._set_revision(revision)

    def flush(self) -> None:
        """Rebuild the services that events changed since the last query."""
        if not self._dirty:
            return
        dirty, self._dirty = self._dirty, {}
        for name, changed in dirty.items():
            members = self._members.get(name)
            if members:
                self._set_service(name, list(members.values()), changed)
            else:
                self._drop_service(name)

    def _set_revision(self, revision: int) -> None:
        # The SOA (its serial is the revision) is packed when a query needs it, not per event:
        # a burst of registrations would otherwise pack it thousands of times for nothing.
        self._revision = revision

    @property
    def _soa_tail(self) -> bytes:
        if self._soa_built != self._revision:
            config = self.config
            zone = config.zone
            rdata = wire.soa_rdata(
                wire.name_to_wire(f"{NAMESERVER_LABEL}.{zone}"),
                wire.name_to_wire(f"{config.hostmaster}.{zone}"),
                self._revision,
                SOA_REFRESH,
                SOA_RETRY,
                SOA_EXPIRE,
                _ttl(config.ttl),
            )
            # The owner (the apex) is a pointer into the question, added per reply.
            self._soa_rr = wire.rr(b"", SOA, _ttl(config.ttl), rdata)
            self._soa_built = self._revision
        return self._soa_rr

    def _set_service(self, name: str, members: list[Instance], now: float) -> None:
        fingerprint = _fingerprint(members)
        service = self._services.get(name)
        if service is not None and service.fingerprint == fingerprint:
            service.instances = {i.id: i for i in members}
            return
        if service is None:
            if not is_label(name) or name in RESERVED_LABELS:
                return  # DNS cannot name it; the registry still serves it over HTTP
            service = self._services[name] = _Service(name)
        service.changed_at = now
        service.instances = {i.id: i for i in sorted(members, key=lambda i: i.id)}
        service.fingerprint = fingerprint
        regions: Counter[str] = Counter()
        for instance in members:
            if instance.region is not None and instance.health in ANSWERED_HEALTH:
                regions[instance.region] += 1
        # The regions that may answer the service's global name, by healthy instances.
        gslb = self._gslb
        service.regions = gslb.candidates(name, regions) if gslb is not None else dict(regions)
        self._index(service)

    def _drop_service(self, name: str) -> None:
        service = self._services.pop(name, None)
        if service is not None:
            self._unindex(service)

    def _index(self, service: _Service) -> None:
        """(Re)create the nodes of one service; fresh nodes carry no cached answers."""
        self._unindex(service)
        zone = self.config.zone
        name = service.name
        nodes: dict[str, Node] = {}
        empties: list[str] = [f"{SRV_ALL_LABEL}.{zone}"]
        for instance in service.instances.values():
            for tag in instance.tags:
                label = tag.lower()
                if not is_label(label):
                    continue
                nodes.setdefault(f"{label}.{name}.{zone}", Node(Kind.TAG, name, label))
                if len(label) < 63 and len(name) < 63:
                    nodes[f"_{name}._{label}.{zone}"] = Node(Kind.SRV_TAG, name, label)
                    empties.append(f"_{label}.{zone}")
        for instance in service.instances.values():
            label = instance.id.lower()
            if is_label(label):
                nodes[f"{label}.{name}.{zone}"] = Node(Kind.INSTANCE, name, instance.id)
        nodes[f"{name}.{zone}"] = Node(Kind.SERVICE, name)
        if len(name) < 63:
            nodes[f"_{name}.{SRV_ALL_LABEL}.{zone}"] = Node(Kind.SRV, name)
        if self._gslb is not None:
            nodes[f"{name}.{GLOBAL_LABEL}.{zone}"] = Node(Kind.GLOBAL, name)
            empties.append(f"{GLOBAL_LABEL}.{zone}")
        keys = []
        for text, node in nodes.items():
            key = _name_or_none(text)
            if key is not None:
                self._names[key] = node
                keys.append(key)
        for text in set(empties):
            key = _name_or_none(text)
            if key is not None:
                self._empty[key] += 1
                keys.append(key)
        service.names = keys

    def _unindex(self, service: _Service) -> None:
        for key in service.names:
            node = self._names.get(key)
            if node is not None and node.service == service.name:
                del self._names[key]
            elif key in self._empty:
                self._empty[key] -= 1
                if self._empty[key] <= 0:
                    del self._empty[key]
        service.names = []

    def _add_static_names(self) -> None:
        zone = self.config.zone
        self._names[self._zone_wire] = Node(Kind.APEX)
        self._names[wire.name_to_wire(f"{NAMESERVER_LABEL}.{zone}")] = Node(Kind.NAMESERVER)

    # -- answering ----------------------------------------------------------------------------

    def answer_cached(self, data: bytes, client: str, now: float) -> tuple[bytes, Reply] | None:
        """The UDP reply to a packet asked before but for its id, or ``None``: call ``answer``.

        Returns the packet to send and a ``Reply`` that describes it for the metrics (its
        ``wire`` is the first asker's). Never for TCP or a rate-limited (slipped) client.
        """
        if self._dirty:
            self.flush()
        key = data[2:]
        cached = self._cache.get(key)
        if cached is None:
            # A global name is cached per client region (see ``_regional``).
            location = self._locations.get(client)
            if location is None:
                return None
            cached = self._cache.get((location.region, key))
            if cached is None:
                return None
        if now >= cached.until:
            return None
        entry = cached.entry
        if entry.rotating:
            k = entry.cursor
            reply = cached.replies[k]
            if reply is None:
                return None  # this rotation is not built yet: ``answer`` builds it
            entry.cursor = k + 1 if k + 1 < entry.count else 0
        else:
            k = 0
            reply = cached.replies[0]
            if reply is None:
                return None
        return data[:2] + cached.tails[k], reply

    def _clear_cache(self) -> None:
        self._cache.clear()
        self._cache_bytes = 0

    def _remember(self, key: CacheKey, entry: Entry, k: int, reply: Reply, now: float) -> None:
        cached = self._cache.get(key)
        if cached is None or now >= cached.until:
            if self._cache_bytes > CACHE_MAX_BYTES:
                self._clear_cache()
            until = entry.low_until if now < entry.low_until else math.inf
            cached = self._cache[key] = Cached(entry, until)
            self._cache_bytes += len(reply.wire) + 100
        if cached.entry is entry and cached.replies[k] is None:
            cached.replies[k] = reply
            cached.tails[k] = reply.wire[2:]
            self._cache_bytes += len(reply.wire)

    def answer(
        self, data: bytes, client: str, now: float, *, tcp: bool = False, slip: bool = False
    ) -> Reply | None:
        """The reply to one query packet, or ``None`` when the packet deserves no reply.

        ``client`` is the source address (GSLB without ECS uses it). Over UDP a reply that does
        not fit the client's buffer is sent empty with TC set; ``slip`` (from RRL) sends that
        form whatever the size.
        """
        if self._dirty:
            self.flush()
        header = wire.header_of(data)
        if header is not None and header[1] & OPCODE_MASK:
            # Not a QUERY (an UPDATE, a NOTIFY...): refused as not implemented (RFC 1035
            # 4.1.1) before it is read, since an UPDATE's sections are not a query's.
            return Reply(wire.error_reply(header[0], header[1], NOTIMP), 0, NOTIMP, None, False)
        try:
            query = wire.parse_query(data)
            common = query is not None
            if query is None:
                query = wire.parse_unusual(data)
        except FormatError:
            header = wire.header_of(data)
            if header is None:
                return None
            return Reply(wire.error_reply(header[0], header[1], FORMERR), 0, FORMERR, None, False)

        qtype = query.qtype
        if query.edns and query.edns_version > 0:
            opt = wire.opt_record(self.config.udp_payload, BADVERS >> 4)
            flags = wire.response_flags(query.flags, False, BADVERS)
            packet = HEADER.pack(query.id, flags, 1, 0, 0, 1) + query.question + opt
            return Reply(packet, qtype, BADVERS, None, False)
        if query.qclass != CLASS_IN or qtype in (AXFR, IXFR):
            return self._error(query, REFUSED)
        if qtype == OPT:
            return self._error(query, FORMERR)

        name = query.name
        node = self._names.get(name)
        if node is None:
            node = self._empty_node if name in self._empty else None
            if node is None:
                if not self._in_zone(name):
                    return self._error(query, REFUSED)
                return self._negative(query, NXDOMAIN, tcp, slip)

        rule = RULES.get((node.kind, qtype))
        if rule is None:
            return self._negative(query, NOERROR, tcp, slip)
        if rule == "soa":
            return self._soa(query, tcp, slip)
        key: CacheKey | None = None
        if rule == "regional":
            entry, scope, fixed = self._regional(node, query, client)
            if fixed is not None:
                key = (fixed.region, data[2:])
        else:
            found = node.entries.get(qtype)
            if found is None:
                found = node.entries[qtype] = self._build(node, rule, qtype, name)
            entry, scope, key = found, 0, data[2:]
        k = self._pick(entry)
        reply = self._assemble(query, entry, k, now, tcp, slip, scope)
        if (
            key is not None
            and not tcp
            and not slip
            and common
            and query.ecs is None
            and entry.cum is None
            and entry.count <= CACHE_MAX_ROTATIONS
        ):
            self._remember(key, entry, k, reply, now)
        return reply

    def _pick(self, entry: Entry) -> int:
        """Where this answer's records start: a weighted draw, the next rotation, or 0."""
        count = entry.count
        if entry.cum is not None:
            k = bisect_right(entry.cum, self._random() * entry.total)
            return k if k < count else count - 1
        if entry.rotating:
            k = entry.cursor
            entry.cursor = k + 1 if k + 1 < count else 0
            return k
        return 0

    def _assemble(
        self, query: Query, entry: Entry, k: int, now: float, tcp: bool, slip: bool, scope: int
    ) -> Reply:
        if entry.count == 0:
            return self._negative(query, NOERROR, tcp, slip, scope)
        m = k + entry.take
        starts = entry.starts
        low = now < entry.low_until
        answers = (entry.blob_low if low else entry.blob)[starts[k] : starts[m]]
        extra = entry.extra_starts
        additional = (entry.extra_low if low else entry.extra)[extra[k] : extra[m]]
        ar = entry.extra_counts[m] - entry.extra_counts[k]
        opt = self._opt_for(query, scope)
        if opt:
            ar += 1
        flags = wire.response_flags(query.flags, True, NOERROR)
        packet = b"".join(
            (
                HEADER.pack(query.id, flags, 1, entry.take, 0, ar),
                query.question,
                answers,
                additional,
                opt,
            )
        )
        return self._fit(query, packet, flags, opt, tcp, slip, NOERROR, entry.service)

    def _negative(self, query: Query, rcode: int, tcp: bool, slip: bool, scope: int = 0) -> Reply:
        """NXDOMAIN or NODATA, with the SOA in the authority section (RFC 2308)."""
        soa = wire.pointer(12 + len(query.name) - self._zone_len) + self._soa_tail
        opt = self._opt_for(query, scope)
        flags = wire.response_flags(query.flags, True, rcode)
        header = HEADER.pack(query.id, flags, 1, 0, 1, 1 if opt else 0)
        packet = b"".join((header, query.question, soa, opt))
        return self._fit(query, packet, flags, opt, tcp, slip, rcode, None)

    def _soa(self, query: Query, tcp: bool, slip: bool) -> Reply:
        opt = self._opt_for(query, 0)
        flags = wire.response_flags(query.flags, True, NOERROR)
        header = HEADER.pack(query.id, flags, 1, 1, 0, 1 if opt else 0)
        packet = b"".join((header, query.question, QNAME_POINTER, self._soa_tail, opt))
        return self._fit(query, packet, flags, opt, tcp, slip, NOERROR, None)

    def _error(self, query: Query, rcode: int) -> Reply:
        opt = self._opt if query.edns else b""
        flags = wire.response_flags(query.flags, False, rcode)
        header = HEADER.pack(query.id, flags, 1, 0, 0, 1 if opt else 0)
        return Reply(header + query.question + opt, query.qtype, rcode, None, False)

    def _fit(
        self,
        query: Query,
        packet: bytes,
        flags: int,
        opt: bytes,
        tcp: bool,
        slip: bool,
        rcode: int,
        service: str | None,
    ) -> Reply:
        """Send it whole, or (UDP, too big for the client) empty with TC: never cut silently."""
        if not tcp:
            if query.edns:
                limit = min(max(query.payload, 512), self.config.udp_payload)
            else:
                limit = 512
            if slip or len(packet) > limit:
                header = HEADER.pack(query.id, flags | TC, 1, 0, 0, 1 if opt else 0)
                return Reply(header + query.question + opt, query.qtype, rcode, service, True)
        return Reply(packet, query.qtype, rcode, service, False)

    def _opt_for(self, query: Query, scope: int) -> bytes:
        if not query.edns:
            return b""
        if query.ecs is None:
            return self._opt
        option = wire.ecs_option(query.ecs, scope)
        return wire.opt_record(self.config.udp_payload, 0, option)

    def _in_zone(self, name: bytes) -> bool:
        zone = self._zone_wire
        if not name.endswith(zone):
            return False
        offset = len(name) - len(zone)
        pos = 0
        while pos < offset:
            pos += name[pos] + 1
        return pos == offset

    def _regional(
        self, node: Node, query: Query, client: str
    ) -> tuple[Entry, int, Location | None]:
        gslb = self._gslb
        assert gslb is not None and node.service is not None
        service = self._services[node.service]
        ecs = query.ecs
        if ecs is not None:
            location = gslb.locate(ecs.address if ecs.source > 0 else None)
        else:
            found = self._locations.get(client)
            if found is None:
                if len(self._locations) >= 65536:
                    self._locations.clear()  # a spray of sources: start over, do not grow
                found = self._locations[client] = gslb.locate(_ip(client))
            location = found
        region, drawn = gslb.pick(location.region, service.regions, self._random())
        scope = 0
        if gslb.client_dependent and ecs is not None and ecs.source > 0:
            # A matched CIDR says exactly which clients share this answer; an unmatched
            # client only knows its own subnet.
            scope = location.prefix if location.region is not None else ecs.source
        key = (query.qtype, region)
        entry = node.regional.get(key)
        if entry is None:
            entry = node.regional[key] = self._build(
                node, "regional", query.qtype, query.name, region
            )
        # Without ECS and a draw, every client of this region gets this entry: cacheable.
        fixed = location if ecs is None and not drawn else None
        return entry, scope, fixed

    # -- building entries ---------------------------------------------------------------------

    def _build(
        self, node: Node, rule: Builder, qtype: int, qname: bytes, region: str | None = None
    ) -> Entry:
        config = self.config
        service = self._services.get(node.service) if node.service is not None else None
        ttl = config.ttl_of(node.service) if node.service is not None else config.ttl
        low_ttl = min(ttl, config.changed_ttl)
        low_until = service.changed_at + ttl if service is not None else -math.inf
        make: Callable[[int], list[Packed]]
        weights: list[int] = []
        if rule == "any":

            def make(t: int) -> list[Packed]:
                return [(wire.rr(QNAME_POINTER, HINFO, t, _HINFO_RDATA), b"", 0)]

        elif rule == "ns":
            target = wire.name_to_wire(f"{NAMESERVER_LABEL}.{config.zone}")
            glue = self._self_records(wire.compress(target, qname), None)

            def make(t: int) -> list[Packed]:
                rdata = wire.compress(target, qname)
                extra = b"".join(wire.rr(o, rt, t, rd) for o, rt, rd in glue)
                return [(wire.rr(QNAME_POINTER, NS, t, rdata), extra, len(glue))]

        elif rule == "self":
            own = self._self_records(QNAME_POINTER, qtype)

            def make(t: int) -> list[Packed]:
                return [(wire.rr(o, rt, t, rd), b"", 0) for o, rt, rd in own]

        elif rule == "meta":
            assert service is not None and node.label is not None
            instance = service.instances.get(node.label)
            meta = [] if instance is None else [f"{k}={v}".encode() for k, v in instance.spec.meta]

            def make(t: int) -> list[Packed]:
                return (
                    [(wire.rr(QNAME_POINTER, TXT, t, wire.txt_rdata(meta)), b"", 0)] if meta else []
                )

        elif rule == "srv":
            assert service is not None
            chosen, targets = [], []
            for instance in self._healthy(service, node, None):
                found = self._srv_target(instance)
                if found is not None:
                    chosen.append(instance)
                    targets.append(found)
            weights = [i.weight for i in chosen]

            def make(t: int) -> list[Packed]:
                out: list[Packed] = []
                for instance, (host, ip) in zip(chosen, targets, strict=True):
                    weight = max(0, min(0xFFFF, instance.weight))
                    rdata = wire.srv_rdata(1, weight, instance.port, host)
                    extra, n = b"", 0
                    if ip is not None:
                        rtype = A if ip.version == 4 else AAAA
                        extra = wire.rr(wire.compress(host, qname), rtype, t, ip.packed)
                        n = 1
                    out.append((wire.rr(QNAME_POINTER, SRV, t, rdata), extra, n))
                return out

        else:  # "addresses" and "regional"
            assert service is not None
            version = 4 if qtype == A else 6
            ips = []
            gateways = None
            if rule == "regional" and region is not None and self._gslb is not None:
                gateways = self._gslb.gateways(service.name, region)
            if gateways is not None:
                # The region's load balancers, all alike: plain round robin.
                ips = [ip for ip in map(_ip, gateways) if ip is not None and ip.version == version]
            else:
                chosen = []
                for instance in self._healthy(
                    service, node, region if rule == "regional" else None
                ):
                    ip = _ip(instance.address)
                    if ip is not None and ip.version == version:
                        chosen.append(instance)
                        ips.append(ip)
                weights = [i.weight for i in chosen]

            def make(t: int) -> list[Packed]:
                return [(wire.rr(QNAME_POINTER, qtype, t, ip.packed), b"", 0) for ip in ips]

        return Entry(
            node.service,
            make(_ttl(ttl)),
            make(_ttl(low_ttl)),
            weights,
            config.max_answers,
            low_until,
            rule in ROTATED,
        )

    def _healthy(self, service: _Service, node: Node, region: str | None) -> list[Instance]:
        kind, label = node.kind, node.label
        out = []
        for instance in service.instances.values():
            if instance.health not in ANSWERED_HEALTH:
                continue
            if kind is Kind.INSTANCE and instance.id != label:
                continue
            if kind in (Kind.TAG, Kind.SRV_TAG) and not any(
                t.lower() == label for t in instance.tags
            ):
                continue
            if kind is Kind.GLOBAL and (region is None or instance.region != region):
                continue
            out.append(instance)
        return out

    def _srv_target(
        self, instance: Instance
    ) -> tuple[bytes, ipaddress.IPv4Address | ipaddress.IPv6Address | None] | None:
        ip = _ip(instance.address)
        label = instance.id.lower()
        if is_label(label):
            target = wire.name_to_wire(f"{label}.{instance.service}.{self.config.zone}")
            return target, ip
        if ip is None:
            return wire.name_to_wire(instance.address), None  # a host name names itself
        return None  # an id DNS cannot spell, at an address with no name: no SRV record

    def _self_records(self, owner: bytes, qtype: int | None) -> list[tuple[bytes, int, bytes]]:
        out = []
        for address in self.config.nameserver_addresses:
            ip = ipaddress.ip_address(address)
            rtype = A if ip.version == 4 else AAAA
            if qtype is None or qtype == rtype:
                out.append((owner, rtype, ip.packed))
        return out


__all__ = ["Cached", "Entry", "Node", "Reply", "Zone", "ZoneConfig"]
