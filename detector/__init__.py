"""Detectors: consume records, keep per-node state, score, and publish findings."""
