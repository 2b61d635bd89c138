"""Consul's service registration (``PUT /v1/agent/service/register``) as an interknit one.

Pure: the body's bytes in, a ``Registration`` or a ``RegistryError`` (400, naming the field in
Consul's words: ``Check.HTTP``, ``Checks[1].TTL``, ``Meta.version``) out. Keys are matched as
Consul's agent matches them: case-insensitively, and snake_case too (``service_id``,
``deregister_critical_service_after``), since Python clients send ``{"name", "id", "checks"}``
and Go clients ``{"Name", "ID", "Checks"}``. Meta keys are the client's data and are kept as
they are.

What an interknit instance cannot hold is refused, with the reason, rather than dropped: a
check interknit cannot run (script, gRPC, Docker, alias, UDP, headers, methods other than GET,
https), a check aimed anywhere but the instance's own address and port, Connect sidecars, a
port of 0. Two things are simplified, and docs/compat.md says so: an instance keeps one check
(a TTL check if there is one, which its client drives, else the first), and a check's
``Status`` only sets the starting state of a TTL check.
"""

from __future__ import annotations

import ipaddress
import json
import re
from dataclasses import dataclass
from typing import Any, NoReturn
from urllib.parse import urlsplit

from interknit.compat.godur import parse_go_duration
from interknit.compat.names import (
    META_CHECK_ID,
    META_CHECK_NAME,
    META_ID,
    META_SERVICE,
    META_WARNING_WEIGHT,
    Untranslatable,
    instance_label,
    service_label,
)
from interknit.durations import format_duration
from interknit.names import parse_hostport
from interknit.registry.model import Check, CheckStatus, InstanceSpec, is_hostname, is_label
from interknit.registry.schema import instance_spec
from interknit.registry.state import RegistryError

MAX_BODY = 64 * 1024
MAX_TAGS = 256
MAX_TAG = 1024
MAX_META = 64
MAX_CHECKS = 16
MIN_PERIOD = 0.01  # interknit's floor for intervals, timeouts and TTLs
DEFAULT_INTERVAL = 10.0
DEFAULT_TIMEOUT = 10.0

_META_KEY = re.compile(r"[A-Za-z0-9_-]{1,128}")
_PATH = re.compile(r"/[\x21-\x7e]{0,1023}")
_LOOPBACK = frozenset({"localhost", "127.0.0.1", "::1"})
CHECK_STATUSES = ("passing", "warning", "critical")

# Normalised key (lowercase, no '_' or '-') -> the field's name in Consul's API.
SERVICE_FIELDS = {
    k.lower(): k
    for k in (
        "ID",
        "Name",
        "Tags",
        "Port",
        "Address",
        "Meta",
        "Weights",
        "Check",
        "Checks",
        "EnableTagOverride",
        "Kind",
        "TaggedAddresses",
        "Namespace",
        "Partition",
        "Connect",
        "Proxy",
        "SocketPath",
        "Locality",
    )
}
CHECK_FIELDS = {
    k.lower(): k
    for k in (
        "CheckID",
        "Name",
        "Notes",
        "Status",
        "TTL",
        "HTTP",
        "TCP",
        "Interval",
        "Timeout",
        "DeregisterCriticalServiceAfter",
        "Method",
        "Header",
        "Body",
        "TLSServerName",
        "TLSSkipVerify",
        "GRPC",
        "GRPCUseTLS",
        "ScriptArgs",
        "Script",
        "DockerContainerID",
        "Shell",
        "H2PING",
        "H2PingUseTLS",
        "AliasNode",
        "AliasService",
        "UDP",
        "OSService",
        "SuccessBeforePassing",
        "FailuresBeforeWarning",
        "FailuresBeforeCritical",
        "OutputMaxSize",
        "ServiceID",
        "Type",
    )
}
CHECK_FIELDS["id"] = "CheckID"  # a check definition's "id", as in Consul's config files
CHECK_FIELDS["args"] = "ScriptArgs"
WEIGHT_FIELDS = {"passing": "Passing", "warning": "Warning"}
LOCALITY_FIELDS = {"region": "Region", "zone": "Zone"}

# Check kinds interknit does not run; present with a non-empty value, they are refused.
UNSUPPORTED_CHECK = (
    "ScriptArgs",
    "Script",
    "DockerContainerID",
    "Shell",
    "GRPC",
    "H2PING",
    "AliasNode",
    "AliasService",
    "UDP",
    "OSService",
    "Header",
    "Body",
    "TLSServerName",
)
_UNSUPPORTED_WHY = "is not supported: interknit runs plain HTTP GET, TCP and TTL checks"


