"""The ``[compat]`` config section: what the Consul-compatible API tells its clients about
this node (docs/compat.md)."""

from __future__ import annotations

import ipaddress
import re
from typing import Annotated

from pydantic import AfterValidator, Field

from interknit.sections import Section

_DATACENTER = re.compile(r"[a-z0-9][a-z0-9_-]{0,62}")
_META_KEY = re.compile(r"[A-Za-z0-9_-]{1,128}")


def _datacenter(value: str) -> str:
    if not _DATACENTER.fullmatch(value):
        raise ValueError("must be 1-63 of lowercase letters, digits, '-' and '_', as Consul's")
    return value


def _ip(value: str) -> str:
    try:
        return str(ipaddress.ip_address(value))
    except ValueError:
        raise ValueError(f"{value!r} is not an IP address") from None


def _node_meta(value: dict[str, str]) -> dict[str, str]:
    for key, item in value.items():
        if not _META_KEY.fullmatch(key):
            raise ValueError(f"key {key[:40]!r} must be 1-128 of letters, digits, '_' and '-'")
        if len(item) > 512:
            raise ValueError(f"value of {key!r} is longer than 512 characters")
    return value


class CompatSection(Section):
    # Serve Consul's HTTP API subset and Prometheus http_sd on the registry's listener.
    enabled: bool = True
    # What Consul clients see as this agent's datacenter (``Config.Datacenter``, ``?dc=``).
    datacenter: Annotated[str, AfterValidator(_datacenter)] = "dc1"
    # The node's address in Consul's answers (``Node.Address``, a registration without an
    # ``Address``); by default the registry's listen address, or 127.0.0.1 when it listens on
    # every address.
    node_address: Annotated[str, AfterValidator(_ip)] | None = None
    # ``Node.Meta`` in answers, which ``?node-meta=`` matches against.
    node_meta: Annotated[dict[str, str], Field(max_length=64), AfterValidator(_node_meta)] = Field(
        default_factory=dict
    )
