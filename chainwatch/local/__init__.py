"""Real local servers (anvil, Kafka) on 127.0.0.1, started and stopped by PID for tests and
`chainwatch demo`."""
