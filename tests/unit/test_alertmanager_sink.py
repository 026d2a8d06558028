"""Per-finding alerts: severity filter, one alert per finding, annotations, retries."""

from __future__ import annotations

import json
import time

from chainwatch.alertmanager import AlertmanagerSink, finding_to_alert
from chainwatch.metrics import Metrics
from chainwatch.schema import FeatureDeviation, Finding


def finding(severity: str = "warning", subject_kind: str = "tx", event_id: str = "f1") -> Finding:
    return Finding(
        chain_id=1, node="geth-1", event_id=event_id, observed_at=1_800_000_000.0,
        detector="tx_iforest", family="transactions", severity=severity, score=0.97,
        threshold=0.8, subject_kind=subject_kind, subject="0x" + "ab" * 32, block_number=42,
        explanation=(FeatureDeviation(feature="priority_fee", value=900.0, normal=2.0,
                                      deviation=35.5),),
        summary="abnormal transaction",
    )


def wait_for(predicate, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate() and time.monotonic() < deadline:
        time.sleep(0.01)


def test_alert_labels_stay_low_cardinality_and_details_go_to_annotations():
    alert = finding_to_alert(finding(), ttl=600, runbook_url="https://runbook#x")
    assert alert["labels"] == {
        "alertname": "ChainwatchFinding", "detector": "tx_iforest", "family": "transactions",
        "severity": "warning", "chain_id": "1", "node": "geth-1", "finding_id": "f1"}
    notes = alert["annotations"]
    assert notes["tx_hash"] == "0x" + "ab" * 32 and notes["block"] == "42"
    assert "priority_fee=900" in notes["explanation"]
    assert alert["startsAt"] == "2027-01-15T08:00:00Z"
    assert alert["endsAt"] == "2027-01-15T08:10:00Z"


def test_sink_filters_by_severity_sends_each_finding_once_and_retries():
    sent: list[list[dict]] = []
    attempts = {"n": 0}

    def flaky_sender(url: str, body: bytes) -> None:
        attempts["n"] += 1
        if attempts["n"] == 1:
            raise OSError("connection refused")
        assert url == "http://am:9093/api/v2/alerts"
        sent.append(json.loads(body))

    metrics = Metrics()
    sink = AlertmanagerSink("http://am:9093/", metrics, min_severity="warning", backoff=0.01,
                            sender=flaky_sender)
    sink(finding("info", event_id="i"))  # below the chosen severity
    sink(finding("warning", event_id="w"))
    sink(finding("warning", event_id="w"))  # redelivered: same finding, no second alert
    sink(finding("critical", event_id="c"))
    wait_for(lambda: sum(len(b) for b in sent) == 2)
    sink.close()
    ids = [a["labels"]["finding_id"] for batch in sent for a in batch]
    assert sorted(ids) == ["c", "w"]
    assert metrics.registry.get_sample_value("chainwatch_alertmanager_alerts_sent_total") == 2
    assert metrics.registry.get_sample_value(
        "chainwatch_alertmanager_errors_total", {"kind": "send"}) == 1


def test_sink_gives_up_after_bounded_attempts_without_blocking_the_caller():
    def down(url: str, body: bytes) -> None:
        raise OSError("down")

    metrics = Metrics()
    sink = AlertmanagerSink("http://am:9093", metrics, max_attempts=3, backoff=0.01, sender=down)
    started = time.monotonic()
    sink(finding())
    assert time.monotonic() - started < 0.1  # the detector thread never waits on HTTP
    wait_for(lambda: metrics.registry.get_sample_value(
        "chainwatch_alertmanager_errors_total", {"kind": "send"}) == 3)
    sink.close()
    assert metrics.registry.get_sample_value(
        "chainwatch_alertmanager_errors_total", {"kind": "send"}) == 3
