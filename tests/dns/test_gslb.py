"""GSLB region choice: the sans-IO policy, and the zone's global names with ECS and source."""

from __future__ import annotations

import ipaddress
import random
import tomllib
from collections import Counter

import dns.edns
import dns.rcode
import pytest

from interknit.config import ConfigError, parse_config
from interknit.dns.gslb import Gslb, GslbConfig
from interknit.dns.setup import zone_config
from interknit.dns.zone import Zone, ZoneConfig
from tests.dns.helpers import ZONE, addresses, ask, inst, put

REGIONS = {
    "10.0.0.0/8": "eu",
    "10.20.0.0/16": "us",  # more specific than eu's /8
    "192.0.2.0/24": "us",
    "198.51.100.0/24": "ap",
    "2001:db8:1::/48": "ap",
}
FALLBACK = {"eu": ["us", "ap"], "us": ["eu"], "ap": ["us"]}


def ip(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    return ipaddress.ip_address(text)


def test_locate_uses_the_longest_prefix() -> None:
    gslb = Gslb(GslbConfig(regions=REGIONS))
    assert gslb.locate(ip("10.1.2.3")).region == "eu"
    assert gslb.locate(ip("10.20.2.3")).region == "us"
    assert gslb.locate(ip("10.20.2.3")).prefix == 16
    assert gslb.locate(ip("2001:db8:1::5")).region == "ap"
    assert gslb.locate(ip("203.0.113.1")).region is None
    assert gslb.locate(None).region is None


def test_failover_takes_the_first_region_with_enough_healthy() -> None:
    gslb = Gslb(GslbConfig(policy="failover", order=["eu", "us", "ap"], min_healthy=2))
    assert gslb.choose("ap", {"eu": 2, "us": 5}, 0.5) == "eu"
    assert gslb.choose("ap", {"eu": 1, "us": 5}, 0.5) == "us"
    assert gslb.choose(None, {"eu": 1, "us": 1, "ap": 3}, 0.5) == "ap"
    # Nobody reaches min_healthy: a thin answer beats none.
    assert gslb.choose(None, {"eu": 0, "us": 1}, 0.5) == "us"
    assert gslb.choose(None, {}, 0.5) is None


def test_nearest_with_fallback_then_spread() -> None:
    gslb = Gslb(GslbConfig(policy="nearest", fallback=FALLBACK))
    healthy = {"eu": 2, "us": 2, "ap": 2}
    assert gslb.choose("eu", healthy, 0.99) == "eu"
    assert gslb.choose("eu", {**healthy, "eu": 0}, 0.99) == "us"
    assert gslb.choose("eu", {"eu": 0, "us": 0, "ap": 1}, 0.99) == "ap"
    # "ap" falls back to "us" only; with both down the load spreads over every other region.
    down = {"ap": 0, "us": 0, "eu": 3, "sa": 1}
    picks = {gslb.choose("ap", down, d / 10) for d in range(10)}
    assert picks == {"eu", "sa"}


def test_weighted_splits_by_weight_and_shifts_a_down_region_over_the_others() -> None:
    gslb = Gslb(GslbConfig(policy="weighted", weights={"eu": 2, "us": 1, "ap": 1}))
    draws = [i / 1000 for i in range(1000)]
    up = Counter(gslb.choose(None, {"eu": 1, "us": 1, "ap": 1}, d) for d in draws)
    assert up == {"eu": 500, "us": 250, "ap": 250}
    down = Counter(gslb.choose(None, {"eu": 0, "us": 1, "ap": 1}, d) for d in draws)
    assert down == {"us": 500, "ap": 500}


def test_config_is_validated() -> None:
    with pytest.raises(ValueError):
        GslbConfig(policy="closest")  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        GslbConfig(regions={"not-a-cidr": "eu"})
    with pytest.raises(ValueError):
        GslbConfig(min_healthy=0)


def global_zone(policy: str = "nearest", **kw: object) -> Zone:
    config = GslbConfig(regions=REGIONS, fallback=FALLBACK, policy=policy, **kw)  # type: ignore[arg-type]
    zone = Zone(ZoneConfig(gslb=config), rng=random.Random(3))
    zone.sync(
        [
            inst("web", "eu1", "10.100.0.1", region="eu"),
            inst("web", "eu2", "10.100.0.2", region="eu"),
            inst("web", "us1", "10.200.0.1", region="us"),
            inst("web", "ap1", "10.250.0.1", region="ap"),
            inst("web", "none", "10.99.0.1"),
        ],
        5,
    )
    return zone


def test_global_name_by_source_address() -> None:
    zone = global_zone()
    assert sorted(addresses(ask(zone, f"web.global.{ZONE}", client="10.3.3.3"))) == [
        "10.100.0.1",
        "10.100.0.2",
    ]
    assert addresses(ask(zone, f"web.global.{ZONE}", client="192.0.2.55")) == ["10.200.0.1"]
    # The plain service name is not regional.
    assert len(addresses(ask(zone, f"web.{ZONE}", client="192.0.2.55"))) == 5


def test_global_name_by_ecs_echoes_the_scope() -> None:
    zone = global_zone()
    option = dns.edns.ECSOption("198.51.100.0", 24)
    msg = ask(zone, f"web.global.{ZONE}", client="10.3.3.3", use_edns=0, options=[option])
    assert addresses(msg) == ["10.250.0.1"]  # ECS wins over the resolver's own address
    echoed = next(o for o in msg.options if isinstance(o, dns.edns.ECSOption))
    assert echoed.address == "198.51.100.0" and echoed.srclen == 24 and echoed.scopelen == 24
    unmatched = dns.edns.ECSOption("203.0.113.0", 24)
    msg = ask(zone, f"web.global.{ZONE}", use_edns=0, options=[unmatched])
    echoed = next(o for o in msg.options if isinstance(o, dns.edns.ECSOption))
    assert echoed.scopelen == 24
    # A name that does not depend on the client says so with scope 0.
    msg = ask(zone, f"web.{ZONE}", use_edns=0, options=[option])
    echoed = next(o for o in msg.options if isinstance(o, dns.edns.ECSOption))
    assert echoed.scopelen == 0


def test_region_down_fails_over_then_recovers() -> None:
    zone = global_zone()
    eu = [inst("web", f"eu{i}", f"10.100.0.{i}", region="eu") for i in (1, 2)]
    for revision, instance in enumerate(eu, start=6):
        zone.apply(put(revision, instance.evolve(check_status="critical"), "health"))
    assert addresses(ask(zone, f"web.global.{ZONE}", client="10.3.3.3")) == ["10.200.0.1"]
    zone.apply(put(8, eu[0], "health"))
    assert addresses(ask(zone, f"web.global.{ZONE}", client="10.3.3.3")) == ["10.100.0.1"]


def test_weighted_policy_through_the_zone() -> None:
    zone = global_zone("weighted", weights={"eu": 1, "us": 1, "ap": 2})
    firsts = Counter(addresses(ask(zone, f"web.global.{ZONE}"))[0] for _ in range(2000))
    ap_share = firsts["10.250.0.1"] / 2000
    assert 0.44 < ap_share < 0.56  # expected 0.5, sd ~0.011
    assert "10.99.0.1" not in firsts  # no region: never global


def test_worked_example_from_the_docs() -> None:
    """docs/dns.md, "Worked example", step by step."""
    config = GslbConfig(
        regions={"10.1.0.0/16": "eu", "10.2.0.0/16": "us", "10.3.0.0/16": "ap"},
        policy="nearest",
        min_healthy=2,
        order=["eu", "us"],
        weights={"eu": 2, "us": 1, "ap": 1},
        fallback={"eu": ["us"], "us": ["eu"], "ap": ["us", "eu"]},
    )
    web = (
        [inst("web", f"eu{i}", f"10.10.0.{i}", region="eu") for i in (1, 2, 3)]
        + [inst("web", f"us{i}", f"10.20.0.{i}", region="us") for i in (1, 2)]
        + [inst("web", f"ap{i}", f"10.30.0.{i}", region="ap") for i in (1, 2)]
    )
    zone = Zone(ZoneConfig(gslb=config), rng=random.Random(5))
    zone.sync(web, 1)
    name = f"web.global.{ZONE}"

    def regions_for(client: str) -> set[str]:
        got = addresses(ask(zone, name, client=client, now=100.0))
        return {{"10": "eu", "20": "us", "30": "ap"}[a.split(".")[1]] for a in got}

    # 1. By source, then by ECS with the matched /16 as scope.
    assert regions_for("10.1.4.4") == {"eu"}
    assert len(addresses(ask(zone, name, client="10.1.4.4"))) == 3
    ecs = dns.edns.ECSOption("10.3.9.0", 24)
    msg = ask(zone, name, client="10.1.4.4", use_edns=0, options=[ecs])
    assert sorted(addresses(msg)) == ["10.30.0.1", "10.30.0.2"]
    assert next(o for o in msg.options if isinstance(o, dns.edns.ECSOption)).scopelen == 16
    # 2. Two eu instances fail: eu clients go to us, with a 1s TTL for a while.
    zone.apply(put(2, web[0].evolve(check_status="critical"), "health"), now=100.0)
    zone.apply(put(3, web[1].evolve(check_status="critical"), "health"), now=100.0)
    assert regions_for("10.1.4.4") == {"us"}
    assert ask(zone, name, client="10.1.4.4", now=101.0).answer[0].ttl == 1
    # 3. us loses one too: eu clients spread over what qualifies (ap); ap keeps its own.
    zone.apply(put(4, web[3].evolve(check_status="critical"), "health"), now=100.0)
    assert regions_for("10.1.4.4") == {"ap"}
    assert regions_for("10.3.1.1") == {"ap"}
    # 5. eu recovers.
    zone.apply(put(5, web[0], "health"), now=110.0)
    zone.apply(put(6, web[1], "health"), now=110.0)
    assert regions_for("10.1.4.4") == {"eu"}


def test_worked_example_weighted_shares() -> None:
    gslb = Gslb(GslbConfig(policy="weighted", min_healthy=2, weights={"eu": 2, "us": 1, "ap": 1}))
    draws = [i / 400 for i in range(400)]
    step1 = Counter(gslb.choose(None, {"eu": 3, "us": 2, "ap": 2}, d) for d in draws)
    assert step1 == {"eu": 200, "us": 100, "ap": 100}
    step2 = Counter(gslb.choose(None, {"eu": 1, "us": 2, "ap": 2}, d) for d in draws)
    assert step2 == {"us": 200, "ap": 200}


# -- gateways: a service's global name answers with its regions' load balancer VIPs -----------

GATEWAYS = {
    "web": {
        "eu": ("192.0.2.10", "192.0.2.11", "2001:db8:e::10"),
        "us": ("198.51.100.10",),
        "ap": ("2001:db8:a::10",),  # IPv6 only
    }
}


def gateway_zone(policy: str = "nearest", **kw: object) -> Zone:
    config = GslbConfig(
        regions=REGIONS,
        fallback=FALLBACK,
        policy=policy,  # type: ignore[arg-type]
        gateways=GATEWAYS,
        **kw,  # type: ignore[arg-type]
    )
    zone = Zone(ZoneConfig(gslb=config), rng=random.Random(3))
    zone.sync(
        [
            inst("web", "eu1", "10.100.0.1", region="eu"),
            inst("web", "eu2", "10.100.0.2", region="eu"),
            inst("web", "us1", "10.200.0.1", region="us"),
            inst("web", "ap1", "10.250.0.1", region="ap"),
            inst("web", "sa1", "10.240.0.1", region="sa"),  # a region without a gateway
            inst("api", "a1", "10.101.0.1", region="eu"),  # a service without gateways
        ],
        5,
    )
    return zone


def test_gateways_answer_the_nearest_regions_vips_not_its_instances() -> None:
    zone = gateway_zone()
    name = f"web.global.{ZONE}"
    assert sorted(addresses(ask(zone, name, client="10.3.3.3"))) == ["192.0.2.10", "192.0.2.11"]
    assert addresses(ask(zone, name, "AAAA", client="10.3.3.3"), "AAAA") == ["2001:db8:e::10"]
    assert addresses(ask(zone, name, client="192.0.2.55")) == ["198.51.100.10"]
    # ECS picks the region as for instances, and the scope says how far the answer holds.
    option = dns.edns.ECSOption("10.20.7.0", 24)
    msg = ask(zone, name, client="10.3.3.3", use_edns=0, options=[option])
    assert addresses(msg) == ["198.51.100.10"]
    assert next(o for o in msg.options if isinstance(o, dns.edns.ECSOption)).scopelen == 16
    # The plain name and services without gateways still answer instances.
    assert len(addresses(ask(zone, f"web.{ZONE}", client="10.3.3.3"))) == 5
    assert addresses(ask(zone, f"api.global.{ZONE}", client="10.3.3.3")) == ["10.101.0.1"]


def test_gateway_vips_rotate() -> None:
    zone = gateway_zone()
    firsts = [addresses(ask(zone, f"web.global.{ZONE}", client="10.3.3.3"))[0] for _ in range(4)]
    assert firsts == ["192.0.2.10", "192.0.2.11"] * 2


def test_a_region_with_only_ipv6_gateways_answers_a_with_nodata() -> None:
    zone = gateway_zone()
    msg = ask(zone, f"web.global.{ZONE}", client="198.51.100.7")
    assert msg.rcode() == dns.rcode.NOERROR and not msg.answer and msg.authority
    aaaa = ask(zone, f"web.global.{ZONE}", "AAAA", client="198.51.100.7")
    assert addresses(aaaa, "AAAA") == ["2001:db8:a::10"]


def test_a_gateway_region_is_up_only_while_its_instances_are() -> None:
    zone = gateway_zone(min_healthy=2)
    name = f"web.global.{ZONE}"
    # eu has 2 healthy instances: its VIPs answer.
    assert sorted(addresses(ask(zone, name, client="10.3.3.3"))) == ["192.0.2.10", "192.0.2.11"]
    eu1 = inst("web", "eu1", "10.100.0.1", region="eu")
    zone.apply(put(6, eu1.evolve(check_status="critical"), "health"), now=10.0)
    # eu is below min_healthy; its fallback us has 1 (below too), ap has 1: every region is
    # below 2, so the threshold drops to 1 and eu's own VIPs answer again (thin beats empty).
    assert sorted(addresses(ask(zone, name, client="10.3.3.3"))) == ["192.0.2.10", "192.0.2.11"]
    zone.apply(put(7, inst("web", "us2", "10.200.0.2", region="us")), now=10.0)
    # Now us qualifies, and eu clients follow eu's fallback list to us's VIP, at a low TTL.
    msg = ask(zone, name, client="10.3.3.3", now=11.0)
    assert addresses(msg) == ["198.51.100.10"]
    assert msg.answer[0].ttl == 1
    eu2 = inst("web", "eu2", "10.100.0.2", region="eu")
    zone.apply(put(8, eu2.evolve(check_status="critical"), "health"), now=10.0)
    zone.apply(put(9, inst("web", "us3", "10.200.0.3", region="us")), now=10.0)
    assert addresses(ask(zone, name, client="10.3.3.3")) == ["198.51.100.10"]
    # eu recovers.
    zone.apply(put(10, eu1, "health"), now=20.0)
    zone.apply(put(11, eu2, "health"), now=20.0)
    assert sorted(addresses(ask(zone, name, client="10.3.3.3"))) == ["192.0.2.10", "192.0.2.11"]


def test_regions_without_a_gateway_never_answer_for_a_gateway_service() -> None:
    zone = gateway_zone()
    name = f"web.global.{ZONE}"
    for revision, (id, address, region) in enumerate(
        [("eu1", "10.100.0.1", "eu"), ("eu2", "10.100.0.2", "eu"), ("us1", "10.200.0.1", "us")],
        start=6,
    ):
        down = inst("web", id, address, region=region, check_status="critical")
        zone.apply(put(revision, down, "health"))
    # Only ap (a gateway, IPv6) and sa (instances, no gateway) are left: sa is never chosen.
    seen = {tuple(addresses(ask(zone, name, "AAAA", client=c), "AAAA")) for c in ("10.3.3.3",) * 20}
    assert seen == {("2001:db8:a::10",)}
    zone.apply(put(9, inst("web", "ap1", "10.250.0.1", region="ap", check_status="critical")))
    # No gateway region has a healthy instance: empty, not the instances of sa.
    msg = ask(zone, name, client="10.3.3.3")
    assert msg.rcode() == dns.rcode.NOERROR and not msg.answer


def test_gateways_with_failover_and_weighted_policies() -> None:
    zone = gateway_zone("failover", order=["us", "eu"])
    assert addresses(ask(zone, f"web.global.{ZONE}", client="10.3.3.3")) == ["198.51.100.10"]
    zone.apply(put(6, inst("web", "us1", "10.200.0.1", region="us", check_status="critical")))
    assert len(addresses(ask(zone, f"web.global.{ZONE}", client="192.0.2.1"))) == 2
    # weighted: sa's huge weight does not count, sa has no gateway.
    zone = gateway_zone("weighted", weights={"eu": 1, "us": 3, "sa": 100})
    regions: Counter[str] = Counter()
    for _ in range(2000):
        got = addresses(ask(zone, f"web.global.{ZONE}"))
        regions["ap" if not got else "us" if got == ["198.51.100.10"] else "eu"] += 1
    assert set(regions) == {"eu", "us", "ap"}  # ap: its VIP is IPv6, so A is empty
    assert 0.55 < regions["us"] / 2000 < 0.65  # expected 0.6, sd ~0.011


def test_candidates_are_the_gateway_regions() -> None:
    gslb = Gslb(GslbConfig(gateways=GATEWAYS))
    healthy = {"eu": 2, "sa": 1}
    assert gslb.candidates("web", healthy) == {"eu": 2, "us": 0, "ap": 0}
    assert gslb.candidates("api", healthy) == healthy
    assert gslb.gateways("web", "us") == ("198.51.100.10",)
    assert gslb.gateways("web", "sa") == ()
    assert gslb.gateways("api", "eu") is None


def test_gateways_from_the_config_file() -> None:
    """``[dns.gateways.SERVICE]`` through the config parser and ``zone_config``."""
    config = parse_config(
        tomllib.loads(
            """
            [dns.regions]
            "10.0.0.0/8" = "eu"
            "192.0.2.0/24" = "us"
            [dns.gslb]
            min_healthy = 1
            [dns.gateways.web]
            eu = ["203.0.113.10"]
            us = ["203.0.113.20", "2001:db8::20"]
            """
        )
    )
    zone = Zone(zone_config(config.dns, config.services), rng=random.Random(1))
    zone.sync([inst("web", "u1", "10.200.0.1", region="us")], 1)
    # eu has no healthy instance: eu clients get us's VIP.
    assert addresses(ask(zone, f"web.global.{ZONE}", client="10.1.1.1")) == ["203.0.113.20"]
    aaaa = ask(zone, f"web.global.{ZONE}", "AAAA", client="10.1.1.1")
    assert addresses(aaaa, "AAAA") == ["2001:db8::20"]
    with pytest.raises(ConfigError, match=r"dns\.gateways\.web\.eu\[0\]"):
        parse_config({"dns": {"gateways": {"web": {"eu": ["vip.example"]}}}})
    # Gateways alone turn GSLB on (no client CIDRs: clients spread by weight).
    only = parse_config({"dns": {"gateways": {"web": {"eu": ["203.0.113.10"]}}}})
    assert zone_config(only.dns, []).gslb is not None


def test_gateway_config_is_validated() -> None:
    with pytest.raises(ValueError, match="no address"):
        GslbConfig(gateways={"web": {"eu": ()}})
    with pytest.raises(ValueError, match="no region"):
        GslbConfig(gateways={"web": {}})
    with pytest.raises(ValueError):
        GslbConfig(gateways={"web": {"eu": ("vip.example",)}})
