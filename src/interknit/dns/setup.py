"""From ``[dns]`` in interknit.toml to a running server fed by the registry."""

from __future__ import annotations

import ipaddress
from typing import Any

from prometheus_client import CollectorRegistry

from interknit.dns.config import DnsSection
from interknit.dns.gslb import GslbConfig
from interknit.dns.rrl import RrlConfig
from interknit.dns.server import DnsServer
from interknit.dns.zone import ANSWERED_HEALTH, Zone, ZoneConfig
from interknit.names import parse_hostport
from interknit.registry.config import ServiceSection
from interknit.registry.state import RegistryState


def zone_config(section: DnsSection, services: list[ServiceSection]) -> ZoneConfig:
    host, _ = parse_hostport(section.listen, port_zero=True)
    try:
        unspecified = ipaddress.ip_address(host).is_unspecified
    except ValueError:
        unspecified = True
    ttls = {s.name: s.ttl for s in services if s.ttl is not None}
    ttls.update(section.service_ttls)
    gslb = None
    if section.regions or section.gateways:
        g = section.gslb
        gslb = GslbConfig(
            regions=dict(section.regions),
            fallback={k: tuple(v) for k, v in g.fallback.items()},
            policy=g.policy,
            min_healthy=g.min_healthy,
            weights=dict(g.weights),
            order=tuple(g.order),
            gateways={
                service: {region: tuple(vips) for region, vips in regions.items()}
                for service, regions in section.gateways.items()
            },
        )
    return ZoneConfig(
        zone=section.zone,
        ttl=section.ttl,
        service_ttls=ttls,
        changed_ttl=section.changed_ttl,
        max_answers=section.max_answers,
        nameserver_addresses=("127.0.0.1",) if unspecified else (host,),
        gslb=gslb,
    )


def build_server(
    section: DnsSection, services: list[ServiceSection], metrics: CollectorRegistry
) -> DnsServer:
    host, port = parse_hostport(section.listen, port_zero=True)
    rrl = section.rrl
    return DnsServer(
        Zone(zone_config(section, services)),
        host,
        port,
        metrics,
        rrl=RrlConfig(rate=rrl.rate, burst=rrl.burst, slip=rrl.slip, exempt=tuple(rrl.exempt)),
        rate_limit=rrl.enabled,
        tcp_idle_timeout=section.tcp_idle_timeout,
        max_tcp_connections=section.tcp_max_connections,
        max_tcp_per_client=section.tcp_max_per_client,
    )


def answers_panel(state: RegistryState, zone: str) -> list[dict[str, Any]]:
    """What each service's A/AAAA name answers now, for the status page."""
    rows = []
    for name in state.service_names():
        healthy = [i for i in state.instances(name) if i.health in ANSWERED_HEALTH]
        rows.append(
            {
                "name": f"{name}.{zone}",
                "answers": ", ".join(i.address for i in healthy) or "(empty: none healthy)",
                "srv": f"_{name}._tcp.{zone}",
            }
        )
    return rows
