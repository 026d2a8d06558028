"""Collectors: follow nodes over JSON-RPC and publish records to the bus."""