@dataclass(frozen=True, slots=True)
class Registration:
    consul_id: str
    consul_name: str
    service: str  # the label the service is kept under
    instance_id: str  # the label the instance is kept under
    spec: InstanceSpec
    # The status to put a TTL check in right after registering (Consul starts TTL checks
    # critical; interknit's own API starts them passing). None: leave it as registered.
    initial: CheckStatus | None
    dropped_checks: tuple[str, ...]  # the fields of checks not kept (one check per instance)


def fail(field: str, message: str) -> NoReturn:
    raise RegistryError(f"{field}: {message}", [{"field": field, "message": message}])


def normalise_key(key: str) -> str:
    return key.replace("_", "").replace("-", "").lower()


def fields(data: object, where: str, known: dict[str, str]) -> dict[str, Any]:
    """``data``'s keys as Consul spells them; unknown or repeated keys are refused."""
    if not isinstance(data, dict):
        fail(where or "body", "must be a JSON object")
    prefix = f"{where}." if where else ""
    out: dict[str, Any] = {}
    for key, value in data.items():
        name = known.get(normalise_key(key))
        if name is None:
            fail(f"{prefix}{key[:64]}", "is not a known field")
        if name in out:
            fail(f"{prefix}{name}", "is given twice (keys are case-insensitive)")
        out[name] = value
    return out


def _string(value: object, field: str, max_len: int) -> str:
    if not isinstance(value, str):
        fail(field, "must be a string")
    if len(value) > max_len:
        fail(field, f"is longer than {max_len} characters")
    return value


def _optional_string(value: object, field: str, max_len: int) -> str:
    return "" if value is None else _string(value, field, max_len)


def _int(value: object, field: str, low: int, high: int) -> int:
    # bool is an int to Python, not to JSON's clients.
    if not isinstance(value, int) or isinstance(value, bool):
        fail(field, "must be an integer")
    if not low <= value <= high:
        fail(field, f"must be between {low} and {high}")
    return value


def _empty(value: object) -> bool:
    return value is None or value in ("", 0, False, [], {})


def _duration(value: object, field: str, low: float = MIN_PERIOD) -> float | None:
    if value is None or value == "":
        return None
    if not isinstance(value, str):
        fail(field, "must be a duration string such as '10s' or '1m30s'")
    try:
        seconds = parse_go_duration(value)
    except ValueError as exc:
        fail(field, str(exc))
    if seconds < low:
        fail(field, f"must be at least {low * 1000:g}ms")
    return seconds


def _address(value: object, field: str, default: str) -> str:
    text = _optional_string(value, field, 253)
    if not text:
        return default
    try:
        return str(ipaddress.ip_address(text))
    except ValueError:
        pass
    if not is_hostname(text):
        fail(field, "must be an IP address or a host name")
    return text


def _same_place(host: str, port: int, address: str, inst_port: int) -> bool:
    if port != inst_port:
        return False
    if host.lower() == address.lower():
        return True
    try:
        if ipaddress.ip_address(host) == ipaddress.ip_address(address):
            return True
    except ValueError:
        pass
    return host.lower() in _LOOPBACK and address.lower() in _LOOPBACK


def _elsewhere(field: str, target: str, address: str, port: int) -> NoReturn:
    fail(
        field,
        f"checks {target}, but interknit checks an instance at its own address and port "
        f"({address}:{port}); register the instance there or use a TTL check",
    )


def _http_path(url: str, field: str, address: str, port: int) -> str:
    try:
        parts = urlsplit(url)
        target_port = parts.port
    except ValueError:
        fail(field, "must be a URL such as http://10.0.0.5:8080/health")
    if parts.scheme != "http":
        fail(field, "must be an http:// URL: interknit's HTTP checks are plain HTTP")
    host = parts.hostname or ""
    target_port = 80 if target_port is None else target_port
    if not _same_place(host, target_port, address, port):
        _elsewhere(field, f"{host}:{target_port}", address, port)
    path = parts.path or "/"
    if parts.query:
        path += "?" + parts.query
    if not _PATH.fullmatch(path):
        fail(field, "its path must be printable ASCII, at most 1024 bytes")
    return path


def _tcp_target(value: str, field: str, address: str, port: int) -> None:
    try:
        host, target_port = parse_hostport(value)
    except ValueError:
        fail(field, "must be host:port, such as 10.0.0.5:6379")
    if not _same_place(host, target_port, address, port):
        _elsewhere(field, value, address, port)


@dataclass(frozen=True, slots=True)
class _ParsedCheck:
    field: str
    check: Check
    status: CheckStatus | None
    check_id: str
    name: str


