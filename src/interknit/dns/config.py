"""DNS's section of interknit.toml: ``[dns]``, with its GSLB regions and response rate limits."""

from __future__ import annotations

import ipaddress
from typing import Annotated, Literal

from pydantic import AfterValidator, Field, model_validator

from interknit.names import is_hostname
from interknit.sections import Cidr, HostPort, Label, Seconds, Section


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
    # DNS over TCP: open connections in all, per client address, and how long one may idle.
    tcp_max_connections: Annotated[int, Field(ge=1, le=100_000)] = 256
    tcp_max_per_client: Annotated[int, Field(ge=1, le=100_000)] = 16
    tcp_idle_timeout: Annotated[Seconds, Field(gt=0, le=3600)] = 10.0
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
                "zone: must be a fully qualified name ending in '.', like 'ik.internal.'"
            )
        return self
