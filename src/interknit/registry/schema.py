"""Validation of what callers send the registry: API bodies, path names, query parameters.

Each rejection names the field it is about, in the words of the API (``check.interval``,
``tags[2]``), so an operator can fix the request without reading the source.
"""

from __future__ import annotations

import functools
import ipaddress
import json
import re
from typing import Annotated, Any

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    model_validator,
)

from interknit.durations import format_duration, parse_duration
from interknit.names import is_hostname, is_label
from interknit.registry.model import Check, InstanceSpec
from interknit.registry.state import RegistryError

MAX_BODY = 64 * 1024
# A check's interval, timeout and TTL: shorter would be a busy loop, not a check.
MIN_CHECK_DURATION = 0.01
LABEL_HINT = "must be a DNS label: lowercase letters, digits and '-', 1 to 63 characters"
_META_KEY = re.compile(r"[A-Za-z0-9_.-]{1,128}")
_PATH = re.compile(r"/[\x21-\x7e]{0,1023}")
_OCTET = r"(?:25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])"
_IPV4 = re.compile(rf"{_OCTET}(?:\.{_OCTET}){{3}}")


def _label(value: str) -> str:
    if not is_label(value):
        raise ValueError(LABEL_HINT)
    return value


def _address(value: str) -> str:
    if _IPV4.fullmatch(value):
        return value  # the usual case, without building an address object
    try:
        ipaddress.ip_address(value)
        return value
    except ValueError:
        pass
    if not is_hostname(value):
        host, sep, port = value.rpartition(":")
        if sep and port.isdigit() and ":" not in host:
            raise ValueError(
                f"must be an IP address or a host name without a port: {port} goes in 'port'"
            )
        raise ValueError("must be an IP address or a host name")
    return value


def _duration(value: str) -> str:
    parse_duration(value)
    return value


def _check_duration(value: str) -> str:
    if parse_duration(value) < MIN_CHECK_DURATION:
        raise ValueError("must be at least 10ms")
    return value


def _http_path(value: str) -> str:
    if not _PATH.fullmatch(value):
        raise ValueError("must be a path starting with '/', printable ASCII, at most 1024 bytes")
    return value


def _meta(value: dict[str, str]) -> dict[str, str]:
    for key, item in value.items():
        if not _META_KEY.fullmatch(key):
            raise ValueError(f"key {key[:40]!r} must be 1-128 of letters, digits, '_', '.', '-'")
        if len(item) > 512:
            raise ValueError(f"value of {key!r} is longer than 512 characters")
    return value


Label = Annotated[str, AfterValidator(_label)]
Duration = Annotated[str, AfterValidator(_duration)]
CheckDuration = Annotated[str, AfterValidator(_check_duration)]


