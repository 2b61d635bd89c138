"""Names agents make up: DNS labels from host names, container names and ports.

Service names and instance ids must be DNS labels (lowercase letters, digits and ``-``, at most
63 characters) for DNS to answer for them. Container and host names often are not
(``my_app.1``, ``Web``); ``to_label`` spells them as one, and when that changed the text or cut
it short, adds a short hash of the original so that two names that differ only in what was
replaced stay two labels.
"""

from __future__ import annotations

import hashlib
import re
import socket

from interknit.registry.model import is_label

MAX_LABEL = 63
_BAD = re.compile(r"[^a-z0-9-]+")


def to_label(text: str) -> str:
    """``text`` as a DNS label (``x`` for nothing usable)."""
    lowered = text.lower()
    clean = _BAD.sub("-", lowered).strip("-")
    clean = re.sub(r"-{2,}", "-", clean)
    if clean == text and is_label(clean):
        return clean
    digest = hashlib.sha1(text.encode("utf-8", "surrogatepass")).hexdigest()[:6]
    head = clean[: MAX_LABEL - len(digest) - 1].strip("-")
    return f"{head}-{digest}" if head else f"x-{digest}"


def host_label(hostname: str | None = None) -> str:
    """This host's name as a label: its first dot-separated part."""
    name = (hostname or socket.gethostname()).split(".")[0] or "host"
    return to_label(name)
