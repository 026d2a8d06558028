"""The rendered rules are current, valid, and every alert fires exactly at its `for:` boundary.

Each case below is written by hand (input series, the boundary, the exact labels and
annotations expected) and run by `promtool test rules` from Debian's prometheus package.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from alerts.mixin import load_config
from chainwatch.metrics import DETECTORS

ROOT = Path(__file__).resolve().parents[2]
RULES = ROOT / "alerts" / "chainwatch.rules.yaml"
RUNBOOK = "https://github.com/chainwatch/chainwatch/blob/main/docs/runbook.md#"
PROMTOOL = shutil.which("promtool")
needs_promtool = pytest.mark.skipif(PROMTOOL is None, reason="promtool not installed")

N = 'chain_id="1",node="geth-1",job="chainwatch",instance="cw:9108"'
NODE_LABELS = {"chain_id": "1", "node": "geth-1", "job": "chainwatch", "instance": "cw:9108"}
WHERE = "geth-1 (chain 1)"
F = 'chain_id="1",job="chainwatch",instance="cw:9108"'  # chainwatch_findings_total has no node
CHAIN_LABELS = {"chain_id": "1", "job": "chainwatch", "instance": "cw:9108"}


def case(alert, series, boundary_minutes, labels, summary, description, before=None):
    """Not firing one minute before the boundary, firing (exactly so) at it."""
    before = boundary_minutes - 1 if before is None else before
    return {
        "interval": "1m",
        "input_series": [{"series": s, "values": v} for s, v in series],
        "alert_rule_test": [
            {"eval_time": f"{before}m", "alertname": alert, "exp_alerts": []},
            {"eval_time": f"{boundary_minutes}m", "alertname": alert, "exp_alerts": [{
                "exp_labels": labels,
                "exp_annotations": {"summary": summary, "description": description,
                                    "runbook_url": RUNBOOK + alert.lower()},
            }]},
        ],
    }


CASES = [
    case("ChainwatchCollectorDown", [('up{job="chainwatch",instance="cw:9108"}', "1 1 0x10")],
         7, {"severity": "critical", "job": "chainwatch", "instance": "cw:9108"},
         "A chainwatch process is down.",
         "Prometheus cannot scrape cw:9108 (job chainwatch)."),
    case("ChainwatchNodeUnreachable",
         [(f'chainwatch_node_state{{{N},state="unreachable"}}', "0 1x10")], 3,
         {**NODE_LABELS, "state": "unreachable", "severity": "critical"},
         "A followed node does not answer JSON-RPC.",
         f"Node {WHERE} has not answered chainwatch's RPC calls."),
    case("ChainwatchNoNewBlocks", [(f'chainwatch_node_state{{{N},state="stalled"}}', "0 1x10")],
         3, {**NODE_LABELS, "state": "stalled", "severity": "critical"},
         "A node has stopped producing new heads.",
         f"Node {WHERE} has had no new head for longer than its stall limit "
         "(3 x the expected block time by default)."),
    case("ChainwatchNodeLagging", [(f'chainwatch_node_state{{{N},state="lagging"}}', "0 1x10")],
         6, {**NODE_LABELS, "state": "lagging", "severity": "warning"},
         "A node is behind the best head of its chain.",
         f"Node {WHERE} is behind the best head seen across the chain's nodes."),
    case("ChainwatchChainSplit",
         [('chainwatch_chain_split_blocks{chain_id="1",node="a",other_node="b",'
           'job="chainwatch",instance="cw:9108"}', "0 2x10")], 3,
         {"chain_id": "1", "node": "a", "other_node": "b", "job": "chainwatch",
          "instance": "cw:9108", "severity": "warning"},
         "Two nodes disagree on the chain.",
         "Nodes a and b (chain 1) have different blocks at the same height for 2 height(s)."),
    case("ChainwatchPeerCountLow", [(f"chainwatch_peer_count{{{N}}}", "5 2x20")], 11,
         {**NODE_LABELS, "severity": "warning"}, "A node has few peers.",
         f"Node {WHERE} has 2 peer(s)."),
    # rate over 10m of +20/min passes 10/min after 5 minutes (extrapolated): firing at 20m
    case("ChainwatchPeerChurnHigh", [(f"chainwatch_peer_disconnects_total{{{N}}}", "0+20x40")],
         20, {**NODE_LABELS, "severity": "warning"}, "A node is losing peers fast.",
         f"Node {WHERE} loses 20 peers per minute."),
    case("ChainwatchTransactionsDropped",
         [(f'chainwatch_tx_lifecycle_total{{{N},fate="dropped"}}', "0+30x60"),
          (f"chainwatch_pending_tx_arrivals_total{{{N}}}", "0+100x60")], 16,
         {**NODE_LABELS, "severity": "warning"},
         "Many pending transactions are dropped without inclusion.",
         f"On node {WHERE}, 30% of pending transactions are dropped."),
    case("ChainwatchDetectorStalled",
         [('chainwatch_detector_last_event_timestamp_seconds{job="chainwatch",'
           'instance="cw:9108"}', "60 120 180 180x20"),
          ('chainwatch_consumer_lag_messages{job="chainwatch",instance="cw:9108"}', "0x25")],
         11, {"job": "chainwatch", "instance": "cw:9108", "severity": "critical"},
         "A chainwatch detector is not keeping up.",
         "Detector cw:9108 has processed nothing recently or its consumer lag keeps growing."),
    case("ChainwatchModelStale",
         [('chainwatch_model_last_fit_timestamp_seconds{chain_id="1",job="chainwatch",'
           'instance="cw:9108"}', "-86400x60")], 31,
         {"chain_id": "1", "job": "chainwatch", "instance": "cw:9108", "severity": "warning"},
         "An anomaly model has not been refitted for long.",
         "The block model of chain 1 on cw:9108 was last fitted 1d 0h 31m 0s ago."),
    # 0.75 from 1m: warning (0.7 <= score < 0.9) after 3m, never critical
    case("ChainwatchForkRiskHigh", [(f"chainwatch_fork_risk_score{{{N}}}", "0.2 0.75x20")], 4,
         {**NODE_LABELS, "severity": "warning"}, "A node's fork risk is high.",
         f"Node {WHERE} has a fork-risk score of 0.75 (reorgs, head lag, splits, block "
         "intervals, peers and mempool over the last 15 minutes)."),
    # the share is above the limit from 1m, the window holds 20 blocks from 4m: 4m + 15m
    case("ChainwatchMinerDominance",
         [(f"chainwatch_miner_top_share{{{N}}}", "0.3 0.6x30"),
          (f"chainwatch_blocks_observed_total{{{N}}}", "0+5x30"),
          # a node with a dominant producer but too few blocks seen yet: no alert
          ('chainwatch_miner_top_share{chain_id="1",node="new",job="chainwatch",'
           'instance="cw:9108"}', "1x30"),
          ('chainwatch_blocks_observed_total{chain_id="1",node="new",job="chainwatch",'
           'instance="cw:9108"}', "0+1x30")], 19,
         {**NODE_LABELS, "severity": "warning"},
         "One producer makes most of a node's recent blocks.",
         f"On node {WHERE}, one producer made 60% of the last (up to 100) blocks."),
    # a critical surge finding at 3m pages at once (the warning rule has nothing to say)
    case("ChainwatchMinerTakeover",
         [(f'chainwatch_findings_total{{{F},detector="miner_surge_rule",severity="critical"}}',
           "0 0 0 1x40"),
          (f'chainwatch_findings_total{{{F},detector="miner_surge_rule",severity="warning"}}',
           "0x40")], 3,
         {**CHAIN_LABELS, "severity": "critical"},
         "A block producer suddenly makes far more blocks than its history allows.",
         "Chain 1: miner_surge_rule reported a takeover in the last 30m (see the finding "
         "for the producer and its count)."),
    # the outbox overflows at 4m: 250 pending txs lost, alerted at once
    case("ChainwatchCollectorDroppingRecords",
         [(f'chainwatch_collector_records_dropped_total{{{N},type="pending_tx",'
           'reason="outbox_full"}', "0 0 0 0 250x20"),
          (f'chainwatch_collector_records_dropped_total{{{N},type="peer_snapshot",'
           'reason="outbox_full"}', "0x20")], 4,
         {**NODE_LABELS, "type": "pending_tx", "severity": "critical"},
         "A collector is dropping records it could not publish.",
         f"Collector of {WHERE} dropped 250 pending_tx records in the last 10m: its outbox "
         "filled while the bus was unreachable."),
    # the third empty-blocks finding within the hour, at 5m; two censorship findings and
    # block findings (not a miner detector) do not count
    case("ChainwatchMinerBehaviourAnomalous",
         [(f'chainwatch_findings_total{{{F},detector="empty_blocks_rule",severity="warning"}}',
           "0 0 0 1 2 3x60"),
          (f'chainwatch_findings_total{{{F},detector="censorship_rule",severity="warning"}}',
           "0 1 2x60"),
          (f'chainwatch_findings_total{{{F},detector="block_iforest",severity="warning"}}',
           "0+5x60")], 5,
         {**CHAIN_LABELS, "detector": "empty_blocks_rule", "severity": "warning"},
         "Block producers behave abnormally.",
         "Chain 1: 3 empty_blocks_rule findings in the last 1h."),
    # one sender burst a minute: the 15m rate passes 12/h at 4m, firing 15m later; info
    # findings and a slow trickle of sandwiches (6/h) do not count
    case("ChainwatchAbnormalTransactions",
         [(f'chainwatch_findings_total{{{F},detector="sender_burst_rule",severity="warning"}}',
           "0+1x60"),
          (f'chainwatch_findings_total{{{F},detector="tx_iforest",severity="info"}}',
           "0+5x60"),
          (f'chainwatch_findings_total{{{F},detector="sandwich_rule",severity="warning"}}',
           "0+0.1x60")], 19,
         {**CHAIN_LABELS, "detector": "sender_burst_rule", "severity": "warning"},
         "Abnormal transactions keep coming.",
         "Chain 1: sender_burst_rule reports 60 transaction findings per hour "
         "(warning or worse)."),
]

# 0.95: critical only
FORK_RISK_CRITICAL = case(
    "ChainwatchForkRiskHigh", [(f"chainwatch_fork_risk_score{{{N}}}", "0.2 0.95x20")], 4,
    {**NODE_LABELS, "severity": "critical"}, "A node's fork risk is high.",
    f"Node {WHERE} has a fork-risk score of 0.95 (reorgs, head lag, splits, block "
    "intervals, peers and mempool over the last 15 minutes).")

# A depth-3 reorg at 5m: warning (2 <= depth < 6) from the increase() window, never critical.
REORG = {
    "interval": "1m",
    "input_series": [
        {"series": f'chainwatch_reorg_depth_blocks_bucket{{{N},le="1.0"}}', "values": "0x20"},
        {"series": f'chainwatch_reorg_depth_blocks_bucket{{{N},le="5.0"}}',
         "values": "0x4 1x15"},
        {"series": f"chainwatch_reorg_depth_blocks_count{{{N}}}", "values": "0x4 1x15"},
    ],
    "alert_rule_test": [
        {"eval_time": "4m", "alertname": "ChainwatchChainReorg", "exp_alerts": []},
        {"eval_time": "5m", "alertname": "ChainwatchChainReorg", "exp_alerts": [{
            "exp_labels": {**NODE_LABELS, "severity": "warning"},
            "exp_annotations": {
                "summary": "A chain reorganisation of depth 2 or more.",
                "description": f"Node {WHERE} switched branches, dropping 2 or more blocks, "
                               "in the last 10m.",
                "runbook_url": RUNBOOK + "chainwatchchainreorg"}}]},
        {"eval_time": "16m", "alertname": "ChainwatchChainReorg", "exp_alerts": []},
    ],
}
# A depth-8 reorg: critical only.
DEEP_REORG = {
    "interval": "1m",
    "input_series": [
        {"series": f'chainwatch_reorg_depth_blocks_bucket{{{N},le="1.0"}}', "values": "0x20"},
        {"series": f'chainwatch_reorg_depth_blocks_bucket{{{N},le="5.0"}}', "values": "0x20"},
        {"series": f"chainwatch_reorg_depth_blocks_count{{{N}}}", "values": "0x4 1x15"},
    ],
    "alert_rule_test": [
        {"eval_time": "4m", "alertname": "ChainwatchChainReorg", "exp_alerts": []},
        {"eval_time": "5m", "alertname": "ChainwatchChainReorg", "exp_alerts": [{
            "exp_labels": {**NODE_LABELS, "severity": "critical"},
            "exp_annotations": {
                "summary": "A chain reorganisation of depth 6 or more.",
                "description": f"Node {WHERE} switched branches, dropping 6 or more blocks, "
                               "in the last 10m.",
                "runbook_url": RUNBOOK + "chainwatchchainreorg"}}]},
    ],
}

# The pool size against its median of the last hour (a recording rule), 1m samples.
MEMPOOL = 'chainwatch_mempool_pending_transactions{chain_id="1",node="%s",job="chainwatch",' \
          'instance="cw:9108"}'
# 100 pending for an hour, then 400 from 60m: above 3 x the median and the floor of 200 at
# once (the median over 61 samples stays 100 until 90m), firing 10m later. Not firing:
# a quiet devnet pool going from 2 to 50 (25 x its median, below the floor), a node whose
# series starts at 60m already at 5,000 (its baseline is its own short history: no page at
# start-up) and a busy node staying at its level.
MEMPOOL_SURGE = case(
    "ChainwatchMempoolAnomaly",
    [(MEMPOOL % "geth-1", "100x59 400x40"),
     (MEMPOOL % "devnet", "2x59 50x40"),
     (MEMPOOL % "fresh", "_x59 5000x40"),
     (MEMPOOL % "busy", "3000x99")], 70,
    {**NODE_LABELS, "kind": "surge", "severity": "warning"},
    "A node's mempool is far above its usual size.",
    f"Node {WHERE} has 400 pending transactions, more than 3 times its median of the last "
    "1h (100).")
# 1,000 pending for an hour, then 0 from 60m: below 10% of a median of 200 or more at once,
# firing 10m later. A quiet pool (median 20, below the floor) emptying does not count. The
# alert clears at 90m, when the empty pool has become the median.
MEMPOOL_DRAIN = case(
    "ChainwatchMempoolAnomaly",
    [(MEMPOOL % "geth-1", "1000x59 0x40"),
     (MEMPOOL % "devnet", "20x59 0x40")], 70,
    {**NODE_LABELS, "kind": "drain", "severity": "warning"},
    "A node's mempool is far below its usual size.",
    f"Node {WHERE} has 0 pending transactions, less than 10% of its median of the last 1h "
    "(1000).")
MEMPOOL_DRAIN["alert_rule_test"].append(
    {"eval_time": "90m", "alertname": "ChainwatchMempoolAnomaly", "exp_alerts": []})

TESTS = [*CASES, FORK_RISK_CRITICAL, REORG, DEEP_REORG, MEMPOOL_SURGE, MEMPOOL_DRAIN]


def test_rendered_rules_are_up_to_date():
    result = subprocess.run([sys.executable, "-m", "alerts.render", "--check"], cwd=ROOT,
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stdout


def test_every_alert_has_severity_summary_description_and_runbook_section():
    rules = yaml.safe_load(RULES.read_text())
    alerts = [r for g in rules["groups"] for r in g["rules"] if "alert" in r]
    runbook = (ROOT / "docs" / "runbook.md").read_text().lower()
    for rule in alerts:
        assert rule["labels"]["severity"] in ("info", "warning", "critical")
        assert "{{" not in rule["annotations"]["summary"]
        assert "{{" in rule["annotations"]["description"]
        anchor = rule["annotations"]["runbook_url"].split("#")[1]
        assert f"## {anchor}" in runbook, f"docs/runbook.md has no section for {rule['alert']}"


def test_alerts_read_only_recordings_evaluated_before_them_in_their_own_group():
    # Prometheus runs rule groups independently; a recording from another group (or later
    # in the same one) can be one evaluation old when the alert reads it
    rules = yaml.safe_load(RULES.read_text())
    recorded = {r["record"] for g in rules["groups"] for r in g["rules"] if "record" in r}
    read = 0
    for group in rules["groups"]:
        before: set[str] = set()
        for rule in group["rules"]:
            if "record" in rule:
                before.add(rule["record"])
                continue
            names = set(re.findall(r"chainwatch:[a-z0-9_:]+", rule["expr"])) & recorded
            assert names <= before, f"{rule['alert']} reads {names - before} from elsewhere"
            read += len(names)
    assert read > 0  # the mempool alerts read their baseline


def test_every_alert_has_a_promtool_case():
    rules = yaml.safe_load(RULES.read_text())
    names = {r["alert"] for g in rules["groups"] for r in g["rules"] if "alert" in r}
    tested = {t["alert_rule_test"][0]["alertname"] for t in TESTS}
    assert names == tested


def test_finding_alerts_name_only_detectors_the_detector_has():
    alerts = load_config()["alerts"]
    for name in ("ChainwatchMinerBehaviourAnomalous", "ChainwatchAbnormalTransactions"):
        assert set(alerts[name]["detectors"]) <= set(DETECTORS), name


@needs_promtool
def test_promtool_check_rules():
    assert PROMTOOL is not None  # needs_promtool
    result = subprocess.run([PROMTOOL, "check", "rules", str(RULES)], capture_output=True,
                            text=True)
    assert result.returncode == 0, result.stdout + result.stderr


@needs_promtool
def test_promtool_unit_tests_at_the_for_boundaries(tmp_path):
    assert PROMTOOL is not None  # needs_promtool
    shutil.copy(RULES, tmp_path / "rules.yaml")
    # no group_eval_order: promtool then evaluates the groups in a random order, as
    # Prometheus runs them independently. An alert must not read a recording from another
    # group at a boundary (it saw the previous minute's baseline about half the time when
    # the mempool baseline was in the recording group: the drain case's 90m check)
    spec = {"rule_files": ["rules.yaml"], "evaluation_interval": "1m", "tests": TESTS}
    (tmp_path / "tests.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
    result = subprocess.run([PROMTOOL, "test", "rules", "tests.yaml"], cwd=tmp_path,
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
