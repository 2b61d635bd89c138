"""``[health]``: how often the node may check an instance, and how many checks it runs a
second in all. ``config.py`` composes this section; nothing here reads TOML.

Any API client may register an instance with an HTTP or TCP check at any host and port, and
the node then checks it: without these two bounds the node is an amplifier (100 instances
registered with a 10 ms interval were 10,000 requests a second from the node, and its CPU).
``min_interval`` is the shortest interval a registration may ask for (the API answers 400
below it); only the operator can lower it, to 100 ms at the least. ``max_checks_per_second``
caps every check the node starts, whatever the intervals add up to; checks beyond it start
late (``interknit_health_checks_throttled_total`` counts them).
"""

from __future__ import annotations

from typing import Annotated

from pydantic import Field

from interknit.sections import Seconds, Section

DEFAULT_MAX_CHECKS_PER_SECOND = 1000


class HealthSection(Section):
    # At most the default interval of a check (2s): a check registered without one is taken.
    min_interval: Annotated[Seconds, Field(ge=0.1, le=2.0)] = 1.0
    max_checks_per_second: Annotated[int, Field(ge=1, le=1_000_000)] = DEFAULT_MAX_CHECKS_PER_SECOND
