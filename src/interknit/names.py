"""Names and addresses as operators write them: DNS labels, host names and ``host:port``.

The one place these are read, so that a listen address in the config, a static server of a
route and a static instance of a service accept the same spellings and are refused with the
same words.
"""

from __future__ import annotations

import ipaddress
import re

# A service name, an instance id, a tag-free DNS label: what DNS can answer for.
LABEL_RE = re.compile(r"[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?")
_HOST_LABEL_RE = re.compile(r"[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?")
# "[v6]:port" or "host:port"; the host is checked afterwards, with a message of its own.
_HOSTPORT_RE = re.compile(r"\[([^\[\]]*)\]:([0-9]{1,5})|([^:\[\]]*):([0-9]{1,5})")
MAX_HOSTPORT = 300  # a 253-character host name, brackets and a port, with room to spare


def is_label(value: str) -> bool:
    return LABEL_RE.fullmatch(value) is not None


def is_hostname(value: str) -> bool:
    """RFC 1123 host name (a trailing dot allowed); at most 253 characters. The last label is
    not all digits (RFC 3696 2): ``999.1.1.1`` is a mistyped address, not a name."""
    name = value[:-1] if value.endswith(".") else value
    if not name or len(name) > 253:
        return False
    labels = name.split(".")
    if labels[-1].isdigit():
        return False
    return all(_HOST_LABEL_RE.fullmatch(label) for label in labels)


def parse_hostport(value: str, *, port_zero: bool = False) -> tuple[str, int]:
    """``"127.0.0.1:7470"``, ``"[::1]:7470"`` or ``"name.local:80"`` -> ``(host, port)``.

    The host is an IP address (IPv6 only in brackets) or a host name; the port is 1-65535, or
    0-65535 with ``port_zero`` (a listen address, where 0 asks for a free port). ValueError
    says what is wrong, quoting the value.
    """
    if len(value) > MAX_HOSTPORT:
        raise ValueError(f"{value[:40]!r}...: longer than {MAX_HOSTPORT} characters")
    match = _HOSTPORT_RE.fullmatch(value)
    if match is None:
        if value.count(":") > 1 and not value.startswith("["):
            raise ValueError(f"{value!r}: write an IPv6 address in brackets, as '[::1]:80'")
        raise ValueError(f"{value!r} is not host:port, such as '127.0.0.1:7470'")
    bracketed = match.group(1) is not None
    host = match.group(1) if bracketed else match.group(3)
    port = int(match.group(2) or match.group(4))
    if not host:
        raise ValueError(f"{value!r} has no host")
    low = 0 if port_zero else 1
    if not low <= port <= 65535:
        raise ValueError(f"{value!r}: port must be {low}-65535")
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        if bracketed:
            raise ValueError(f"{value!r}: {host!r} in brackets is not an IPv6 address") from None
        if not is_hostname(host):
            raise ValueError(
                f"{value!r}: {host!r} is neither an IP address nor a host name"
            ) from None
        return host, port
    if bracketed != (address.version == 6):
        raise ValueError(f"{value!r}: only an IPv6 address goes in brackets, as '[::1]:80'")
    return host, port


def format_hostport(host: str, port: int) -> str:
    """``parse_hostport``'s inverse: IPv6 addresses in brackets."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
