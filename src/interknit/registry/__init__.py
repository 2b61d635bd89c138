"""The service registry: the one source of truth for which instances of which services exist."""