def parse_check(
    data: object, field: str, address: str, port: int, min_interval: float = MIN_PERIOD
) -> _ParsedCheck:
    body = fields(data, field, CHECK_FIELDS)
    for name in UNSUPPORTED_CHECK:
        if not _empty(body.get(name)):
            fail(f"{field}.{name}", _UNSUPPORTED_WHY)
    method = _optional_string(body.get("Method"), f"{field}.Method", 16)
    if method not in ("", "GET"):
        fail(f"{field}.Method", "must be GET: interknit's HTTP checks send GET")
    status_text = _optional_string(body.get("Status"), f"{field}.Status", 16)
    if status_text and status_text not in CHECK_STATUSES:
        fail(f"{field}.Status", "must be passing, warning or critical")
    status: CheckStatus | None = status_text or None  # type: ignore[assignment]
    check_id = _optional_string(body.get("CheckID"), f"{field}.CheckID", 256)
    name = _optional_string(body.get("Name"), f"{field}.Name", 256)
    for key in ("Notes", "ServiceID", "Type"):
        _optional_string(body.get(key), f"{field}.{key}", 4096)
    for key in ("TLSSkipVerify", "GRPCUseTLS", "H2PingUseTLS"):
        if body.get(key) is not None and not isinstance(body[key], bool):
            fail(f"{field}.{key}", "must be true or false")
    for key in ("FailuresBeforeWarning", "OutputMaxSize"):
        if body.get(key) is not None:
            _int(body[key], f"{field}.{key}", 0, 1 << 31)
    after = _duration(
        body.get("DeregisterCriticalServiceAfter"), f"{field}.DeregisterCriticalServiceAfter"
    )
    ttl = _duration(body.get("TTL"), f"{field}.TTL")
    http = _optional_string(body.get("HTTP"), f"{field}.HTTP", 2048)
    tcp = _optional_string(body.get("TCP"), f"{field}.TCP", 300)
    kinds = [k for k, v in (("TTL", ttl), ("HTTP", http), ("TCP", tcp)) if v]
    if len(kinds) != 1:
        fail(field, "needs exactly one of TTL, HTTP or TCP")
    if ttl is not None:
        check = Check(ttl=ttl, deregister_after=after)
        return _ParsedCheck(field, check, status, check_id, name)
    interval = _duration(body.get("Interval"), f"{field}.Interval") or DEFAULT_INTERVAL
    if interval < min_interval:
        fail(
            f"{field}.Interval",
            f"must be at least {format_duration(min_interval)} (this node's health.min_interval)",
        )
    timeout = _duration(body.get("Timeout"), f"{field}.Timeout") or min(DEFAULT_TIMEOUT, interval)
    rise = body.get("SuccessBeforePassing")
    fall = body.get("FailuresBeforeCritical")
    rise = 1 if rise is None or rise == 0 else _int(rise, f"{field}.SuccessBeforePassing", 1, 100)
    fall = 1 if fall is None or fall == 0 else _int(fall, f"{field}.FailuresBeforeCritical", 1, 100)
    http_path = None
    if http:
        http_path = _http_path(http, f"{field}.HTTP", address, port)
    else:
        _tcp_target(tcp, f"{field}.TCP", address, port)
    check = Check(
        http=http_path,
        tcp=http_path is None,
        interval=interval,
        timeout=timeout,
        rise=rise,
        fall=fall,
        deregister_after=after,
    )
    # An active check's first result decides its status, as interknit's health component
    # runs it; a starting Status is for TTL checks only.
    return _ParsedCheck(field, check, None, check_id, name)


def _tags(value: object) -> list[str]:
    if value is None:
        return []
    if not isinstance(value, list):
        fail("Tags", "must be a list of strings")
    if len(value) > MAX_TAGS:
        fail("Tags", f"has more than {MAX_TAGS} tags")
    return [_string(tag, f"Tags[{i}]", MAX_TAG) for i, tag in enumerate(value)]


def _meta(value: object) -> dict[str, str]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        fail("Meta", "must be an object of strings")
    if len(value) > MAX_META:
        fail("Meta", f"has more than {MAX_META} keys")
    out: dict[str, str] = {}
    for key, item in value.items():
        if not _META_KEY.fullmatch(key):
            fail(f"Meta.{key[:64]}", "keys are 1-128 of letters, digits, '_' and '-'")
        out[key] = _string(item, f"Meta.{key}", 512)
    return out


def _label_of(value: object, field: str) -> str | None:
    text = _optional_string(value, field, 63)
    if not text:
        return None
    if not is_label(text.lower()):
        fail(field, "must be a DNS label: letters, digits and '-'")
    return text.lower()


def _refuse_present(body: dict[str, Any], name: str, why: str) -> None:
    if not _empty(body.get(name)):
        fail(name, why)


