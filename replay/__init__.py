"""Replay for analysts: archive the topics, replay history through the live detectors, report.

Pure parts (row mapping, batching and the deterministic clock, report data) do no I/O;
adapters (files, Kafka, HTML/PNG) sit beside them and are wired by `replay.app`.
"""
