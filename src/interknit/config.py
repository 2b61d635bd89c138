"""interknit.toml: every key has a default; an unknown key or a bad value names its full path.

This file only composes (DESIGN.md, "Config"): each component owns its section's model, in
its own package, and this puts them together into the file's shape. Components get plain
values from them; nothing below the node reads TOML.
"""

from __future__ import annotations

import ipaddress
import re
import tomllib
from pathlib import Path
from typing import Any

from pydantic import Field, ValidationError

from interknit.compat.settings import CompatSection
from interknit.dns.config import DnsSection
from interknit.durations import format_duration
from interknit.health.config import HealthSection
from interknit.names import parse_hostport
from interknit.proxy.config import ListenerSection
from interknit.registry.config import RegistrySection, ServiceSection
from interknit.registry.schema import field_path
from interknit.sections import Section
from interknit.vip.config import VipSection

MAX_CONFIG_BYTES = 1024 * 1024


class ConfigError(Exception):
    """A config problem, in one sentence that names the key."""


class NodeSection(Section):
    name: str = "node-1"
    data_dir: str = ".interknit"


class Config(Section):
    node: NodeSection = Field(default_factory=NodeSection)
    registry: RegistrySection = Field(default_factory=RegistrySection)
    dns: DnsSection = Field(default_factory=DnsSection)
    services: list[ServiceSection] = Field(default_factory=list)
    listeners: list[ListenerSection] = Field(default_factory=list)
    compat: CompatSection = Field(default_factory=CompatSection)
    vip: VipSection = Field(default_factory=VipSection)
    health: HealthSection = Field(default_factory=HealthSection)


def loopback(host: str) -> bool:
    """True for an address only this machine can reach (127.0.0.0/8, ::1, localhost)."""
    if host.lower() in ("localhost", "localhost."):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # another host name: it may resolve to anything


def _across_sections(config: Config) -> None:
    """Rules that tie one section to another, each naming the key to change."""
    registry = config.registry
    host, _ = parse_hostport(registry.listen, port_zero=True)
    # Writers are known by a write token, or by a client certificate the API requires.
    known = bool(registry.tokens.write) or (
        registry.tls is not None and registry.tls.verify_client == "required"
    )
    if not loopback(host) and not known and not registry.allow_anonymous_writes:
        raise ConfigError(
            f"registry.listen: {registry.listen} is not a loopback address, and with no "
            "registry.tokens.write anyone who can reach it may register, deregister and drain "
            "instances (and have this node check any host); set registry.tokens.write (or "
            'registry.tls with verify_client = "required"), or '
            "registry.allow_anonymous_writes = true to allow it"
        )
    floor = config.health.min_interval
    for n, service in enumerate(config.services):
        if service.check is None:
            continue
        check = service.check.to_check()
        if check.active and check.interval < floor:
            raise ConfigError(
                f"services[{n}].check.interval: must be at least "
                f"{format_duration(floor)} (health.min_interval)"
            )


# A validator's message may start with the path below the model it checked
# ("routes[1].match.path_prefix: ..."); it is joined to the path pydantic gives.
_INNER_PATH = re.compile(
    r"([A-Za-z_][A-Za-z0-9_]*(?:\[\d+\])*(?:\.[A-Za-z_][A-Za-z0-9_]*(?:\[\d+\])*)*): (.*)", re.S
)


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
    inner = _INNER_PATH.fullmatch(message)
    if inner is not None and path != "config":
        path, message = f"{path}.{inner.group(1)}", inner.group(2)
    return f"{path}: {message}"


def parse_config(data: dict[str, Any]) -> Config:
    try:
        config = Config.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(_describe(exc)) from None
    _across_sections(config)
    return config


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
