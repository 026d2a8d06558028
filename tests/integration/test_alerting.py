"""Alerts end to end on real servers: anvil → chainwatch → Prometheus (rendered rules)
→ Alertmanager, and per-finding alerts pushed straight to Alertmanager."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from alerts.mixin import load_config, render
from chainwatch.local.anvil import Anvil
from chainwatch.local.prometheus import AlertmanagerServer, PrometheusServer
from tests.integration.conftest import free_port, metric, rpc, wait_until
from tests.integration.test_spine import LABELS, node_args

pytestmark = pytest.mark.integration


@pytest.fixture
def alertmanager() -> Iterator[AlertmanagerServer]:
    server = AlertmanagerServer()
    try:
        yield server.start()
    finally:
        server.close()


def test_reorg_alert_reaches_alertmanager_and_resolves_and_findings_arrive_as_alerts(
    anvil: Anvil, alertmanager: AlertmanagerServer, chainwatch_procs, tmp_path
) -> None:
    port = free_port()
    chainwatch_procs("run", "run", *node_args(anvil, str(tmp_path / "state")),
                     "--metrics-port", str(port), "--metrics-host", "127.0.0.1",
                     "--alertmanager", alertmanager.url, "--alertmanager-severity", "warning")
    # the project's rules, with a short reorg window so the alert resolves within the test
    rules = render(load_config(ChainwatchChainReorg={"window": "20s"}))
    prometheus = PrometheusServer()
    try:
        prometheus.start([f"127.0.0.1:{port}"], rules, alertmanager)
        rpc(anvil.http_url, "anvil_mine", ["0x8"])
        wait_until(lambda: metric(port, "chainwatch_head_block_number", LABELS) == 8, 30,
                   "chainwatch at block 8")
        wait_until(lambda: prometheus.query('chainwatch_reorgs_total{node="anvil1"}'), 20,
                   "Prometheus to scrape chainwatch")
        rpc(anvil.http_url, "anvil_reorg", [3, []])

        [fired] = wait_until(lambda: alertmanager.alerts(alertname="ChainwatchChainReorg"), 60,
                             "ChainwatchChainReorg in Alertmanager")
        assert fired["labels"]["severity"] == "warning"
        assert fired["labels"]["node"] == "anvil1" and fired["labels"]["chain_id"] == "31337"
        assert fired["annotations"]["runbook_url"].endswith("#chainwatchchainreorg")
        assert "anvil1" in fired["annotations"]["description"]

        [finding] = wait_until(lambda: alertmanager.alerts(alertname="ChainwatchFinding"), 30,
                               "the per-finding alert")
        labels = finding["labels"]
        assert (labels["detector"], labels["family"], labels["severity"]) == (
            "reorg_depth", "fork_risk", "warning")
        assert (labels["chain_id"], labels["node"]) == ("31337", "anvil1")
        assert "reorg of depth 3" in finding["annotations"]["summary"]
        assert finding["annotations"]["block"] == "8"
        assert finding["endsAt"] > finding["startsAt"]
        assert metric(port, "chainwatch_alertmanager_alerts_sent_total") == 1

        wait_until(lambda: not alertmanager.alerts(alertname="ChainwatchChainReorg"), 90,
                   "ChainwatchChainReorg to resolve")
    finally:
        prometheus.close()
