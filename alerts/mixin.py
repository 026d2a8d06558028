"""Build Prometheus alerting and recording rules from alerts/config.yaml.

Like the kubernetes/node mixins: selectors, `for:` durations, severities and thresholds
live in one config; this module turns them into plain rule groups. Every alert has a
`severity` label, a static `summary`, a templated `description` and a `runbook_url`
pointing at its section of docs/runbook.md.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

CONFIG_PATH = Path(__file__).with_name("config.yaml")
REORG_BUCKETS = (1, 2, 3, 4, 5, 6, 8, 16, 32, 64)


def load_config(path: Path = CONFIG_PATH, **overrides: Any) -> dict[str, Any]:
    config = yaml.safe_load(path.read_text())
    for name, values in overrides.items():
        config["alerts"][name] = {**config["alerts"][name], **values}
    return config


def _bucket_below(depth: int) -> str:
    """`le` of the histogram bucket that holds every depth below `depth`."""
    if depth - 1 not in REORG_BUCKETS:
        raise ValueError(f"reorg depth {depth}: depth - 1 must be one of {REORG_BUCKETS}")
    return f"{float(depth - 1)}"


def mempool_baseline_record(config: dict[str, Any]) -> str:
    """Name of the recording rule that holds each node's usual pending-pool size."""
    window = config["alerts"]["ChainwatchMempoolAnomaly"]["baseline_window"]
    return f"chainwatch:mempool_pending_transactions:median{window}"


