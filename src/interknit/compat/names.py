"""Consul's names and IDs, and the DNS labels interknit keeps them under.

interknit names services and instances with DNS labels (``search``, ``s1``), so that DNS can
answer for every one. Consul takes more: service names with ``_``, ``.`` or upper case, and IDs
of any printable text, such as Registrator's ``host:container:port``. Those are translated, and
the original is kept in the instance's meta under a ``consul.`` key (Consul's own meta keys
cannot contain a dot, so these never clash with a client's):

* a service name that is a label stays as it is; otherwise it is lowercased with ``_`` and
  ``.`` turned into ``-`` (``My_App`` -> ``my-app``). Anything else that cannot become a label
  is refused.
* an ID that is a label stays as it is; otherwise it becomes a label made of its letters and
  digits and six hex digits of its SHA-256 (``web:8080`` -> ``web-8080-5e1f7a``), so two IDs
  that differ only in punctuation or case never meet.

Answers show the originals: a client that registered ``My_App`` with ID ``web:8080`` reads
back exactly those.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass

from interknit.registry.model import Instance, is_label

META_PREFIX = "consul."
META_ID = "consul.id"
META_SERVICE = "consul.service"
META_CHECK_ID = "consul.check_id"
META_CHECK_NAME = "consul.check_name"
META_WARNING_WEIGHT = "consul.weights_warning"

MAX_NAME = 128
MAX_ID = 256
_NAME = re.compile(r"[A-Za-z0-9_.-]{1,128}")
_ID = re.compile(r"[\x21-\x7e]{1,256}")
_NOT_LABEL = re.compile(r"[^a-z0-9]+")


class Untranslatable(ValueError):
    """A name or ID that cannot be kept; the message says why."""


def service_label(name: str) -> str:
    """The label a Consul service name is kept under; Untranslatable if there is none."""
    if is_label(name):
        return name
    if not _NAME.fullmatch(name):
        raise Untranslatable("must be 1-128 of letters, digits, '-', '_' and '.'")
    label = name.lower().replace("_", "-").replace(".", "-")
    if not is_label(label):
        raise Untranslatable(
            f"{name!r} has no DNS label to be kept under (lowercased with '_' and '.' as '-' "
            "it must start and end with a letter or digit and be at most 63 characters)"
        )
    return label


def instance_label(consul_id: str) -> str:
    """The label a Consul service ID is kept under; Untranslatable for IDs Consul would refuse."""
    if is_label(consul_id):
        return consul_id
    if not _ID.fullmatch(consul_id):
        raise Untranslatable("must be 1-256 printable ASCII characters without spaces")
    digest = hashlib.sha256(consul_id.encode()).hexdigest()[:6]
    base = _NOT_LABEL.sub("-", consul_id.lower()).strip("-")[:56].strip("-")
    return f"{base}-{digest}" if base else f"id-{digest}"


@dataclass(frozen=True, slots=True)
class Identity:
    """An instance as Consul names it."""

    id: str
    name: str
    check_id: str
    check_name: str
    warning_weight: int
    meta: dict[str, str]  # the client's own meta, without the ``consul.`` keys


def identity(inst: Instance) -> Identity:
    meta: dict[str, str] = {}
    kept: dict[str, str] = {}
    for key, value in inst.spec.meta:
        if key.startswith(META_PREFIX):
            kept[key] = value
        else:
            meta[key] = value
    consul_id = kept.get(META_ID, inst.id)
    name = kept.get(META_SERVICE, inst.service)
    warning = kept.get(META_WARNING_WEIGHT, "1")
    return Identity(
        id=consul_id,
        name=name,
        check_id=kept.get(META_CHECK_ID, f"service:{consul_id}"),
        check_name=kept.get(META_CHECK_NAME, f"Service '{name}' check"),
        warning_weight=int(warning) if warning.isascii() and warning.isdigit() else 1,
        meta=meta,
    )
