"""Per-finding alerts pushed to Alertmanager's v2 API (`--alertmanager URL`).

One alert per finding of the chosen severity or worse. Labels stay low-cardinality
(alertname ChainwatchFinding, detector, family, severity, chain_id, node) plus the
finding's id, so two findings never collapse into one alert; everything else (block,
tx hash, miner, explanation) goes into annotations. Each alert carries `endsAt`, so it
resolves by itself. Sending happens on a background thread with bounded retries: a slow
or absent Alertmanager never holds up the detector.
"""

from __future__ import annotations

import json
import logging
import queue
import threading
import time
import urllib.error
import urllib.request
from collections import OrderedDict
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from chainwatch.logs import redact_url
from chainwatch.metrics import Metrics
from chainwatch.schema import Finding

log = logging.getLogger("chainwatch.alertmanager")

SEVERITY_RANK = {"info": 0, "warning": 1, "critical": 2}


def _iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).isoformat().replace("+00:00", "Z")


def finding_to_alert(finding: Finding, ttl: float, runbook_url: str) -> dict[str, Any]:
    annotations = {
        "summary": finding.summary or f"{finding.detector} finding on {finding.node}",
        "description": (
            f"{finding.detector} ({finding.family}) scored {finding.score:.3f} "
            f"(threshold {finding.threshold:.3f}) on {finding.subject_kind} {finding.subject}."
        ),
        "subject_kind": finding.subject_kind,
        "subject": finding.subject,
        "score": f"{finding.score:.3f}",
        "runbook_url": runbook_url,
    }
    if finding.block_number is not None:
        annotations["block"] = str(finding.block_number)
    if finding.subject_kind == "tx":
        annotations["tx_hash"] = finding.subject
    if finding.subject_kind == "miner":
        annotations["miner"] = finding.subject
    if finding.subject_kind == "block":
        annotations["block_hash"] = finding.subject
    if finding.explanation:
        annotations["explanation"] = "; ".join(
            f"{e.feature}={e.value:.4g} (normal {e.normal:.4g}, z={e.deviation:+.1f})"
            for e in finding.explanation
        )
    if finding.model_version:
        annotations["model_version"] = finding.model_version
    return {
        "labels": {
            "alertname": "ChainwatchFinding",
            "detector": finding.detector,
            "family": finding.family,
            "severity": finding.severity,
            "chain_id": str(finding.chain_id),
            "node": finding.node,
            "finding_id": finding.event_id,
        },
        "annotations": annotations,
        "startsAt": _iso(finding.observed_at),
        "endsAt": _iso(finding.observed_at + ttl),
    }


class AlertmanagerSink:
    """A finding sink: call it with each finding; it sends in the background."""

    def __init__(
        self,
        url: str,
        metrics: Metrics,
        *,
        min_severity: str = "warning",
        ttl: float = 3600.0,
        runbook_url: str = "https://github.com/chainwatch/chainwatch/blob/main/docs/runbook.md#chainwatchfinding",
        max_attempts: int = 5,
        backoff: float = 1.0,
        sender: Callable[[str, bytes], None] | None = None,
    ) -> None:
        self.url = url.rstrip("/") + "/api/v2/alerts"
        self.metrics = metrics
        self.min_rank = SEVERITY_RANK[min_severity]
        self.ttl = ttl
        self.runbook_url = runbook_url
        self.max_attempts = max_attempts
        self.backoff = backoff
        self.send = sender or self._post
        self._queue: queue.Queue[Finding | None] = queue.Queue(maxsize=10_000)
        self._sent: OrderedDict[str, None] = OrderedDict()
        self._thread = threading.Thread(target=self._run, name="alertmanager", daemon=True)
        self._thread.start()

    def __call__(self, finding: Finding) -> None:
        if SEVERITY_RANK[finding.severity] < self.min_rank or finding.event_id in self._sent:
            return
        self._sent[finding.event_id] = None  # dedupe: at-least-once input, one alert each
        if len(self._sent) > 100_000:
            self._sent.popitem(last=False)
        try:
            self._queue.put_nowait(finding)
        except queue.Full:
            self.metrics.alertmanager_errors.labels("queue_full").inc()

    def close(self, timeout: float = 5.0) -> None:
        self._queue.put(None)
        self._thread.join(timeout)

    def _post(self, url: str, body: bytes) -> None:
        req = urllib.request.Request(
            url, data=body, method="POST", headers={"Content-Type": "application/json"}
        )
        with urllib.request.urlopen(req, timeout=10) as resp:
            resp.read()

    def _run(self) -> None:
        while True:
            first = self._queue.get()
            if first is None:
                return
            batch = [first]
            while len(batch) < 100:
                try:
                    more = self._queue.get_nowait()
                except queue.Empty:
                    break
                if more is None:
                    self._queue.put(None)
                    break
                batch.append(more)
            body = json.dumps(
                [finding_to_alert(f, self.ttl, self.runbook_url) for f in batch]
            ).encode()
            self._deliver(body, len(batch))

    def _deliver(self, body: bytes, count: int) -> None:
        delay = self.backoff
        for attempt in range(1, self.max_attempts + 1):
            try:
                self.send(self.url, body)
                self.metrics.alertmanager_sent.inc(count)
                return
            except (OSError, urllib.error.URLError) as exc:
                self.metrics.alertmanager_errors.labels("send").inc()
                if attempt == self.max_attempts:
                    log.error("alerts not delivered to Alertmanager",
                              extra={"alertmanager": redact_url(self.url), "alerts": count,
                                     "error": f"{type(exc).__name__}: {exc}"})
                    return
                time.sleep(delay)
                delay = min(delay * 2, 30.0)
