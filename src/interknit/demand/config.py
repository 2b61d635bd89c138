"""Demand control's part of a route in interknit.toml: ``demand = { ... }``."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, model_validator

from interknit.demand.settings import DemandSettings
from interknit.sections import Seconds, Section


class DemandSection(Section):
    concurrency: Literal["adaptive"] | Annotated[int, Field(ge=1)] | None = None
    limit: Literal["gradient", "aimd", "fixed"] | None = None
    queue: Annotated[int, Field(ge=0)] = 64
    queue_timeout: Seconds = 0.1
    rate: str | None = None
    burst: Annotated[int, Field(ge=1)] | None = None
    rate_key: str | None = None
    client_rate: str | None = None
    client_burst: Annotated[int, Field(ge=1)] | None = None
    client_key: str | None = None
    priority: Literal["critical", "default", "sheddable"] = "default"
    reserve: Annotated[float, Field(ge=0.0, le=0.9)] = 0.1

    @model_validator(mode="after")
    def _settings(self) -> DemandSection:
        # One parser for rates, keys and limits: the one the proxy will use.
        DemandSettings.from_dict(self.model_dump())
        return self
