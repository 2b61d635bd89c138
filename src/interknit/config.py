"""interknit.toml: every key has a default; an unknown key or a bad value names its full path.

The models here describe the file's shape (DESIGN.md, "Config"). Components get plain values
from them; nothing below the node reads TOML.
"""

from __future__ import annotations

import ipaddress
import re
import tomllib
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    model_validator,
)

from interknit.compat.settings import CompatSection
from interknit.durations import parse_duration
from interknit.names import is_hostname, is_label, parse_hostport
from interknit.registry.schema import field_path
from interknit.vip.config import VipSection

MAX_CONFIG_BYTES = 1024 * 1024


class ConfigError(Exception):
    """A config problem, in one sentence that names the key."""


def _to_seconds(value: Any) -> Any:
    if isinstance(value, str):
        return parse_duration(value)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError("must be a duration such as '250ms', '5s' or '1m'")
    raise ValueError(f"must be a duration string such as '{value}s', not a bare number")


def _listen(value: str) -> str:
    parse_hostport(value, port_zero=True)
    return value


def _server(value: str) -> str:
    parse_hostport(value)
    return value


def _label(value: str) -> str:
    if not is_label(value):
        raise ValueError("must be a DNS label: lowercase letters, digits and '-'")
    return value


Seconds = Annotated[float, BeforeValidator(_to_seconds)]
HostPort = Annotated[str, AfterValidator(_listen)]  # a listen address: port 0 picks one
Server = Annotated[str, AfterValidator(_server)]  # where to connect: port 1-65535
Label = Annotated[str, AfterValidator(_label)]


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


class NodeSection(Section):
    name: str = "node-1"
    data_dir: str = ".interknit"


class TokensSection(Section):
    read: list[Annotated[str, Field(min_length=8, max_length=256)]] = Field(default_factory=list)
    write: list[Annotated[str, Field(min_length=8, max_length=256)]] = Field(default_factory=list)


def _readable_file(value: str) -> str:
    try:
        with open(value, "rb") as f:
            f.read(1)
    except OSError as exc:
        raise ValueError(f"cannot read {value}: {exc.strerror}") from None
    return value


ReadableFile = Annotated[str, AfterValidator(_readable_file)]


class EtcdTlsSection(Section):
    """etcdctl's --cacert, --cert and --key, for https:// endpoints."""

    ca: ReadableFile | None = None  # none: the system's root certificates
    cert: ReadableFile | None = None
    key: ReadableFile | None = None

    @model_validator(mode="after")
    def _pair(self) -> EtcdTlsSection:
        if (self.cert is None) != (self.key is None):
            raise ValueError("cert and key go together (the client's certificate and its key)")
        return self


class RegistrySection(Section):
    listen: HostPort = "127.0.0.1:7470"
    backend: Literal["embedded", "etcd"] = "embedded"
    etcd: list[str] = Field(default_factory=lambda: ["http://127.0.0.1:2379"])
    etcd_tls: EtcdTlsSection | None = None
    etcd_prefix: str = "/interknit/"
    etcd_timeout: Seconds = 2.0
    node_ttl: Seconds = 10.0  # a node's lease: its instances go this long after it dies
    tokens: TokensSection = Field(default_factory=TokensSection)
    history: Annotated[int, Field(ge=100, le=1_000_000)] = 10_000


def _cidr(value: str) -> str:
    try:
        ipaddress.ip_network(value, strict=False)
    except ValueError:
        raise ValueError(f"{value!r} is not a CIDR such as '10.1.0.0/16'") from None
    return value


Cidr = Annotated[str, AfterValidator(_cidr)]


class GslbSection(Section):
    policy: Literal["nearest", "failover", "weighted"] = "nearest"
    min_healthy: Annotated[int, Field(ge=1)] = 1
    order: list[Label] = Field(default_factory=list)
    weights: dict[str, Annotated[int, Field(ge=0, le=1000)]] = Field(default_factory=dict)
    fallback: dict[str, list[Label]] = Field(default_factory=dict)


class RrlSection(Section):
    enabled: bool = True
    rate: Annotated[float, Field(gt=0)] = 200.0
    burst: Annotated[float, Field(gt=0)] = 400.0
    slip: Annotated[int, Field(ge=0, le=10)] = 2
    exempt: list[Cidr] = Field(default_factory=lambda: ["127.0.0.0/8", "::1/128"])


