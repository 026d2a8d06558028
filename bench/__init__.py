"""Benchmarks: scripts that print figures (see docs/performance.md). Not run by pytest."""
