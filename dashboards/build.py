"""Generate chainwatch's Grafana dashboards (JSON), like the monitoring mixins do.

    python -m dashboards.build           # regenerate dashboards/*.json
    python -m dashboards.build --check   # exit 1 if a committed file is out of date

Every dashboard has a `datasource` variable (no hard-coded datasource uid), `chain_id`
and `node` variables, units and descriptions on every panel, alert annotations and a
stable uid. Queries use only metrics documented in docs/metrics.md.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from alerts.mixin import load_config, mempool_baseline_record

ROOT = Path(__file__).resolve().parents[1]
OUT_DIRS = (ROOT / "dashboards", ROOT / "helm" / "chainwatch" / "files" / "dashboards")
DS = {"type": "prometheus", "uid": "${datasource}"}
SEL = 'chain_id=~"$chain_id",node=~"$node"'
CHAIN = 'chain_id=~"$chain_id"'  # series without a node label (findings, models)
TX_DETECTORS = "tx_iforest|sandwich_rule|sender_burst_rule|nonce_replacement_spam_rule"
MINER_DETECTORS = ("miner_share_rule|miner_surge_rule|empty_blocks_rule|timestamp_jump_rule|"
                   "timestamp_drift_rule|censorship_rule")


def variables() -> list[dict[str, Any]]:
    def query_var(name: str, query: str, label: str) -> dict[str, Any]:
        return {
            "name": name, "label": label, "type": "query", "datasource": DS,
            "query": {"query": query, "refId": f"{name}-var"}, "definition": query,
            "refresh": 2, "includeAll": True, "multi": True, "allValue": ".*",
            "current": {"selected": True, "text": ["All"], "value": ["$__all"]},
            "sort": 1,
        }

    return [
        {"name": "datasource", "label": "Data source", "type": "datasource",
         "query": "prometheus", "refresh": 1, "current": {}},
        query_var("chain_id", "label_values(chainwatch_head_block_number, chain_id)", "Chain"),
        query_var("node", 'label_values(chainwatch_head_block_number{chain_id=~"$chain_id"}, node)',
                  "Node"),
    ]


def alert_annotations() -> list[dict[str, Any]]:
    return [
        {"name": "Alerts", "datasource": DS, "enable": True, "iconColor": "red",
         "expr": 'ALERTS{alertname=~"Chainwatch.*",alertstate="firing"}',
         "titleFormat": "{{alertname}}", "textFormat": "{{node}} {{severity}}",
         "step": "60s"},
        {"name": "Reorgs", "datasource": DS, "enable": True, "iconColor": "orange",
         "expr": f"changes(chainwatch_reorgs_total{{{SEL}}}[2m]) > 0",
         "titleFormat": "reorg", "textFormat": "{{node}}", "step": "60s"},
    ]


class Dashboard:
    def __init__(self, uid: str, title: str, description: str) -> None:
        self.uid, self.title, self.description = uid, title, description
        self.panels: list[dict[str, Any]] = []
        self._x = self._y = 0

    def panel(self, title: str, description: str, unit: str, targets: list[tuple[str, str]],
              kind: str = "timeseries", width: int = 12, height: int = 8) -> None:
        if self._x + width > 24:
            self._x, self._y = 0, self._y + height
        panel: dict[str, Any] = {
            "id": len(self.panels) + 1, "type": kind, "title": title,
            "description": description, "datasource": DS,
            "gridPos": {"x": self._x, "y": self._y, "w": width, "h": height},
            "fieldConfig": {"defaults": {"unit": unit}, "overrides": []},
            "options": {},
            "targets": [
                {"refId": chr(ord("A") + i), "expr": expr, "legendFormat": legend,
                 "datasource": DS}
                for i, (expr, legend) in enumerate(targets)
            ],
        }
        if kind == "stat":
            panel["options"] = {"reduceOptions": {"calcs": ["lastNotNull"]}, "colorMode": "value"}
        if kind == "heatmap":  # targets are histogram buckets: one row per `le`
            for target in panel["targets"]:
                target["format"] = "heatmap"
            panel["options"] = {"calculate": False, "yAxis": {"unit": unit},
                                "cellGap": 1, "color": {"scheme": "Oranges"}}
        self.panels.append(panel)
        self._x += width

    def row_break(self) -> None:
        self._x, self._y = 0, self._y + 8

    def json(self) -> dict[str, Any]:
        return {
            "uid": self.uid, "title": self.title, "description": self.description,
            "tags": ["chainwatch"], "timezone": "utc", "editable": True,
            "schemaVersion": 39, "version": 1, "refresh": "30s",
            "time": {"from": "now-6h", "to": "now"},
            "templating": {"list": variables()},
            "annotations": {"list": alert_annotations()},
            "links": [{"title": "chainwatch dashboards", "type": "dashboards",
                       "tags": ["chainwatch"], "asDropdown": True}],
            "panels": self.panels,
        }


def overview() -> Dashboard:
    d = Dashboard("chainwatch-overview", "chainwatch / Overview",
                  "Health of every followed node and of chainwatch itself.")
    d.panel("Head block", "Canonical head height per node.", "none",
            [(f"chainwatch_head_block_number{{{SEL}}}", "{{node}}")], kind="stat", width=8)
    d.panel("Node state", "1 for each node's current state: up, lagging, stalled, unreachable.",
            "none", [(f"chainwatch_node_state{{{SEL}}} == 1", "{{node}}: {{state}}")],
            kind="stat", width=8)
    d.panel("Seconds since last head", "Time since chainwatch saw each node's latest new head.",
            "s", [(f"time() - chainwatch_last_head_seen_timestamp_seconds{{{SEL}}}",
                   "{{node}}")], kind="stat", width=8)
    d.panel("Head lag", "Blocks behind the best head across the chain's nodes.", "none",
            [(f"chainwatch_head_lag_blocks{{{SEL}}}", "{{node}}")])
    d.panel("Findings", "Findings per second by detector and severity.", "ops",
            [('sum by (detector, severity) (rate(chainwatch_findings_total{chain_id=~"$chain_id"}'
              "[5m]))", "{{detector}} {{severity}}")])
    d.panel("Collector errors", "Collector errors per second by node and kind.", "ops",
            [('sum by (node, kind) (rate(chainwatch_collector_errors_total{node=~"$node"}[5m]))',
              "{{node}} {{kind}}")])
    d.panel("Collector lag", "Node head minus the collector's last delivered block.", "none",
            [(f"chainwatch_collector_lag_blocks{{{SEL}}}", "{{node}}")])
    d.panel("Records processed", "Records the detector processed per second, by type.", "ops",
            [("sum by (type) (rate(chainwatch_events_processed_total[5m]))", "{{type}}")])
    d.panel("Detector freshness and lag",
            "Seconds since the detector last processed a record, and its consumer lag.", "s",
            [("time() - chainwatch_detector_last_event_timestamp_seconds", "{{instance}} idle"),
             ("chainwatch_consumer_lag_messages", "{{instance}} lag (messages)")])
    return d


def fork_risk() -> Dashboard:
    d = Dashboard("chainwatch-fork-risk", "chainwatch / Fork risk and nodes",
                  "Reorgs, chain splits, lag and block production per node.")
    d.panel("Reorgs (1h)", "Chain reorganisations in the last hour.", "none",
            [(f"increase(chainwatch_reorgs_total{{{SEL}}}[1h])", "{{node}}")], kind="stat",
            width=8)
    d.panel("Reorg depth p99", "99th percentile of blocks dropped per reorg (6h).", "none",
            [(f"histogram_quantile(0.99, sum by (le, node) "
              f"(increase(chainwatch_reorg_depth_blocks_bucket{{{SEL}}}[6h])))", "{{node}}")],
            kind="stat", width=8)
    d.panel("Chain splits", "Heights two nodes disagree on (0 when they agree).", "none",
            [(f"chainwatch_chain_split_blocks{{{SEL}}}", "{{node}} vs {{other_node}}")],
            kind="stat", width=8)
    d.panel("Fork-risk score", "Combined fork risk per node, 0 to 1, over its last 64 blocks / "
            "15 minutes (reorgs, head lag, splits, block intervals, peers, mempool). Findings "
            "and the ChainwatchForkRiskHigh warning from 0.7, critical from 0.9.", "percentunit",
            [(f"chainwatch_fork_risk_score{{{SEL}}}", "{{node}}")], width=16)
    d.panel("Fork-risk findings (1h)", "fork_risk_score findings in the last hour, by "
            "severity (the findings carry no node: see chainwatch.findings for which one).",
            "none",
            [('sum by (severity) (increase(chainwatch_findings_total{chain_id=~"$chain_id",'
              'detector="fork_risk_score"}[1h]))', "{{severity}}")], kind="stat", width=8)
    d.panel("Block interval p50 / p95", "Header timestamp difference to the parent.", "s",
            [(f"histogram_quantile(0.5, sum by (le, node) "
              f"(rate(chainwatch_block_interval_seconds_bucket{{{SEL}}}[15m])))", "{{node}} p50"),
             (f"histogram_quantile(0.95, sum by (le, node) "
              f"(rate(chainwatch_block_interval_seconds_bucket{{{SEL}}}[15m])))",
              "{{node}} p95")])
    d.panel("Head lag", "Blocks behind the best head across the chain's nodes.", "none",
            [(f"chainwatch_head_lag_blocks{{{SEL}}}", "{{node}}")])
    d.panel("State transitions", "Times each node entered each state (1h).", "none",
            [(f"increase(chainwatch_node_state_transitions_total{{{SEL}}}[1h])",
              "{{node}} {{state}}")])
    d.panel("Block anomaly score", "Isolation-forest score of each node's latest block, "
            "with the finding threshold.", "percentunit",
            [(f"chainwatch_block_anomaly_score{{{SEL}}}", "{{node}}"),
             ('chainwatch_block_anomaly_threshold{chain_id=~"$chain_id"}', "threshold")])
    d.panel("Peers", "Peers per node (net_peerCount).", "none",
            [(f"chainwatch_peer_count{{{SEL}}}", "{{node}}")])
    d.panel("Peer churn", "Peer connects and disconnects per minute.", "none",
            [(f"rate(chainwatch_peer_connects_total{{{SEL}}}[10m]) * 60", "{{node}} connects"),
             (f"rate(chainwatch_peer_disconnects_total{{{SEL}}}[10m]) * 60",
              "{{node}} disconnects")])
    return d


def mempool() -> Dashboard:
    d = Dashboard("chainwatch-mempool", "chainwatch / Mempool and transactions",
                  "Pending transactions, their fates and the fee market per node.")
    d.panel("Pending and queued", "Transactions in each node's pool.", "none",
            [(f"chainwatch_mempool_pending_transactions{{{SEL}}}", "{{node}} pending"),
             (f"chainwatch_mempool_queued_transactions{{{SEL}}}", "{{node}} queued")])
    rules = load_config()  # the alert's thresholds, from the alerts' one config
    anomaly = rules["alerts"]["ChainwatchMempoolAnomaly"]
    baseline = mempool_baseline_record(rules)
    d.panel("Pending vs. usual pool size",
            f"Pending transactions and their median over the last "
            f"{anomaly['baseline_window']} (recording rule {baseline}), the baseline of "
            f"ChainwatchMempoolAnomaly: a surge above {anomaly['surge_factor']} x the median "
            f"(with at least {anomaly['min_pending']} pending), a drain below "
            f"{anomaly['drain_factor'] * 100:g}% of a median of at least "
            f"{anomaly['min_pending']}, for {anomaly['for']}.", "none",
            [(f"chainwatch_mempool_pending_transactions{{{SEL}}}", "{{node}} pending"),
             (f"{baseline}{{{SEL}}}", f"{{{{node}}}} median {anomaly['baseline_window']}")])
    d.panel("Pending arrivals", "New pending transactions per second.", "ops",
            [(f"rate(chainwatch_pending_tx_arrivals_total{{{SEL}}}[5m])", "{{node}}")])
    d.panel("Fates", "Followed transactions per second by fate.", "ops",
            [(f"sum by (node, fate) (rate(chainwatch_tx_lifecycle_total{{{SEL}}}[5m]))",
              "{{node}} {{fate}}")])
    d.panel("Inclusion delay p50 / p95", "First seen pending to included.", "s",
            [(f"histogram_quantile(0.5, sum by (le, node) "
              f"(rate(chainwatch_tx_inclusion_delay_seconds_bucket{{{SEL}}}[15m])))",
              "{{node}} p50"),
             (f"histogram_quantile(0.95, sum by (le, node) "
              f"(rate(chainwatch_tx_inclusion_delay_seconds_bucket{{{SEL}}}[15m])))",
              "{{node}} p95")])
    d.panel("Priority fee percentiles", "Priority fee of followed pending transactions.",
            "none", [(f"chainwatch_mempool_priority_fee_wei{{{SEL}}}",
                      "{{node}} q{{quantile}}")])
    d.panel("Senders", "Distinct senders among followed pending transactions.", "none",
            [(f"chainwatch_mempool_senders{{{SEL}}}", "{{node}}")])
    d.panel("Transaction anomaly scores",
            "Distribution of the transaction model's scores (0 normal, 1 most abnormal): "
            "included transactions scored per 5 minutes, by score bucket.", "percentunit",
            [(f'sum by (le) (increase(chainwatch_anomaly_score_bucket{{{CHAIN},family="tx"}}'
              "[5m]))", "{{le}}")], kind="heatmap")
    d.panel("Transaction score p50 / p99 and threshold",
            "Median and 99th percentile of the transaction model's scores (15m), and the "
            "score above which it flags a transaction (from its contamination).",
            "percentunit",
            [(f"histogram_quantile(0.5, sum by (le, chain_id) "
              f'(rate(chainwatch_anomaly_score_bucket{{{CHAIN},family="tx"}}[15m])))',
              "chain {{chain_id}} p50"),
             (f"histogram_quantile(0.99, sum by (le, chain_id) "
              f'(rate(chainwatch_anomaly_score_bucket{{{CHAIN},family="tx"}}[15m])))',
              "chain {{chain_id}} p99"),
             (f'chainwatch_anomaly_threshold{{{CHAIN},family="tx"}}',
              "chain {{chain_id}} threshold")])
    d.panel("Transactions scored", "Included transactions scored by the transaction model "
            "per second (each once per chain, whichever node delivered its block first).",
            "ops", [(f"rate(chainwatch_transactions_scored_total{{{CHAIN}}}[5m])",
                     "chain {{chain_id}}")])
    d.panel("Transaction findings by detector",
            "Transaction-family findings in the last hour by detector and severity: the "
            "model (tx_iforest), sandwiches, sender bursts, nonce-replacement spam.", "none",
            [(f"sum by (detector, severity) (increase(chainwatch_findings_total{{{CHAIN},"
              f'detector=~"{TX_DETECTORS}"}}[1h]))', "{{detector}} {{severity}}")])
    return d


def miners() -> Dashboard:
    d = Dashboard("chainwatch-miners", "chainwatch / Miners and validators",
                  "Block production as the nodes see it: producer concentration per node, "
                  "intervals, and the miner-behaviour findings.")
    d.panel("Top producer share", "Share of each node's last (up to 100) blocks made by its "
            "most frequent producer. ChainwatchMinerDominance above 50%.", "percentunit",
            [(f"chainwatch_miner_top_share{{{SEL}}}", "{{node}}")])
    d.panel("Producer concentration (HHI)", "Herfindahl index of the producers of each "
            "node's last (up to 100) blocks: sum of squared shares, 1 when one producer "
            "makes every block, 1/n for n equal producers.", "none",
            [(f"chainwatch_miner_window_hhi{{{SEL}}}", "{{node}}")])
    d.panel("Miner findings", "Miner-behaviour findings in the last hour by detector: "
            "dominant producer, empty blocks with a full pool, timestamp jumps, high-fee "
            "transactions left out (censorship hint).", "none",
            [(f"sum by (detector) (increase(chainwatch_findings_total{{{CHAIN},"
              f'detector=~"{MINER_DETECTORS}"}}[1h]))', "{{detector}}")], width=24)
    d.panel("Block interval p50 / p95", "Header timestamp difference to the parent.", "s",
            [(f"histogram_quantile(0.5, sum by (le, node) "
              f"(rate(chainwatch_block_interval_seconds_bucket{{{SEL}}}[15m])))", "{{node}} p50"),
             (f"histogram_quantile(0.95, sum by (le, node) "
              f"(rate(chainwatch_block_interval_seconds_bucket{{{SEL}}}[15m])))",
              "{{node}} p95")])
    d.panel("Blocks per minute", "New distinct blocks per minute per node.", "none",
            [(f"rate(chainwatch_blocks_observed_total{{{SEL}}}[5m]) * 60", "{{node}}")])
    d.panel("Header timestamp vs. wall clock",
            "Seconds between now and the head block's header timestamp.", "s",
            [(f"time() - chainwatch_last_block_timestamp_seconds{{{SEL}}}", "{{node}}")])
    d.panel("Block findings", "Abnormal-block findings per hour.", "none",
            [('sum by (severity) (increase(chainwatch_findings_total{chain_id=~"$chain_id",'
              'detector="block_iforest"}[1h]))', "{{severity}}")])
    d.panel("Model refits", "Block model fits per chain (6h) and age of the current model.",
            "none",
            [('increase(chainwatch_model_fits_total{chain_id=~"$chain_id"}[6h])', "fits"),
             ('time() - chainwatch_model_last_fit_timestamp_seconds{chain_id=~"$chain_id"}',
              "model age (s)")])
    return d


DASHBOARDS = (overview, fork_risk, mempool, miners)


def render_all() -> dict[str, str]:
    return {
        f"{d.uid}.json": json.dumps(d.json(), indent=2, sort_keys=True) + "\n"
        for d in (make() for make in DASHBOARDS)
    }


def main(argv: list[str]) -> int:
    files = render_all()
    if "--check" in argv:
        stale = [d / name for d in OUT_DIRS for name, text in files.items()
                 if not (d / name).exists() or (d / name).read_text() != text]
        for path in stale:
            print(f"out of date: {path.relative_to(ROOT)} (run python -m dashboards.build)")
        return 1 if stale else 0
    for directory in OUT_DIRS:
        directory.mkdir(parents=True, exist_ok=True)
        for name, text in files.items():
            (directory / name).write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