class CheckBody(BaseModel):
    """A check, as the API's ``check`` field and a ``[[services]]`` section's ``check`` both
    spell it (config.py uses this model, so both accept and refuse alike)."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)

    http: Annotated[str, AfterValidator(_http_path)] | None = None
    tcp: bool | None = None
    ttl: CheckDuration | None = None
    interval: CheckDuration | None = None
    timeout: CheckDuration | None = None
    rise: Annotated[int, Field(ge=1, le=100)] | None = None
    fall: Annotated[int, Field(ge=1, le=100)] | None = None
    deregister_after: Duration | None = None

    @model_validator(mode="after")
    def _one_kind(self) -> CheckBody:
        kinds = [k for k in ("http", "tcp", "ttl") if getattr(self, k) not in (None, False)]
        if len(kinds) != 1:
            raise ValueError("needs exactly one of http, tcp or ttl")
        return self

    def to_check(self) -> Check:
        # Nearly every registration of a service spells the same check: build each once.
        return _check(
            self.http,
            self.tcp,
            self.ttl,
            self.interval,
            self.timeout,
            self.rise,
            self.fall,
            self.deregister_after,
        )


@functools.lru_cache(maxsize=1024)
def _check(
    http: str | None,
    tcp: bool | None,
    ttl: str | None,
    interval: str | None,
    timeout: str | None,
    rise: int | None,
    fall: int | None,
    deregister_after: str | None,
) -> Check:
    def dur(raw: str | None, default: float | None) -> float | None:
        return default if raw is None else parse_duration(raw)

    if ttl is not None:
        # interval, timeout, rise and fall mean nothing to a TTL check and are not kept:
        # holding them here would make the same registration differ after a restart.
        return Check(ttl=parse_duration(ttl), deregister_after=dur(deregister_after, None))
    return Check(
        http=http,
        tcp=bool(tcp),
        interval=dur(interval, 2.0) or 2.0,
        timeout=dur(timeout, 1.0) or 1.0,
        rise=rise or 2,
        fall=fall or 3,
        deregister_after=dur(deregister_after, None),
    )


class RegisterBody(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    address: Annotated[str, AfterValidator(_address)]
    port: Annotated[int, Field(ge=1, le=65535)]
    zone: Label | None = None
    region: Label | None = None
    weight: Annotated[int, Field(ge=1, le=1000)] = 1
    tags: Annotated[list[Label], Field(max_length=64)] = Field(default_factory=list)
    meta: Annotated[dict[str, str], Field(max_length=64), AfterValidator(_meta)] = Field(
        default_factory=dict
    )
    check: CheckBody | None = None

    def to_spec(self) -> InstanceSpec:
        check = None if self.check is None else self.check.to_check()
        where = (self.address, self.port, self.zone, self.region, self.weight)
        return instance_spec(*where, self.tags, self.meta, check)


def instance_spec(
    address: str,
    port: int,
    zone: str | None,
    region: str | None,
    weight: int,
    tags: list[str],
    meta: dict[str, str],
    check: Check | None,
) -> InstanceSpec:
    """A checked body's fields in their one spelling: tags once each, meta sorted, so that the
    same registration is the same spec (and re-registering it is no change)."""
    return InstanceSpec(
        address=address,
        port=port,
        zone=zone,
        region=region,
        weight=weight,
        tags=tuple(dict.fromkeys(tags)),
        meta=tuple(sorted(meta.items())),
        check=check,
    )


class HealthBody(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    status: str

    @model_validator(mode="after")
    def _known(self) -> HealthBody:
        if self.status not in ("draining", "maintenance", "passing"):
            raise ValueError("status must be one of draining, maintenance, passing")
        return self


def field_path(loc: tuple[int | str, ...]) -> str:
    """``("tags", 2)`` -> ``tags[2]``; ``("check", "interval")`` -> ``check.interval``."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += part if not out else f".{part}"
    return out


def validation_error(exc: ValidationError) -> RegistryError:
    details = []
    for err in exc.errors(include_url=False, include_input=False):
        loc = tuple(p for p in err["loc"] if not str(p).startswith("function-after"))
        path = field_path(loc) or "body"
        message = str(err["msg"]).removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            message = "is not a known field"
        elif err["type"] == "json_invalid":
            message = f"malformed JSON ({message.removeprefix('Invalid JSON: ')})"
        elif err["type"] == "model_type" and not loc:
            message = "must be a JSON object"
        details.append({"field": path, "message": message})
    first = details[0]
    return RegistryError(f"{first['field']}: {first['message']}", details)


def parse_body(model: type[BaseModel], raw: bytes) -> Any:
    """A request body (JSON bytes) as ``model``; pydantic parses and validates in one pass."""
    if not raw.strip():
        raise RegistryError("body: a JSON object is required", [{"field": "body"}])
    try:
        return model.model_validate_json(raw)
    except ValidationError as exc:
        raise validation_error(exc) from None


_REGISTER_KEYS = frozenset(RegisterBody.model_fields)
_TTL_CHECK_KEYS = frozenset(("ttl", "deregister_after"))
_decode_json = json.JSONDecoder().decode


