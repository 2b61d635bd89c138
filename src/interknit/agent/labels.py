"""What a container asks to be registered as: its labels (and Registrator's ``SERVICE_*``
variables) read into registrations. Pure: a container and the agent's policy in, registrations
and problems out.

Keys, for the whole container or one port (``interknit.<port>.KEY``, Registrator's
``SERVICE_<port>_KEY``), the more specific winning, and ``interknit.*`` winning over
``SERVICE_*``:

===================  =====================  ===========================================
interknit.*          Registrator            meaning
===================  =====================  ===========================================
service              SERVICE_NAME           the service name (a DNS label)
id                   SERVICE_ID             the instance id (default HOST-CONTAINER-PORT)
tags                 SERVICE_TAGS           comma-separated tags
check.http           SERVICE_CHECK_HTTP     an HTTP check the node runs (a path)
check.tcp            SERVICE_CHECK_TCP      a TCP check the node runs
check.interval       SERVICE_CHECK_INTERVAL its interval (default 2s)
weight               SERVICE_WEIGHT         1 to 1000
zone, region         SERVICE_ZONE, _REGION  placement
ignore               SERVICE_IGNORE         leave the container (or port) alone
===================  =====================  ===========================================

Other ``SERVICE_X`` variables become meta ``x`` (Registrator's attributes). With several
ports and one container-wide name, each port's service is ``NAME-PORT``, as Registrator names
them. Which ports: the published ones, at the published address (a wildcard means the host's
address under the policy); with ``internal``, every port at the container's own address;
with the host's network, every exposed port at the host's address.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from interknit.agent.addresses import published_address
from interknit.agent.container import Container, Port
from interknit.agent.names import to_label
from interknit.durations import format_duration, parse_duration
from interknit.registry.model import Check, InstanceSpec, is_label

Key = tuple[str, str]  # (service, instance id)

# Keys the agent reads; anything else under SERVICE_ is meta.
_KNOWN = {
    "service": "name",
    "id": "id",
    "tags": "tags",
    "check.http": "check_http",
    "check.tcp": "check_tcp",
    "check.interval": "check_interval",
    "weight": "weight",
    "zone": "zone",
    "region": "region",
    "ignore": "ignore",
}
_REGISTRATOR = {v: k for k, v in _KNOWN.items()}
_PER_PORT_LABEL = re.compile(r"interknit\.([0-9]{1,5})\.(.+)")
_PER_PORT_ENV = re.compile(r"SERVICE_([0-9]{1,5})_(.+)")
_META_KEY = re.compile(r"[A-Za-z0-9_.-]{1,128}")
_PATH = re.compile(r"/[\x21-\x7e]{0,1023}")
MAX_META = 64
DEFAULT_INTERVAL = 2.0
OWNER = "owner"


@dataclass(frozen=True, slots=True)
class Policy:
    """How the agent registers what it finds."""

    host: str  # this host as a DNS label: part of instance ids
    owner: str  # meta.owner of every registration the agent makes
    address: str  # the host's address, for ports published on a wildcard
    internal: bool = False  # the container's own address and port instead of the published
    network: str | None = None  # which container network, with ``internal``
    explicit: bool = True  # only containers that name their service
    ttl: float | None = 30.0  # a lease the agent renews, when a container names no check
    deregister_after: float = 60.0  # removal after critical this long (the agent gone)


@dataclass(frozen=True, slots=True)
class Desired:
    service: str
    id: str
    spec: InstanceSpec
    container: str  # the container's id

    @property
    def key(self) -> Key:
        return (self.service, self.id)


class Problem(ValueError):
    """A label or variable that cannot be used; the message names it."""


def _truthy(value: str) -> bool:
    return value.strip().lower() not in ("", "0", "false", "no")


Found = dict[str, tuple[str, str]]  # key -> (value, the label or variable it came from)


def _settings(container: Container, port: Port | None) -> tuple[Found, Found]:
    """``{key: (value, where)}`` for one port (or the container), most specific last, and
    Registrator attributes for meta."""
    found: Found = {}
    attrs: Found = {}
    private = None if port is None else str(port.private)
    # Registrator: environment first, labels over it; whole container, then the port.
    sources = [*container.env.items(), *container.labels.items()]
    for specific in (False, True):
        for name, value in sources:
            if not name.startswith("SERVICE_"):
                continue
            match = _PER_PORT_ENV.fullmatch(name)
            if (match is not None) != specific:
                continue
            if match is not None:
                if match.group(1) != private:
                    continue
                raw = match.group(2).lower()
            else:
                raw = name[len("SERVICE_") :].lower()
            key = _REGISTRATOR.get(raw)
            if key is not None:
                found[key] = (value, name)
            else:
                attrs[raw] = (value, name)
    for specific in (False, True):
        for name, value in container.labels.items():
            if not name.startswith("interknit."):
                continue
            match = _PER_PORT_LABEL.fullmatch(name)
            if match is not None and match.group(2) not in _KNOWN:
                match = None  # e.g. interknit.check.http: not a port
            if (match is not None) != specific:
                continue
            if match is not None:
                if match.group(1) != private:
                    continue
                key = match.group(2)
            else:
                key = name[len("interknit.") :]
            if key in _KNOWN:
                found[key] = (value, name)
    return found, attrs


def service_name(value: str, where: str) -> str:
    """A service name or tag as written in a label, in the registry's spelling: lowercase,
    with ``_`` and ``.`` as ``-`` (what Registrator deployments often used)."""
    name = value.strip().lower().replace("_", "-").replace(".", "-")
    if not is_label(name):
        raise Problem(
            f"{where}={value[:64]!r}: not a DNS label (lowercase letters, digits and '-', "
            "1 to 63 characters)"
        )
    return name


def _duration(value: str, where: str) -> float:
    try:
        seconds = parse_duration(value.strip())
    except ValueError as exc:
        raise Problem(f"{where}: {exc}") from None
    if seconds < 0.01:
        raise Problem(f"{where}: must be at least 10ms")
    # Written the way the registry writes it back, so that a resync finds no difference.
    return parse_duration(format_duration(seconds))


def _check(found: Mapping[str, tuple[str, str]], policy: Policy) -> Check | None:
    interval = DEFAULT_INTERVAL
    if "check.interval" in found:
        value, where = found["check.interval"]
        interval = _duration(value, where)
    after = parse_duration(format_duration(policy.deregister_after))
    if "check.http" in found and found["check.http"][0].strip():
        value, where = found["check.http"]
        path = value.strip()
        if not _PATH.fullmatch(path):
            raise Problem(f"{where}={value[:64]!r}: must be a path starting with '/'")
        return Check(http=path, interval=interval, deregister_after=after)
    if "check.tcp" in found and _truthy(found["check.tcp"][0]):
        return Check(tcp=True, interval=interval, deregister_after=after)
    if policy.ttl:
        ttl = parse_duration(format_duration(policy.ttl))
        return Check(ttl=ttl, deregister_after=after)
    return None


def _address(container: Container, port: Port, policy: Policy) -> tuple[str, int] | None:
    """Where callers reach ``port``; ``None`` when the policy does not register it."""
    if container.network_mode == "host":
        return policy.address, port.private
    if policy.internal:
        networks = dict(container.networks)
        if policy.network is not None:
            address = networks.get(policy.network)
        else:
            address = container.networks[0][1] if container.networks else None
        return None if address is None else (address, port.private)
    if port.host_port is None or port.host_ip is None:
        return None
    return published_address(port.host_ip, policy.address), port.host_port


def image_name(image: str) -> str:
    """Registrator's default service name: the image's base name without its tag."""
    base = image.rsplit("/", 1)[-1]
    return base.split("@", 1)[0].split(":", 1)[0]


def desired(container: Container, policy: Policy) -> tuple[list[Desired], list[str]]:
    """The registrations ``container`` asks for, and the problems found on the way (each a
    sentence naming the label). A container that is not running, or has a health check that
    does not say ``healthy``, asks for none."""
    if not container.running or container.health not in (None, "healthy"):
        return [], []
    whole, _ = _settings(container, None)
    if "ignore" in whole and _truthy(whole["ignore"][0]):
        return [], []
    ports = [p for p in container.ports if p.proto == "tcp"]
    placed = [(p, where) for p in ports if (where := _address(container, p, policy)) is not None]
    out: list[Desired] = []
    problems: list[str] = []
    for port, (address, number) in placed:
        try:
            made = _one(container, port, address, number, len(placed) > 1, policy)
        except Problem as exc:
            problems.append(f"container {container.name} port {port.private}: {exc}")
            continue
        if made is not None:
            out.append(made)
    return out, problems


def _one(
    container: Container,
    port: Port,
    address: str,
    number: int,
    several: bool,
    policy: Policy,
) -> Desired | None:
    found, attrs = _settings(container, port)
    if "ignore" in found and _truthy(found["ignore"][0]):
        return None
    per_port = found.get("service")
    whole = _settings(container, None)[0].get("service")
    if per_port is not None and per_port != whole:
        service = service_name(*per_port)
    elif whole is not None:
        service = service_name(*whole)
        if several:
            service = service_name(f"{service}-{port.private}", whole[1])
    elif policy.explicit:
        return None
    else:
        service = service_name(image_name(container.image) or container.name, "image")
        if several:
            service = service_name(f"{service}-{port.private}", "image")
    if "id" in found and found["id"][0].strip():
        value, where = found["id"]
        instance_id = value.strip()
        if not is_label(instance_id):
            raise Problem(f"{where}={value[:64]!r}: not a DNS label")
    else:
        instance_id = to_label(f"{policy.host}-{container.name}-{port.private}")
    tags: tuple[str, ...] = ()
    if "tags" in found:
        value, where = found["tags"]
        tags = tuple(dict.fromkeys(service_name(t, where) for t in value.split(",") if t.strip()))
        if len(tags) > 64:
            raise Problem(f"{where}: more than 64 tags")
    weight = 1
    if "weight" in found:
        value, where = found["weight"]
        if not (value.strip().isascii() and value.strip().isdigit()) or not 1 <= int(value) <= 1000:
            raise Problem(f"{where}={value[:16]!r}: must be a whole number from 1 to 1000")
        weight = int(value)
    zone = service_name(*found["zone"]) if "zone" in found else None
    region = service_name(*found["region"]) if "region" in found else None
    meta = _meta(attrs.items(), container, policy)
    spec = InstanceSpec(
        address=address,
        port=number,
        zone=zone,
        region=region,
        weight=weight,
        tags=tags,
        meta=tuple(sorted(meta.items())),
        check=_check(found, policy),
    )
    return Desired(service, instance_id, spec, container.id)


def _meta(
    attrs: Iterable[tuple[str, tuple[str, str]]], container: Container, policy: Policy
) -> dict[str, str]:
    meta: dict[str, str] = {}
    for key, (value, where) in attrs:
        if not _META_KEY.fullmatch(key) or len(value) > 512:
            raise Problem(
                f"{where}: meta keys are 1-128 of letters, digits, '_', '.', '-' "
                "and values at most 512 characters"
            )
        meta[key] = value
    meta.update(
        {
            OWNER: policy.owner,
            "container": container.short_id,
            "container_name": container.name[:512],
        }
    )
    if len(meta) > MAX_META:
        raise Problem(f"more than {MAX_META - 3} SERVICE_* attributes")
    return meta


def desired_all(
    containers: Iterable[Container], policy: Policy
) -> tuple[dict[Key, Desired], list[str]]:
    """Every container's registrations by key. Two containers asking for the same key (the
    same ``id`` label) is a problem: the one with the smaller container id keeps it."""
    out: dict[Key, Desired] = {}
    problems: list[str] = []
    for container in sorted(containers, key=lambda c: c.id):
        made, found = desired(container, policy)
        problems += found
        for d in made:
            if d.key in out:
                problems.append(
                    f"container {container.name}: {d.service}/{d.id} is already registered "
                    f"for container {out[d.key].container[:12]}"
                )
                continue
            out[d.key] = d
    return out, problems