class DnsSection(Section):
    enabled: bool = True
    listen: HostPort = "127.0.0.1:7453"
    zone: str = "ik.internal."
    ttl: Seconds = 5.0
    changed_ttl: Seconds = 1.0
    max_answers: Annotated[int, Field(ge=1, le=64)] = 8
    service_ttls: dict[str, Seconds] = Field(default_factory=dict)
    regions: dict[Cidr, Label] = Field(default_factory=dict)
    gslb: GslbSection = Field(default_factory=GslbSection)
    rrl: RrlSection = Field(default_factory=RrlSection)
    # service -> region -> addresses of the load balancers (VIPs) that front it there; the
    # service's global name then answers with these instead of its instances.
    gateways: dict[
        Label,
        dict[
            Label,
            Annotated[
                list[Annotated[str, AfterValidator(lambda v: str(ipaddress.ip_address(v)))]],
                Field(min_length=1, max_length=64),
            ],
        ],
    ] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _zone(self) -> DnsSection:
        zone = self.zone
        if not zone.endswith(".") or not is_hostname(zone):
            raise ValueError(
                "zone must be a fully qualified name ending in '.', like 'ik.internal.'"
            )
        return self


class CheckSection(Section):
    http: str | None = None
    tcp: bool | None = None
    ttl: Seconds | None = None
    interval: Seconds = 2.0
    timeout: Seconds = 1.0
    rise: Annotated[int, Field(ge=1, le=100)] = 2
    fall: Annotated[int, Field(ge=1, le=100)] = 3
    deregister_after: Seconds | None = None

    @model_validator(mode="after")
    def _one_kind(self) -> CheckSection:
        kinds = [k for k in ("http", "tcp", "ttl") if getattr(self, k) not in (None, False)]
        if len(kinds) != 1:
            raise ValueError("check needs exactly one of http, tcp or ttl")
        return self


class ServiceSection(Section):
    name: Label
    instances: list[Server] = Field(default_factory=list)
    check: CheckSection | None = None
    tags: list[Label] = Field(default_factory=list)
    weight: Annotated[int, Field(ge=1, le=1000)] = 1
    zone: Label | None = None
    region: Label | None = None
    ttl: Seconds | None = None  # DNS TTL for this service


class MatchSection(Section):
    host: str | None = None
    path: str | None = None
    path_prefix: str | None = None
    path_regex: str | None = None
    method: str | None = None
    # name -> exact value, or true: the header only has to be present.
    headers: dict[str, str | Literal[True]] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _regex(self) -> MatchSection:
        if self.path_regex is not None:
            try:
                re.compile(self.path_regex)
            except re.error as exc:
                raise ValueError(f"path_regex is not a valid regular expression: {exc}") from None
        return self


class StickySection(Section):
    cookie: str


class RetriesSection(Section):
    attempts: Annotated[int, Field(ge=0, le=10)] = 2
    budget: Annotated[float, Field(ge=0.0, le=1.0)] = 0.2
    min: Annotated[int, Field(ge=0, le=1000)] = 3
    backoff: Annotated[Seconds, Field(ge=0.0, le=60.0)] = 0.0


class OutlierSection(Section):
    """Passive outlier detection of the route's pool (Envoy's outlier_detection)."""

    enabled: bool = True
    consecutive_failures: Annotated[int, Field(ge=1, le=1000)] = 5
    base_ejection_time: Seconds = 30.0
    max_ejection_time: Seconds = 300.0
    max_ejection_percent: Annotated[float, Field(ge=0, le=100)] = 50.0
    interval: Seconds = 10.0


class DemandSection(Section):
    concurrency: Literal["adaptive"] | Annotated[int, Field(ge=1)] | None = None
    limit: Literal["gradient", "aimd", "fixed"] | None = None
    queue: Annotated[int, Field(ge=0)] = 64
    queue_timeout: Seconds = 0.1
    rate: str | None = None
    burst: Annotated[int, Field(ge=1)] | None = None
    rate_key: str | None = None
    client_rate: str | None = None
    client_burst: Annotated[int, Field(ge=1)] | None = None
    client_key: str | None = None
    priority: Literal["critical", "default", "sheddable"] = "default"
    reserve: Annotated[float, Field(ge=0.0, le=0.9)] = 0.1

    @model_validator(mode="after")
    def _settings(self) -> DemandSection:
        from interknit.demand.settings import DemandSettings

        # One parser for rates, keys and limits: the one the proxy will use.
        DemandSettings.from_dict(self.model_dump())
        return self


