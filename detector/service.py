"""Feeds the detector engine from the bus: poll, decode, process, publish, flush, commit.

Offsets are committed only after the batch's findings were acknowledged by the bus,
so a crash re-delivers the batch (the engine drops the duplicates by event_id).
Poison messages go to the dead-letter topic and are counted; they never stop the loop.
"""

from __future__ import annotations

import base64
import json
import logging
import threading
import time
from collections.abc import Callable

from chainwatch.bus import Bus, Consumer, Message, Topics
from chainwatch.exceptions import BusError, InvalidRecord
from chainwatch.httpserver import Health
from chainwatch.schema import AnyRecord, Finding, decode, encode
from detector.engine import Detector

log = logging.getLogger("chainwatch.detector")

FindingSink = Callable[[Finding], None]


class DetectorService:
    def __init__(
        self,
        bus: Bus,
        topics: Topics,
        detector: Detector,
        health: Health,
        *,
        group: str = "chainwatch-detector",
        sinks: list[FindingSink] | None = None,
        max_batch: int = 500,
        poll_timeout: float = 0.5,
    ) -> None:
        self.bus = bus
        self.topics = topics
        self.detector = detector
        self.health = health
        self.group = group
        self.sinks = sinks or []
        self.max_batch = max_batch
        self.poll_timeout = poll_timeout
        self.consumer: Consumer | None = None
        self._unsent: list[tuple[str, str | None, bytes]] = []
        self._uncommitted = False

    def subscribe(self) -> Consumer:
        """Join the group before collectors start (the embedded bus needs that order)."""
        if self.consumer is None:
            self.consumer = self.bus.consumer(
                [self.topics.blocks, self.topics.mempool, self.topics.peers], self.group
            )
        return self.consumer

    def handle(self, messages: list[Message]) -> list[Finding]:
        """Decode and process a batch; queue its findings and dead letters for publishing."""
        records: list[AnyRecord] = []
        for message in messages:
            try:
                records.append(decode(message.value))
            except InvalidRecord as exc:
                self._dead_letter(message, str(exc))
        findings = self.detector.process(records)
        for record, reason in self.detector.failed:
            log.error("record failed in the detector, sent to dead-letter topic",
                      extra={"type": record.type, "node": record.node, "reason": reason})
            self.detector.metrics.processing_errors.labels(record.type).inc()
            self._unsent.append(
                (self.topics.deadletter, record.stream_key(),
                 json.dumps({"error": reason, "record": json.loads(encode(record))}).encode())
            )
        for error in self.detector.step_errors:
            log.error("detector step failed; its findings for this batch are lost",
                      extra={"error": error})
        self._queue_findings(findings)
        return findings

    def _queue_findings(self, findings: list[Finding]) -> None:
        for finding in findings:
            self._unsent.append(
                (self.topics.findings, finding.stream_key(), encode(finding))
            )
            for sink in self.sinks:
                sink(finding)

    def _deliver(self, consumer: Consumer) -> None:
        """Publish what is queued, wait for the acks, then commit the consumed offsets.

        On a bus error the queue is kept and this runs again before anything new is
        polled, so neither findings nor dead letters are lost and offsets never pass them.
        """
        for topic, key, value in self._unsent:
            self.bus.publish(topic, key, value)
        self.bus.flush()
        self._unsent.clear()
        consumer.commit()
        self._uncommitted = False

    def _dead_letter(self, message: Message, error: str) -> None:
        self.detector.metrics.invalid_records.labels(message.topic).inc()
        log.warning(
            "invalid record sent to dead-letter topic",
            extra={"topic": message.topic, "partition": message.partition,
                   "offset": message.offset, "reason": error},
        )
        envelope = {
            "source_topic": message.topic,
            "partition": message.partition,
            "offset": message.offset,
            "error": error,
            "payload_base64": base64.b64encode(message.value).decode(),
        }
        self._unsent.append((self.topics.deadletter, message.key, json.dumps(envelope).encode()))

    def run(self, stop: threading.Event) -> None:
        consumer = self.subscribe()
        self.health.set_ready("detector", True)
        backoff = 1.0
        last_lag_check = 0.0
        last_tick = 0.0
        while not stop.is_set():
            self.health.beat("detector")
            try:
                if not self._uncommitted:
                    messages = consumer.poll(self.poll_timeout, self.max_batch)
                    if messages:
                        self.handle(messages)
                        self._uncommitted = True
                if self._uncommitted:
                    self._deliver(consumer)
                now = time.monotonic()
                if now - last_tick >= 1.0:
                    last_tick = now
                    ticked = self.detector.tick()
                    if ticked:
                        self._queue_findings(ticked)
                        self._deliver(consumer)
                if now - last_lag_check > 5:
                    last_lag_check = now
                    lag = consumer.lag()
                    if lag is not None:
                        self.detector.metrics.consumer_lag.set(lag)
                backoff = 1.0
            except BusError as exc:
                # Nothing was committed: the batch comes back after the bus recovers.
                log.error("bus error in detector, retrying", extra={"error": str(exc),
                                                                     "retry_in_s": backoff})
                self.health.set_ready("detector", False)
                stop.wait(backoff)
                backoff = min(backoff * 2, 30.0)
                self.health.set_ready("detector", True)
        consumer.close()
