"""Prometheus adapter: every chainwatch series, on one registry. See docs/metrics.md.

Labels are low-cardinality only (chain_id, node, detector, severity, kind): never
hashes, addresses or peer ids.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics

from chainwatch import __version__

# The *_created series double the series count and no dashboard of ours reads them.
disable_created_metrics()

REORG_DEPTH_BUCKETS = (1, 2, 3, 4, 5, 6, 8, 16, 32, 64)
INTERVAL_BUCKETS = (1, 2, 4, 6, 8, 10, 12, 15, 20, 30, 60, 120, 300)
SEVERITIES = ("info", "warning", "critical")
DETECTORS = (
    "reorg_depth", "block_iforest", "node_state", "chain_split", "fork_risk_score",
    "tx_iforest", "sandwich_rule", "sender_burst_rule", "nonce_replacement_spam_rule",
    "miner_share_rule", "miner_surge_rule", "empty_blocks_rule", "timestamp_jump_rule",
    "timestamp_drift_rule", "censorship_rule",
)
SCORE_BUCKETS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 1.0)
NODE_STATES = ("up", "lagging", "stalled", "unreachable")
TX_FATES = ("included", "replaced", "dropped", "requeued")
# records that wait in a collector's bounded outbox (never blocks: they cannot be re-fetched)
OUTBOX_RECORD_TYPES = ("pending_tx", "tx_lifecycle", "mempool_snapshot", "peer_snapshot")
INCLUSION_BUCKETS = (1, 2, 4, 8, 12, 24, 36, 60, 120, 300, 600, 1800, 3600)
COLLECTOR_ERROR_KINDS = ("rpc", "malformed", "bus", "websocket", "internal")
# why a node's answer was unusable (collector.rpc.NodeRpc classifies every failed call)
RPC_ERROR_REASONS = (
    "unreachable", "timeout", "http_status", "invalid_json", "error_response", "malformed",
    "wrong_block",
)


class Metrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        node = ["chain_id", "node"]
        self.build_info = Gauge(
            "chainwatch_build_info", "chainwatch version; always 1.", ["version"], registry=r
        )
        self.build_info.labels(__version__).set(1)
        # chain and node health
        self.head_block_number = Gauge(
            "chainwatch_head_block_number", "Canonical head height per node.", node, registry=r
        )
        self.blocks_observed = Counter(
            "chainwatch_blocks_observed", "Distinct blocks seen per node.", node, registry=r
        )
        self.reorgs = Counter(
            "chainwatch_reorgs", "Chain reorganisations seen per node.", node, registry=r
        )
        self.reorg_depth = Histogram(
            "chainwatch_reorg_depth_blocks",
            "Blocks dropped from the canonical chain per reorg.",
            node,
            buckets=REORG_DEPTH_BUCKETS,
            registry=r,
        )
        self.head_lag = Gauge(
            "chainwatch_head_lag_blocks",
            "Blocks behind the best head seen across nodes of the same chain.",
            node,
            registry=r,
        )
        self.last_block_timestamp = Gauge(
            "chainwatch_last_block_timestamp_seconds",
            "Timestamp in the header of the node's head block (unix seconds).",
            node,
            registry=r,
        )
        self.last_head_seen = Gauge(
            "chainwatch_last_head_seen_timestamp_seconds",
            "When chainwatch observed the node's latest new head (unix seconds).",
            node,
            registry=r,
        )
        self.block_interval = Histogram(
            "chainwatch_block_interval_seconds",
            "Header timestamp difference between a block and its parent.",
            node,
            buckets=INTERVAL_BUCKETS,
            registry=r,
        )
        self.node_state = Gauge(
            "chainwatch_node_state",
            "1 for the node's current state (up, lagging, stalled, unreachable), else 0.",
            [*node, "state"],
            registry=r,
        )
        self.node_state_transitions = Counter(
            "chainwatch_node_state_transitions",
            "Times the node entered each state.",
            [*node, "state"],
            registry=r,
        )
        self.chain_split_blocks = Gauge(
            "chainwatch_chain_split_blocks",
            "Heights two nodes disagree on (0 when they agree).",
            ["chain_id", "node", "other_node"],
            registry=r,
        )
        self.chain_split_point = Gauge(
            "chainwatch_chain_split_point_block_number",
            "Last height two split nodes agree on (-1 when below both windows).",
            ["chain_id", "node", "other_node"],
            registry=r,
        )
        self.chain_splits = Counter(
            "chainwatch_chain_splits", "Chain splits detected between two nodes.", ["chain_id"],
            registry=r,
        )
        # mempool
        self.mempool_pending = Gauge(
            "chainwatch_mempool_pending_transactions",
            "Pending (executable) transactions in the node's mempool.",
            node,
            registry=r,
        )
        self.mempool_queued = Gauge(
            "chainwatch_mempool_queued_transactions",
            "Queued (not yet executable) transactions in the node's mempool.",
            node,
            registry=r,
        )
        self.mempool_senders = Gauge(
            "chainwatch_mempool_senders", "Distinct senders among tracked pending txs.", node,
            registry=r,
        )
        self.mempool_priority_fee = Gauge(
            "chainwatch_mempool_priority_fee_wei",
            "Priority fee percentiles of tracked pending transactions.",
            [*node, "quantile"],
            registry=r,
        )
        self.pending_tx_arrivals = Counter(
            "chainwatch_pending_tx_arrivals",
            "Pending transactions first seen in the node's mempool.",
            node,
            registry=r,
        )
        self.tx_fates = Counter(
            "chainwatch_tx_lifecycle",
            "Fates of followed pending transactions (included, replaced, dropped, requeued).",
            [*node, "fate"],
            registry=r,
        )
        self.tx_inclusion_delay = Histogram(
            "chainwatch_tx_inclusion_delay_seconds",
            "From first seen pending to included in a block.",
            node,
            buckets=INCLUSION_BUCKETS,
            registry=r,
        )
        # peers
        self.peer_count = Gauge(
            "chainwatch_peer_count", "Peers the node reports (net_peerCount).", node, registry=r
        )
        self.peers = Gauge(
            "chainwatch_peers", "Peers by direction (admin_peers).", [*node, "direction"],
            registry=r,
        )
        self.peers_by_client = Gauge(
            "chainwatch_peers_by_client", "Peers by client software (admin_peers).",
            [*node, "client"],
            registry=r,
        )
        self.peer_connects = Counter(
            "chainwatch_peer_connects", "Peers that connected since the previous snapshot.",
            node,
            registry=r,
        )
        self.peer_disconnects = Counter(
            "chainwatch_peer_disconnects",
            "Peers that disconnected since the previous snapshot.",
            node,
            registry=r,
        )
        # models and findings
        self.block_anomaly_score = Gauge(
            "chainwatch_block_anomaly_score",
            "Anomaly score of the node's latest scored block, 0 (normal) to 1.",
            node,
            registry=r,
        )
        self.block_anomaly_threshold = Gauge(
            "chainwatch_block_anomaly_threshold",
            "Score above which a block becomes a finding (from the contamination).",
            ["chain_id"],
            registry=r,
        )
        self.anomaly_score = Histogram(
            "chainwatch_anomaly_score",
            "Scores of everything a model scored, 0 (normal) to 1, by family (block, tx).",
            ["chain_id", "family"],
            buckets=SCORE_BUCKETS,
            registry=r,
        )
        self.anomaly_threshold = Gauge(
            "chainwatch_anomaly_threshold",
            "Score above which a family's model flags (from its contamination).",
            ["chain_id", "family"],
            registry=r,
        )
        self.anomalous_rows = Counter(
            "chainwatch_anomalous_rows",
            "Rows a family's model flagged (above its threshold or past a feature's cut).",
            ["chain_id", "family"],
            registry=r,
        )
        self.transactions_scored = Counter(
            "chainwatch_transactions_scored",
            "Included transactions scored by the transaction model (each once per chain).",
            ["chain_id"],
            registry=r,
        )
        self.fork_risk_score = Gauge(
            "chainwatch_fork_risk_score",
            "Combined fork risk of a node, 0 to 1 (reorgs, lag, splits, intervals, peers).",
            node,
            registry=r,
        )
        self.miner_top_share = Gauge(
            "chainwatch_miner_top_share",
            "Share of the node's recent block window produced by its most frequent miner.",
            node,
            registry=r,
        )
        self.miner_window_hhi = Gauge(
            "chainwatch_miner_window_hhi",
            "Herfindahl index of block producers over the node's recent window (1 = one).",
            node,
            registry=r,
        )
        self.model_fits = Counter(
            "chainwatch_model_fits",
            "Times a live model was (re)fitted.",
            ["chain_id"],
            registry=r,
        )
        self.model_info = Gauge(
            "chainwatch_model_info",
            "1 for each model in use: feature family, model kind and version.",
            ["family", "model", "version"],
            registry=r,
        )
        self.model_last_fit = Gauge(
            "chainwatch_model_last_fit_timestamp_seconds",
            "When the block model was last fitted (unix seconds).",
            ["chain_id"],
            registry=r,
        )
        self.findings = Counter(
            "chainwatch_findings",
            "Findings published, by detector and severity.",
            ["chain_id", "detector", "severity"],
            registry=r,
        )
        # the detector itself
        self.events_processed = Counter(
            "chainwatch_events_processed",
            "Records processed by the detector.",
            ["type"],
            registry=r,
        )
        self.duplicate_events = Counter(
            "chainwatch_duplicate_events",
            "Records dropped as already processed (at-least-once redelivery).",
            ["type"],
            registry=r,
        )
        self.invalid_records = Counter(
            "chainwatch_invalid_records",
            "Messages that were not valid records, sent to the dead-letter topic.",
            ["topic"],
            registry=r,
        )
        self.processing_errors = Counter(
            "chainwatch_processing_errors",
            "Valid records the detector failed to process (sent to the dead-letter topic).",
            ["type"],
            registry=r,
        )
        self.detector_step_errors = Counter(
            "chainwatch_detector_step_errors",
            "Batch-level detector steps (block, tx, miner, fork_risk) that raised; that "
            "step's findings for the batch are lost, the detector goes on.",
            ["step"],
            registry=r,
        )
        self.last_event_processed = Gauge(
            "chainwatch_detector_last_event_timestamp_seconds",
            "When the detector last processed a record (unix seconds).",
            registry=r,
        )
        self.consumer_lag = Gauge(
            "chainwatch_consumer_lag_messages",
            "Messages published but not yet consumed by this detector.",
            registry=r,
        )
        self.alertmanager_sent = Counter(
            "chainwatch_alertmanager_alerts_sent",
            "Per-finding alerts accepted by Alertmanager.",
            registry=r,
        )
        self.alertmanager_errors = Counter(
            "chainwatch_alertmanager_errors",
            "Failed attempts to send per-finding alerts (send) or alerts dropped (queue_full).",
            ["kind"],
            registry=r,
        )
        # collectors (exported by `collect` and `run`)
        self.collector_published = Counter(
            "chainwatch_collector_blocks_published",
            "Blocks the collector published and the bus acknowledged.",
            node,
            registry=r,
        )
        self.collector_checkpoint = Gauge(
            "chainwatch_collector_checkpoint_block_number",
            "Height of the last block acknowledged by the bus and checkpointed.",
            node,
            registry=r,
        )
        self.collector_lag = Gauge(
            "chainwatch_collector_lag_blocks",
            "Node head minus the collector's last delivered block.",
            node,
            registry=r,
        )
        self.collector_errors = Counter(
            "chainwatch_collector_errors",
            "Collector errors by kind (rpc, malformed, bus, websocket, internal).",
            ["node", "kind"],
            registry=r,
        )
        self.rpc_errors = Counter(
            "chainwatch_rpc_errors",
            "Node RPC calls that got no usable answer, by reason.",
            ["node", "reason"],
            registry=r,
        )
        self.collector_reorgs = Counter(
            "chainwatch_collector_reorgs",
            "Reorgs the collector published, by whether it found the common ancestor.",
            [*node, "ancestor"],
            registry=r,
        )
        self.node_up = Gauge(
            "chainwatch_node_up",
            "1 if the node's RPC answered on the last try.",
            node,
            registry=r,
        )
        self.collector_dropped = Counter(
            "chainwatch_collector_records_dropped",
            "Records the collector dropped instead of publishing, by type and reason "
            "(outbox_full: the bus was down until the bounded outbox filled).",
            [*node, "type", "reason"],
            registry=r,
        )
        for kind in ("blocks", "block", "reorg"):
            self.events_processed.labels(kind)
            self.duplicate_events.labels(kind)
        for step in ("block", "tx", "miner", "fork_risk"):
            self.detector_step_errors.labels(step)

    def init_node(self, chain_id: int, node: str) -> None:
        """Pre-create a node's series so rates and absences work from the first scrape."""
        labels = (str(chain_id), node)
        for metric in (self.blocks_observed, self.reorgs, self.block_interval, self.reorg_depth):
            metric.labels(*labels)
        self.head_lag.labels(*labels).set(0)
        for state in NODE_STATES:
            self.node_state.labels(*labels, state).set(0)
            self.node_state_transitions.labels(*labels, state)
        for fate in TX_FATES:
            self.tx_fates.labels(*labels, fate)
        for metric in (self.pending_tx_arrivals, self.peer_connects, self.peer_disconnects,
                       self.tx_inclusion_delay):
            metric.labels(*labels)
        self.chain_splits.labels(str(chain_id))
        for detector in DETECTORS:
            for severity in SEVERITIES:
                self.findings.labels(str(chain_id), detector, severity)
        self.model_fits.labels(str(chain_id))

    def init_collector(self, chain_id: int, node: str) -> None:
        self.collector_published.labels(str(chain_id), node)
        for kind in COLLECTOR_ERROR_KINDS:
            self.collector_errors.labels(node, kind)
        for reason in RPC_ERROR_REASONS:
            self.rpc_errors.labels(node, reason)
        for ancestor in ("found", "unknown"):
            self.collector_reorgs.labels(str(chain_id), node, ancestor)
        for record_type in OUTBOX_RECORD_TYPES:
            self.collector_dropped.labels(str(chain_id), node, record_type, "outbox_full")
