"""A container as the agent needs it, read from the engine's ``GET /containers/{id}/json``.

The engine is another program's output: every field is checked for its type and size, and a
container that does not read is a ``ContainerError`` naming the field, never a crash of the
agent. Only what registration needs is kept: identity, state, health, labels, the
``SERVICE_*`` environment variables Registrator reads, ports and network addresses.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

Health = Literal["starting", "healthy", "unhealthy"]
MAX_ID = 128
MAX_NAME = 255
MAX_LABELS = 1024
MAX_LABEL_KEY = 256
MAX_LABEL_VALUE = 4096
MAX_PORTS = 1024
MAX_NETWORKS = 64
_ID = re.compile(r"[0-9a-f]{12,128}")
_PORT_KEY = re.compile(r"([0-9]{1,5})(?:/(tcp|udp|sctp))?")


class ContainerError(ValueError):
    """The engine described a container in a way the agent cannot read."""


@dataclass(frozen=True, slots=True)
class Port:
    """One port of a container: ``private`` inside it, and where the engine published it on
    the host (``host_ip``/``host_port`` are ``None`` when it is not published)."""

    private: int
    proto: str = "tcp"
    host_ip: str | None = None
    host_port: int | None = None


@dataclass(frozen=True, slots=True)
class Container:
    id: str
    name: str
    image: str = ""
    running: bool = True
    health: Health | None = None  # None: the container has no health check
    labels: Mapping[str, str] = field(default_factory=dict)
    env: Mapping[str, str] = field(default_factory=dict)  # SERVICE_* variables only
    ports: tuple[Port, ...] = ()
    networks: tuple[tuple[str, str], ...] = ()  # (network, address), sorted by network
    network_mode: str = "bridge"

    @property
    def short_id(self) -> str:
        return self.id[:12]


def _str(value: Any, where: str, limit: int, default: str | None = None) -> str:
    if value is None and default is not None:
        return default
    if not isinstance(value, str):
        raise ContainerError(f"{where}: expected a string")
    if len(value) > limit:
        raise ContainerError(f"{where}: longer than {limit} characters")
    return value


def _obj(value: Any, where: str) -> Mapping[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ContainerError(f"{where}: expected an object")
    return value


def _labels(value: Any, where: str) -> dict[str, str]:
    labels = _obj(value, where)
    if len(labels) > MAX_LABELS:
        raise ContainerError(f"{where}: more than {MAX_LABELS} entries")
    out = {}
    for key, item in labels.items():
        out[_str(key, where, MAX_LABEL_KEY)] = _str(item, f"{where}.{key}", MAX_LABEL_VALUE)
    return out


def _env(value: Any) -> dict[str, str]:
    if value is None:
        return {}
    if not isinstance(value, list) or len(value) > MAX_LABELS:
        raise ContainerError(f"Config.Env: expected a list of at most {MAX_LABELS} strings")
    out = {}
    for i, item in enumerate(value):
        text = _str(item, f"Config.Env[{i}]", MAX_LABEL_KEY + MAX_LABEL_VALUE)
        key, sep, rest = text.partition("=")
        if sep and key.startswith("SERVICE_"):
            out[key] = rest
    return out


def _port_key(key: str, where: str) -> tuple[int, str]:
    match = _PORT_KEY.fullmatch(key)
    if match is None or not 0 < int(match.group(1)) < 65536:
        raise ContainerError(f"{where}: {key[:40]!r} is not PORT/PROTOCOL")
    return int(match.group(1)), match.group(2) or "tcp"


def _host_port(value: Any, where: str) -> int | None:
    if value in (None, ""):
        return None
    text = str(value) if isinstance(value, int) else _str(value, where, 8)
    if not (text.isascii() and text.isdigit()) or not 0 < int(text) < 65536:
        raise ContainerError(f"{where}: {text!r} is not a port")
    return int(text)


def _host_ip(value: Any, where: str) -> str:
    text = _str(value, where, 64, default="").strip()
    if text in ("", "0.0.0.0", "::"):
        return text
    try:
        return str(ipaddress.ip_address(text.strip("[]")))
    except ValueError:
        raise ContainerError(f"{where}: {text!r} is not an IP address") from None


def _ports(settings: Mapping[str, Any], config: Mapping[str, Any]) -> tuple[Port, ...]:
    published = _obj(settings.get("Ports"), "NetworkSettings.Ports")
    exposed = _obj(config.get("ExposedPorts"), "Config.ExposedPorts")
    if len(published) + len(exposed) > MAX_PORTS:
        raise ContainerError(f"NetworkSettings.Ports: more than {MAX_PORTS} ports")
    ports: dict[tuple[int, str], Port] = {}
    for key in exposed:
        private, proto = _port_key(str(key), "Config.ExposedPorts")
        ports[private, proto] = Port(private, proto)
    for key, bindings in published.items():
        where = f"NetworkSettings.Ports[{key!r}]"
        private, proto = _port_key(str(key), where)
        chosen: Port = Port(private, proto)
        if bindings is not None:
            if not isinstance(bindings, list) or len(bindings) > 64:
                raise ContainerError(f"{where}: expected a list of bindings")
            found: list[Port] = []
            for i, binding in enumerate(bindings):
                b = _obj(binding, f"{where}[{i}]")
                host_port = _host_port(b.get("HostPort"), f"{where}[{i}].HostPort")
                if host_port is not None:
                    ip = _host_ip(b.get("HostIp"), f"{where}[{i}].HostIp")
                    found.append(Port(private, proto, ip, host_port))
            # Docker publishes "-p 8080:80" twice, on 0.0.0.0 and on ::; IPv4 first.
            found.sort(key=lambda p: ":" in (p.host_ip or ""))
            if found:
                chosen = found[0]
        ports[private, proto] = chosen
    return tuple(ports[k] for k in sorted(ports))


def _networks(settings: Mapping[str, Any]) -> tuple[tuple[str, str], ...]:
    networks = _obj(settings.get("Networks"), "NetworkSettings.Networks")
    if len(networks) > MAX_NETWORKS:
        raise ContainerError(f"NetworkSettings.Networks: more than {MAX_NETWORKS} networks")
    out = []
    for name, value in networks.items():
        net = _obj(value, f"NetworkSettings.Networks[{name!r}]")
        raw = net.get("IPAddress")
        if raw:
            address = _host_ip(raw, f"NetworkSettings.Networks[{name!r}].IPAddress")
            if address:
                out.append((_str(name, "NetworkSettings.Networks", MAX_NAME), address))
    top = settings.get("IPAddress")
    if not out and top:
        out.append(("", _host_ip(top, "NetworkSettings.IPAddress")))
    return tuple(sorted(out))


def parse_inspect(data: Any) -> Container:
    """A ``Container`` from the engine's inspect answer; ``ContainerError`` names the field
    that does not read."""
    top = _obj(data, "container")
    cid = _str(top.get("Id"), "Id", MAX_ID)
    if not _ID.fullmatch(cid):
        raise ContainerError(f"Id: {cid[:40]!r} is not a container id")
    name = _str(top.get("Name"), "Name", MAX_NAME, default="").lstrip("/") or cid[:12]
    state = _obj(top.get("State"), "State")
    config = _obj(top.get("Config"), "Config")
    settings = _obj(top.get("NetworkSettings"), "NetworkSettings")
    host = _obj(top.get("HostConfig"), "HostConfig")
    running = bool(state.get("Running")) and not state.get("Paused") and not state.get("Restarting")
    health: Health | None = None
    raw_health = _obj(state.get("Health"), "State.Health").get("Status")
    if raw_health not in (None, "", "none"):
        if raw_health not in ("starting", "healthy", "unhealthy"):
            raise ContainerError(f"State.Health.Status: {str(raw_health)[:40]!r} is unknown")
        health = raw_health
    return Container(
        id=cid,
        name=name,
        image=_str(config.get("Image"), "Config.Image", MAX_LABEL_VALUE, default=""),
        running=running,
        health=health,
        labels=_labels(config.get("Labels"), "Config.Labels"),
        env=_env(config.get("Env")),
        ports=_ports(settings, config),
        networks=_networks(settings),
        network_mode=_str(host.get("NetworkMode"), "HostConfig.NetworkMode", MAX_NAME, "bridge"),
    )


def parse_list(data: Any) -> list[str]:
    """The ids of the running containers in the engine's ``GET /containers/json`` answer."""
    if not isinstance(data, list):
        raise ContainerError("containers: expected a list")
    ids = []
    for i, item in enumerate(data):
        entry = _obj(item, f"containers[{i}]")
        cid = _str(entry.get("Id"), f"containers[{i}].Id", MAX_ID)
        if not _ID.fullmatch(cid):
            raise ContainerError(f"containers[{i}].Id: {cid[:40]!r} is not a container id")
        ids.append(cid)
    return ids
