"""Other tools' protocols over the registry: Consul's HTTP API subset, Prometheus http_sd."""
