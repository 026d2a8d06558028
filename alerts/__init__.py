"""chainwatch's Prometheus rules, rendered from one configurable source (alerts/config.yaml)."""