Balance = Literal["round_robin", "least_requests", "random", "ring_hash", "maglev", "source_ip"]


class RouteSection(Section):
    name: str = ""
    match: MatchSection | None = None
    service: Label | None = None
    servers: list[Server] = Field(default_factory=list)
    balance: Balance = "round_robin"
    hash_on: str = "source"  # "source", "header:X-User" or "cookie:session"
    sticky: StickySection | None = None
    retries: RetriesSection = Field(default_factory=RetriesSection)
    timeout: Seconds | None = None
    connect_timeout: Seconds = 2.0
    response_timeout: Seconds | None = 30.0
    idle_timeout: Seconds = 60.0
    slow_start: Seconds | None = None
    panic_threshold: Annotated[float, Field(ge=0.0, le=1.0)] = 0.5
    outlier: OutlierSection = Field(default_factory=OutlierSection)
    demand: DemandSection | None = None

    @model_validator(mode="after")
    def _target(self) -> RouteSection:
        if (self.service is None) == (not self.servers):
            raise ValueError("a route names either service or servers, not both and not neither")
        return self


class ListenerSection(Section):
    name: str
    listen: HostPort
    protocol: Literal["http", "tcp"] = "http"
    max_connections: Annotated[int, Field(ge=1)] = 10_000
    header_timeout: Seconds = 10.0
    keepalive_timeout: Seconds = 60.0
    max_header_bytes: Annotated[int, Field(ge=1024, le=1024 * 1024)] = 32 * 1024
    max_headers: Annotated[int, Field(ge=1, le=10_000)] = 100
    abort_on_close: bool = True
    upstream_max_idle: Annotated[int, Field(ge=0, le=10_000)] = 32
    upstream_idle_timeout: Seconds = 60.0
    drain_timeout: Seconds = 10.0
    routes: list[RouteSection] = Field(default_factory=list)

    @model_validator(mode="after")
    def _tcp_routes(self) -> ListenerSection:
        if self.protocol == "tcp" and (len(self.routes) != 1 or self.routes[0].match):
            raise ValueError("a tcp listener has exactly one route, without match")
        from interknit.proxy.setup import listener_spec

        listener_spec(self).validate()  # the proxy's own checks, with the route's index
        return self


class Config(Section):
    node: NodeSection = Field(default_factory=NodeSection)
    registry: RegistrySection = Field(default_factory=RegistrySection)
    dns: DnsSection = Field(default_factory=DnsSection)
    services: list[ServiceSection] = Field(default_factory=list)
    listeners: list[ListenerSection] = Field(default_factory=list)
    compat: CompatSection = Field(default_factory=CompatSection)
    vip: VipSection = Field(default_factory=VipSection)


def _describe(exc: ValidationError) -> str:
    err = exc.errors(include_url=False, include_input=False)[0]
    loc = tuple(
        p for p in err["loc"] if not (isinstance(p, str) and ("function-" in p or "[" in p))
    )
    # Literal/union errors carry the member type in the path; keep only real keys.
    loc = tuple(p for p in loc if not (isinstance(p, str) and p in ("int", "str", "float")))
    path = field_path(loc) or "config"
    message = str(err["msg"]).removeprefix("Value error, ")
    if err["type"] == "extra_forbidden":
        return f"{path}: unknown key"
    return f"{path}: {message}"


def parse_config(data: dict[str, Any]) -> Config:
    try:
        return Config.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(_describe(exc)) from None


def load_config(path: str | Path | None) -> Config:
    """Read and validate a config file; ``None`` gives every default."""
    if path is None:
        return Config()
    file = Path(path)
    try:
        raw = file.read_bytes()
    except OSError as exc:
        raise ConfigError(f"cannot read config file {file}: {exc.strerror}") from None
    if len(raw) > MAX_CONFIG_BYTES:
        raise ConfigError(f"config file {file} is larger than 1 MiB")
    try:
        data = tomllib.loads(raw.decode("utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"config file {file} is not valid TOML: {exc}") from None
    return parse_config(data)