def register_spec(raw: bytes) -> InstanceSpec:
    """``parse_body(RegisterBody, raw).to_spec()``, sooner for the bodies nearly every caller
    sends: plain ASCII JSON with an IPv4 address and a TTL check or none.

    Every registration pays for this. Through pydantic it took about 9 us in a loaded node, though
    4 us when timed on its own: between requests its code falls out of the CPU's caches. Such a
    body is checked here by the same rules with ``json``; any other body, and every body that
    breaks a rule, goes through pydantic, so what is refused and how it is worded stay pydantic's
    (a property test holds the two paths to the same answer).
    """
    spec = _plain_spec(raw)
    if spec is None:
        spec = parse_body(RegisterBody, raw).to_spec()
    return spec


def _plain_spec(raw: bytes) -> InstanceSpec | None:
    # Escapes are left to pydantic: json reads a lone surrogate that pydantic refuses.
    if b"\\" in raw or not raw.isascii():
        return None
    try:
        data = _decode_json(raw.decode("ascii"))  # not json.loads: it sniffs the encoding
    except (ValueError, RecursionError):
        # Nested deeper than Python recurses: pydantic refuses it with its own words.
        return None
    if type(data) is not dict or not _REGISTER_KEYS.issuperset(data):
        return None
    address = data.get("address")
    port = data.get("port")
    weight = data.get("weight", 1)
    # type(...) is int, not isinstance: pydantic's strict int refuses true and false.
    if (
        type(address) is not str
        or _IPV4.fullmatch(address) is None
        or type(port) is not int
        or not 1 <= port <= 65535
        or type(weight) is not int
        or not 1 <= weight <= 1000
    ):
        return None
    zone = data.get("zone")
    region = data.get("region")
    if zone is not None and (type(zone) is not str or not is_label(zone)):
        return None
    if region is not None and (type(region) is not str or not is_label(region)):
        return None
    tags = data.get("tags", [])
    if type(tags) is not list or len(tags) > 64:
        return None
    for tag in tags:
        if type(tag) is not str or not is_label(tag):
            return None
    meta = data.get("meta", {})
    if type(meta) is not dict or len(meta) > 64:
        return None
    for key, value in meta.items():
        if type(value) is not str or len(value) > 512 or not _META_KEY.fullmatch(key):
            return None
    check = None
    body = data.get("check")
    if body is not None:
        if type(body) is not dict or not _TTL_CHECK_KEYS.issuperset(body):
            return None
        ttl = body.get("ttl")
        after = body.get("deregister_after")
        if type(ttl) is not str or (after is not None and type(after) is not str):
            return None
        try:
            too_short = parse_duration(ttl) < MIN_CHECK_DURATION
            if after is not None:
                parse_duration(after)
        except ValueError:
            return None
        if too_short:
            return None
        check = _check(None, None, ttl, None, None, None, None, after)
    return instance_spec(address, port, zone, region, weight, tags, meta, check)


# The shortest interval of an active check an API client may ask for, unless the node's
# ``[health] min_interval`` says otherwise (it may lower it to ``MIN_CHECK_INTERVAL_FLOOR``).
DEFAULT_MIN_CHECK_INTERVAL = 1.0
MIN_CHECK_INTERVAL_FLOOR = 0.1


def check_interval(check: Check | None, min_interval: float, field: str = "check.interval") -> None:
    """Refuse an active check that would run more often than ``min_interval``: any API client
    may register a check at any host and port, and the node runs it (a check every 10 ms on a
    hundred instances was 10,000 requests a second from the node)."""
    if check is not None and check.active and check.interval < min_interval:
        raise RegistryError(
            f"{field}: must be at least {format_duration(min_interval)} "
            "(this node's health.min_interval)",
            [{"field": field}],
        )


def check_name(field: str, value: str) -> str:
    if not is_label(value):
        raise RegistryError(f"{field}: {LABEL_HINT}", [{"field": field}])
    return value