def load(raw: bytes) -> object:
    if len(raw) > MAX_BODY:
        fail("body", "is larger than 64 KiB")
    if not raw.strip():
        fail("body", "a JSON object is required")
    try:
        return json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        fail("body", f"malformed JSON ({str(exc)[:80]})")
    except RecursionError:
        fail("body", "is nested too deeply")


def parse_registration(
    raw: bytes, node_address: str, min_interval: float = MIN_PERIOD
) -> Registration:
    """A Consul registration body as an interknit registration; ``node_address`` is where an
    instance without an ``Address`` is, as Consul uses its agent's address; an active check
    may not run more often than ``min_interval`` (the node's ``health.min_interval``)."""
    body = fields(load(raw), "", SERVICE_FIELDS)
    consul_name = _string(body.get("Name"), "Name", 128) if "Name" in body else ""
    if not consul_name:
        fail("Name", "is required")
    try:
        service = service_label(consul_name)
    except Untranslatable as exc:
        fail("Name", str(exc))
    consul_id = _optional_string(body.get("ID"), "ID", 256) or consul_name
    try:
        instance_id = instance_label(consul_id)
    except Untranslatable as exc:
        fail("ID", str(exc))
    kind = _optional_string(body.get("Kind"), "Kind", 64)
    if kind not in ("", "typical"):
        fail("Kind", "is not supported: only typical services (no Kind) are")
    _refuse_present(body, "Connect", "is not supported: interknit has no Consul Connect")
    _refuse_present(body, "Proxy", "is not supported: interknit has no Consul Connect")
    _refuse_present(body, "SocketPath", "is not supported: instances have an address and port")
    for name in ("Namespace", "Partition"):
        _optional_string(body.get(name), name, 64)  # accepted and ignored
    if body.get("EnableTagOverride") is not None and not isinstance(
        body["EnableTagOverride"], bool
    ):
        fail("EnableTagOverride", "must be true or false")
    if body.get("TaggedAddresses") is not None and not isinstance(body["TaggedAddresses"], dict):
        fail("TaggedAddresses", "must be an object")
    if body.get("Port") in (None, 0):
        fail("Port", "is required: an interknit instance has a port (1-65535)")
    port = _int(body["Port"], "Port", 1, 65535)
    address = _address(body.get("Address"), "Address", node_address)
    tags = _tags(body.get("Tags"))
    meta = _meta(body.get("Meta"))

    weight, warning = 1, 1
    if body.get("Weights") is not None:
        weights = fields(body["Weights"], "Weights", WEIGHT_FIELDS)
        if weights.get("Passing") not in (None, 0):
            weight = _int(weights["Passing"], "Weights.Passing", 1, 1000)
        if weights.get("Warning") is not None:
            warning = _int(weights["Warning"], "Weights.Warning", 0, 1000)
    zone = region = None
    if body.get("Locality") is not None:
        locality = fields(body["Locality"], "Locality", LOCALITY_FIELDS)
        region = _label_of(locality.get("Region"), "Locality.Region")
        zone = _label_of(locality.get("Zone"), "Locality.Zone")

    raw_checks: list[tuple[str, object]] = []
    if body.get("Check") is not None:
        raw_checks.append(("Check", body["Check"]))
    if body.get("Checks") is not None:
        if not isinstance(body["Checks"], list):
            fail("Checks", "must be a list of checks")
        if len(body["Checks"]) > MAX_CHECKS:
            fail("Checks", f"has more than {MAX_CHECKS} checks")
        raw_checks += [(f"Checks[{i}]", c) for i, c in enumerate(body["Checks"]) if c is not None]
    parsed = [parse_check(data, field, address, port, min_interval) for field, data in raw_checks]
    chosen = next((c for c in parsed if c.check.ttl is not None), parsed[0] if parsed else None)

    kept = dict(meta)
    if consul_id != instance_id:
        kept[META_ID] = consul_id
    if consul_name != service:
        kept[META_SERVICE] = consul_name
    if warning != 1:
        kept[META_WARNING_WEIGHT] = str(warning)
    initial: CheckStatus | None = None
    if chosen is not None:
        if chosen.check_id and chosen.check_id != f"service:{consul_id}":
            kept[META_CHECK_ID] = chosen.check_id
        if chosen.name:
            kept[META_CHECK_NAME] = chosen.name
        if chosen.check.ttl is not None:
            initial = None if chosen.status == "passing" else (chosen.status or "critical")
    spec = instance_spec(
        address,
        port,
        zone,
        region,
        weight,
        list(tags),
        kept,
        None if chosen is None else chosen.check,
    )
    dropped = tuple(c.field for c in parsed if c is not chosen)
    return Registration(consul_id, consul_name, service, instance_id, spec, initial, dropped)
