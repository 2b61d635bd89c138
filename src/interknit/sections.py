"""What every component's config section is built of: the strict base model and the value
types that interknit.toml spells alike everywhere (durations, addresses, labels, networks).

Each component keeps its section's model in its own package (``registry/config.py``,
``dns/config.py``, ``proxy/config.py``, ``demand/config.py``); ``interknit/config.py`` only
composes them into the file's shape. A utility: it imports no component.
"""

from __future__ import annotations

import ipaddress
from typing import Annotated, Any

from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict

from interknit.durations import parse_duration
from interknit.names import is_label, parse_hostport


class Section(BaseModel):
    """A config section: unknown keys are errors, values are not coerced, nothing changes."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


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


def _cidr(value: str) -> str:
    try:
        ipaddress.ip_network(value, strict=False)
    except ValueError:
        raise ValueError(f"{value!r} is not a CIDR such as '10.1.0.0/16'") from None
    return value


def _readable_file(value: str) -> str:
    try:
        with open(value, "rb") as f:
            f.read(1)
    except OSError as exc:
        raise ValueError(f"cannot read {value}: {exc.strerror}") from None
    return value


Seconds = Annotated[float, BeforeValidator(_to_seconds)]
HostPort = Annotated[str, AfterValidator(_listen)]  # a listen address: port 0 picks one
Server = Annotated[str, AfterValidator(_server)]  # where to connect: port 1-65535
Label = Annotated[str, AfterValidator(_label)]
Cidr = Annotated[str, AfterValidator(_cidr)]
ReadableFile = Annotated[str, AfterValidator(_readable_file)]