def build_rules(config: dict[str, Any]) -> dict[str, Any]:
    sel = config["selectors"]["chainwatch"]
    a = config["alerts"]
    runbook = config["runbook_url_prefix"]

    def alert(name: str, expr: str, summary: str, description: str,
              **extra_labels: str) -> dict[str, Any]:
        spec = a[name]
        return {
            "alert": name,
            "expr": expr,
            "for": spec["for"],
            "labels": {"severity": extra_labels.pop("severity", spec["severity"]),
                       **extra_labels},
            "annotations": {
                "summary": summary,
                "description": description,
                "runbook_url": f"{runbook}#{name.lower()}",
            },
        }

    reorg = a["ChainwatchChainReorg"]
    split = a["ChainwatchChainSplit"]
    stalled = a["ChainwatchDetectorStalled"]
    mempool = a["ChainwatchMempoolAnomaly"]
    pending = f"chainwatch_mempool_pending_transactions{{{sel}}}"
    baseline = mempool_baseline_record(config)
    # The baseline is recorded per scraped series (job, instance, chain_id, node); the
    # comparisons filter, so $value is the node's pending count. Multiplying the baseline
    # instead of dividing by it: a zero median needs no special case, and the floor
    # (min_pending) is what keeps a quiet pool from counting as a surge.
    per_node = "on(job, instance, chain_id, node)"
    # the node's baseline, for the description (empty if the recording rule is missing)
    usual_pool = (
        f'{{{{ with printf "{baseline}{{job=%q,instance=%q,chain_id=%q,node=%q}}" '
        "$labels.job $labels.instance $labels.chain_id $labels.node | query }}"
        '{{ . | first | value | printf "%.0f" }}{{ end }}'
    )
    where = "{{ $labels.node }} (chain {{ $labels.chain_id }})"
    alerts = [
        alert(
            "ChainwatchCollectorDown",
            f"up{{{sel}}} == 0",
            "A chainwatch process is down.",
            "Prometheus cannot scrape {{ $labels.instance }} (job {{ $labels.job }}).",
        ),
        alert(
            "ChainwatchNodeUnreachable",
            f'chainwatch_node_state{{{sel},state="unreachable"}} == 1',
            "A followed node does not answer JSON-RPC.",
            f"Node {where} has not answered chainwatch's RPC calls.",
        ),
        alert(
            "ChainwatchNoNewBlocks",
            f'chainwatch_node_state{{{sel},state="stalled"}} == 1',
            "A node has stopped producing new heads.",
            f"Node {where} has had no new head for longer than its stall limit "
            "(3 x the expected block time by default).",
        ),
        alert(
            "ChainwatchNodeLagging",
            f'chainwatch_node_state{{{sel},state="lagging"}} == 1',
            "A node is behind the best head of its chain.",
            f"Node {where} is behind the best head seen across the chain's nodes.",
        ),
    ]
    for severity, depth in (("warning", reorg["warning_depth"]),
                            ("critical", reorg["critical_depth"])):
        window = reorg["window"]
        expr = (
            f"(increase(chainwatch_reorg_depth_blocks_count{{{sel}}}[{window}])"
            f" - on(job, instance, chain_id, node) "
            f'increase(chainwatch_reorg_depth_blocks_bucket{{{sel},le="{_bucket_below(depth)}"}}'
            f"[{window}])) > 0"
        )
        if severity == "warning":
            expr += (
                f" unless on(job, instance, chain_id, node) "
                f"(increase(chainwatch_reorg_depth_blocks_count{{{sel}}}[{window}])"
                f" - on(job, instance, chain_id, node) "
                f"increase(chainwatch_reorg_depth_blocks_bucket{{{sel},"
                f'le="{_bucket_below(reorg["critical_depth"])}"}}[{window}])) > 0'
            )
        alerts.append(alert(
            "ChainwatchChainReorg",
            expr,
            f"A chain reorganisation of depth {depth} or more.",
            f"Node {where} switched branches, dropping {depth} or more blocks, in the "
            f"last {window}.",
            severity=severity,
        ))
    for severity, cmp in (("warning", f"> 0 < {split['critical_blocks']}"),
                          ("critical", f">= {split['critical_blocks']}")):
        alerts.append(alert(
            "ChainwatchChainSplit",
            f"chainwatch_chain_split_blocks{{{sel}}} {cmp}",
            "Two nodes disagree on the chain.",
            "Nodes {{ $labels.node }} and {{ $labels.other_node }} (chain "
            "{{ $labels.chain_id }}) have different blocks at the same height for "
            "{{ $value }} height(s).",
            severity=severity,
        ))
    alerts += [
        alert(
            "ChainwatchPeerCountLow",
            f"chainwatch_peer_count{{{sel}}} < {a['ChainwatchPeerCountLow']['min_peers']}",
            "A node has few peers.",
            f"Node {where} has {{{{ $value }}}} peer(s).",
        ),
        alert(
            "ChainwatchPeerChurnHigh",
            f"rate(chainwatch_peer_disconnects_total{{{sel}}}[10m]) * 60 > "
            f"{a['ChainwatchPeerChurnHigh']['disconnects_per_minute']}",
            "A node is losing peers fast.",
            f"Node {where} loses {{{{ $value | humanize }}}} peers per minute.",
        ),
        alert(
            "ChainwatchTransactionsDropped",
            f"sum by (job, instance, chain_id, node) "
            f'(rate(chainwatch_tx_lifecycle_total{{{sel},fate="dropped"}}[15m])) '
            f"/ sum by (job, instance, chain_id, node) "
            f"(rate(chainwatch_pending_tx_arrivals_total{{{sel}}}[15m])) > "
            f"{a['ChainwatchTransactionsDropped']['dropped_ratio']}",
            "Many pending transactions are dropped without inclusion.",
            f"On node {where}, {{{{ $value | humanizePercentage }}}} of pending transactions "
            "are dropped.",
        ),
        alert(
            "ChainwatchMempoolAnomaly",
            f"({pending} >= {mempool['min_pending']}) > {per_node} "
            f"{mempool['surge_factor']} * {baseline}",
            "A node's mempool is far above its usual size.",
            f"Node {where} has {{{{ $value | printf \"%.0f\" }}}} pending transactions, more "
            f"than {mempool['surge_factor']} times its median of the last "
            f"{mempool['baseline_window']} ({usual_pool}).",
            kind="surge",
        ),
        alert(
            "ChainwatchMempoolAnomaly",
            f"{pending} < {per_node} "
            f"{mempool['drain_factor']} * ({baseline} >= {mempool['min_pending']})",
            "A node's mempool is far below its usual size.",
            f"Node {where} has {{{{ $value | printf \"%.0f\" }}}} pending transactions, less "
            f"than {mempool['drain_factor'] * 100:g}% of its median of the last "
            f"{mempool['baseline_window']} ({usual_pool}).",
            kind="drain",
        ),
        alert(
            "ChainwatchDetectorStalled",
            f"(time() - chainwatch_detector_last_event_timestamp_seconds{{{sel}}} > "
            f"{stalled['idle_seconds']} and chainwatch_detector_last_event_timestamp_seconds"
            f"{{{sel}}} > 0) or (chainwatch_consumer_lag_messages{{{sel}}} > "
            f"{stalled['lag_messages']} and deriv(chainwatch_consumer_lag_messages{{{sel}}}[10m])"
            f" > 0)",
            "A chainwatch detector is not keeping up.",
            "Detector {{ $labels.instance }} has processed nothing recently or its consumer "
            "lag keeps growing.",
        ),
        alert(
            "ChainwatchModelStale",
            f"time() - chainwatch_model_last_fit_timestamp_seconds{{{sel}}} > "
            f"{a['ChainwatchModelStale']['max_age_seconds']}",
            "An anomaly model has not been refitted for long.",
            "The block model of chain {{ $labels.chain_id }} on {{ $labels.instance }} was "
            "last fitted {{ $value | humanizeDuration }} ago.",
        ),
    ]
    risk = a["ChainwatchForkRiskHigh"]
    for severity, cmp in (("warning", f">= {risk['warning_score']} < {risk['critical_score']}"),
                          ("critical", f">= {risk['critical_score']}")):
        alerts.append(alert(
            "ChainwatchForkRiskHigh",
            f"chainwatch_fork_risk_score{{{sel}}} {cmp}",
            "A node's fork risk is high.",
            f"Node {where} has a fork-risk score of {{{{ $value | printf \"%.2f\" }}}} "
            "(reorgs, head lag, splits, block intervals, peers and mempool over the last "
            "15 minutes).",
            severity=severity,
        ))
    dominance = a["ChainwatchMinerDominance"]
    miner = a["ChainwatchMinerBehaviourAnomalous"]
    txs = a["ChainwatchAbnormalTransactions"]
    alerts += [
        alert(
            "ChainwatchMinerDominance",
            f"chainwatch_miner_top_share{{{sel}}} > {dominance['max_share']} "
            f"and on(job, instance, chain_id, node) "
            f"chainwatch_blocks_observed_total{{{sel}}} >= {dominance['min_blocks']}",
            "One producer makes most of a node's recent blocks.",
            f"On node {where}, one producer made {{{{ $value | humanizePercentage }}}} of the "
            "last (up to 100) blocks.",
        ),
    ]
    takeover = a["ChainwatchMinerTakeover"]
    for severity in ("warning", "critical"):
        alerts.append(alert(
            "ChainwatchMinerTakeover",
            f"sum by (job, instance, chain_id) (increase(chainwatch_findings_total{{{sel},"
            f'detector="miner_surge_rule",severity="{severity}"}}[{takeover["window"]}])) > 0',
            "A block producer suddenly makes far more blocks than its history allows.",
            f"Chain {{{{ $labels.chain_id }}}}: miner_surge_rule reported a takeover in the "
            f"last {takeover['window']} (see the finding for the producer and its count).",
            severity=severity,
        ))
    dropping = a["ChainwatchCollectorDroppingRecords"]
    alerts += [
        alert(
            "ChainwatchCollectorDroppingRecords",
            f"sum by (job, instance, chain_id, node, type) "
            f"(increase(chainwatch_collector_records_dropped_total{{{sel}}}"
            f"[{dropping['window']}])) > 0",
            "A collector is dropping records it could not publish.",
            f"Collector of {where} dropped {{{{ $value | printf \"%.0f\" }}}} "
            f"{{{{ $labels.type }}}} records in the last {dropping['window']}: its outbox "
            "filled while the bus was unreachable.",
        ),
        alert(
            "ChainwatchMinerBehaviourAnomalous",
            f"sum by (job, instance, chain_id, detector) "
            f"(increase(chainwatch_findings_total{{{sel},"
            f'detector=~"{"|".join(miner["detectors"])}"}}[{miner["window"]}])) '
            f">= {miner['min_findings']}",
            "Block producers behave abnormally.",
            f"Chain {{{{ $labels.chain_id }}}}: {{{{ $value | printf \"%.0f\" }}}} "
            f"{{{{ $labels.detector }}}} findings in the last {miner['window']}.",
        ),
        alert(
            "ChainwatchAbnormalTransactions",
            f"sum by (job, instance, chain_id, detector) "
            f"(rate(chainwatch_findings_total{{{sel},"
            f'detector=~"{"|".join(txs["detectors"])}",severity=~"warning|critical"}}'
            f"[{txs['window']}])) * 3600 > {txs['findings_per_hour']}",
            "Abnormal transactions keep coming.",
            "Chain {{ $labels.chain_id }}: {{ $labels.detector }} reports "
            "{{ $value | humanize }} transaction findings per hour (warning or worse).",
        ),
    ]
    recording = [
        {"record": "chainwatch:head_lag_blocks:max",
         "expr": f"max by (chain_id) (chainwatch_head_lag_blocks{{{sel}}})"},
        {"record": "chainwatch:reorgs:increase1h",
         "expr": f"sum by (chain_id, node) (increase(chainwatch_reorgs_total{{{sel}}}[1h]))"},
        {"record": "chainwatch:findings:rate5m",
         "expr": f"sum by (chain_id, detector, severity) "
                 f"(rate(chainwatch_findings_total{{{sel}}}[5m]))"},
        {"record": "chainwatch:seconds_since_head",
         "expr": f"time() - chainwatch_last_head_seen_timestamp_seconds{{{sel}}}"},
    ]
    # The mempool baseline lives in the alerts group, ahead of the alerts reading it:
    # Prometheus evaluates a group's rules in order but groups independently, so from
    # another group the alert could compare with the baseline of the previous interval.
    # One series per node and scrape target; `max by` drops target labels (pod, ...) and
    # keeps the alert's one-to-one match when a restarted target's old series is still
    # inside the window.
    mempool_baseline = {
        "record": baseline,
        "expr": f"max by (job, instance, chain_id, node) "
                f"(quantile_over_time(0.5, {pending}[{mempool['baseline_window']}]))",
    }
    return {
        "groups": [
            {"name": "chainwatch.rules", "rules": recording},
            {"name": "chainwatch.alerts", "rules": [mempool_baseline, *alerts]},
        ]
    }


def render(config: dict[str, Any]) -> str:
    header = (
        "# Generated by `python -m alerts.render` from alerts/config.yaml. Do not edit.\n"
    )
    return header + yaml.safe_dump(build_rules(config), sort_keys=False, width=200)
