"""The detector's core: records in, findings out, metrics kept current.

No bus and no HTTP here; `detector.service` feeds it from a consumer. Records are
processed in poll batches so the model scores many blocks in one call.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import partial
from operator import attrgetter
from typing import TYPE_CHECKING, Any

import numpy as np
import polars as pl

from chainwatch.metrics import Metrics
from chainwatch.schema import (
    AnyRecord,
    Block,
    Finding,
    MempoolSnapshot,
    NodeStatus,
    PeerSnapshot,
    PendingTx,
    Reorg,
    Severity,
    TxLifecycle,
)
from detector.families import FamilyConfig, ForkRisk, MinerFamily, TxFamily
from detector.features import (
    BLOCK_FEATURE_MEDIAN_SCALE,
    BLOCK_FEATURE_MIN_SCALE,
    BLOCK_FEATURES,
    BlockRow,
    block_features,
    block_input_frame,
    block_row,
)
from detector.fork_features import split_lengths
from detector.health import HealthConfig, NodeHealth, Split, Transition
from detector.model import BlockAnomalyModel, Scored
from detector.tx_features import TxColumns

if TYPE_CHECKING:
    from chainwatch.settings import Settings
from detector.models import AnomalyDetector
from detector.state import ChainState, SeenIds


@dataclass(frozen=True)
class DetectorConfig:
    warmup_blocks: int = 200
    refit_every_blocks: int = 1000
    history_blocks: int = 5000
    contamination: float = 0.001  # ~1 block in 1,000: the false-finding target
    seed: int = 42
    z_limit: float = 12.0
    # a block finding needs the model's verdict AND one feature this far out (robust z):
    # busy blocks (full, base fee +12.5%) sit at z 4-5 and are normal on a live chain
    block_min_deviation: float = 6.0
    model_kind: str = "iforest"
    reorg_warning_depth: int = 2
    reorg_critical_depth: int = 6
    health: HealthConfig = field(default_factory=HealthConfig)
    split_critical_blocks: int = 3
    families: FamilyConfig = field(default_factory=FamilyConfig)
    # refit live models in a worker process while the next batch goes on (replay; see
    # detector.fit_ahead): the same findings, less waiting
    fit_ahead: bool = False

    @classmethod
    def from_settings(cls, s: Settings) -> DetectorConfig:
        """The detector's tuning from settings: shared by `detect`, `run` and `replay`."""
        return cls(
            warmup_blocks=s.warmup_blocks,
            refit_every_blocks=s.refit_every_blocks,
            contamination=s.contamination,
            reorg_warning_depth=s.reorg_warning_depth,
            reorg_critical_depth=s.reorg_critical_depth,
            model_kind=s.model_kind,
            health=HealthConfig(
                lag_start_blocks=s.lag_start_blocks,
                lag_clear_blocks=s.lag_clear_blocks,
                stall_factor=s.stall_factor,
                default_block_time=s.expected_block_time,
            ),
        )


def observe_all(histogram: Any, values: np.ndarray) -> None:
    """`histogram.observe(v)` for every value, in one step per bucket instead of per value.

    Same counts and the same sum as observing one by one (the sum is accumulated in the
    same order, so even its rounding is the same); falls back to the loop on a client
    whose histograms look different inside.
    """
    bounds = getattr(histogram, "_upper_bounds", None)
    buckets = getattr(histogram, "_buckets", None)
    total = getattr(histogram, "_sum", None)
    if bounds is None or buckets is None or total is None or len(values) < 16:
        for value in values:
            histogram.observe(float(value))
        return
    v = np.asarray(values, dtype=np.float64)
    # observe() counts a value in the first bucket whose bound is >= it (NaN: in none)
    index = np.searchsorted(np.asarray(bounds, dtype=np.float64), v, side="left")
    counts = np.bincount(index, minlength=len(bounds) + 1)
    for bucket, n in zip(buckets, counts[: len(bounds)], strict=True):
        if n:
            bucket.inc(int(n))
    total.set(float(np.cumsum(np.concatenate(([total.get()], v)))[-1]))


class _NodeBlocks:
    """One node's blocks in a batch, as its block metrics need them."""

    __slots__ = ("count", "head_seen", "intervals", "number", "timestamp")

    def __init__(self) -> None:
        self.count = 0
        self.number = 0
        self.timestamp = 0
        self.head_seen: float | None = None
        self.intervals: list[float] = []


class _BlockTally:
    """A batch's block metrics, set once per node at the end of the batch.

    Between two scrapes only a counter's total and a gauge's last value show, so counting
    and keeping the last value per node, then setting each series once, exports the same
    as updating five series per block (~1/4 of the per-block cost on thin blocks).
    """

    def __init__(self) -> None:
        self.nodes: dict[tuple[int, str], _NodeBlocks] = {}

    def add(self, block: Block, new_head: bool, parent_timestamp: int | None) -> None:
        key = (block.chain_id, block.node)  # labels made once per node, at flush
        node = self.nodes.get(key)
        if node is None:
            node = self.nodes[key] = _NodeBlocks()
        node.count += 1
        node.number = block.number
        node.timestamp = block.timestamp
        if new_head:
            node.head_seen = block.observed_at
        if parent_timestamp is not None:
            node.intervals.append(max(block.timestamp - parent_timestamp, 0))

    def flush(self, m: Metrics, series: Callable[..., Any]) -> None:
        for (chain_id, node_name), node in self.nodes.items():
            labels = (str(chain_id), node_name)
            series(m.blocks_observed, *labels).inc(node.count)
            series(m.head_block_number, *labels).set(node.number)
            series(m.last_block_timestamp, *labels).set(node.timestamp)
            if node.head_seen is not None:
                series(m.last_head_seen, *labels).set(node.head_seen)
            if node.intervals:
                observe_all(series(m.block_interval, *labels),
                            np.array(node.intervals, dtype=np.float64))


@dataclass
class _TxRun:
    """One chain's blocks whose transactions wait to be scored together (see
    `Detector.run_blocks`), with each block's time and the batches' tx frames."""

    blocks: list[Block] = field(default_factory=list)
    times: list[float] = field(default_factory=list)
    frames: list[pl.DataFrame | TxColumns] = field(default_factory=list)
    heights: dict[int, str] = field(default_factory=dict)  # height -> the hash it holds
    txs: int = 0

    def add(self, blocks: list[Block], times: list[float],
            frame: pl.DataFrame | TxColumns | None) -> None:
        self.blocks.extend(blocks)
        self.times.extend(times)
        if frame is not None and blocks:
            self.frames.append(frame)
        for b in blocks:
            self.heights.setdefault(b.number, b.hash)
            self.txs += b.tx_count

    def holds_other_block_at(self, blocks: list[Block]) -> bool:
        """A block at a height the run holds another block at (a reorg, a split)."""
        return any(self.heights.get(b.number, b.hash) != b.hash for b in blocks)

    def frame(self) -> pl.DataFrame | None:
        return TxColumns.frame_of(self.frames)


RUN_MAX_TXS = 16_384  # a run is scored once it holds this many txs (~100 mainnet blocks)


@dataclass
class _BlockRun:
    """Blocks whose block-model rows wait to be scored together (see
    `Detector.run_blocks`), each with the stamp its finding gets (`_block_times`)."""

    rows: list[BlockRow] = field(default_factory=list)
    blocks: list[Block] = field(default_factory=list)
    stamps: list[float] = field(default_factory=list)
    held_txs: int = 0  # the blocks' own `transactions`


def _split_by(
    blocks: list[Block], times: list[float], key: Callable[[Block], Any]
) -> dict[Any, tuple[list[Block], list[float]]]:
    """The blocks and their times by `key` (a chain, a node), in order of first
    appearance; a batch of one key (the usual case) is handed on whole, not copied."""
    keys = {key(b) for b in blocks}
    if len(keys) == 1:
        return {keys.pop(): (blocks, times)}
    split: dict[Any, tuple[list[Block], list[float]]] = {}
    for b, t in zip(blocks, times, strict=True):
        group_blocks, group_times = split.setdefault(key(b), ([], []))
        group_blocks.append(b)
        group_times.append(t)
    return split


def _restamped(finding: Finding, at: float | None) -> Finding:
    """The finding observed at `at` (itself when None or already so)."""
    if at is None or at == finding.observed_at:
        return finding
    return finding.model_copy(update={"observed_at": at})


class Detector:
    def __init__(
        self,
        config: DetectorConfig,
        metrics: Metrics,
        clock: Callable[[], float] = time.time,
        pretrained: dict[str, AnomalyDetector] | None = None,
        clock_follows_records: bool = False,
    ) -> None:
        self.config = config
        self.metrics = metrics
        self.clock = clock
        # replay: the clock is the records' own time, so a finding caused by a block is
        # stamped with the clock as it read once that block was in (as when processed
        # one block at a time), not at the end of a batch of hundreds of records
        self.clock_follows_records = clock_follows_records
        self._last_now = float("-inf")  # the clock as last read (process or tick)
        self._block_now: dict[int, float] = {}  # id(block) -> its time, this batch
        self.state = ChainState()
        self.seen = SeenIds()
        self.models: dict[int, BlockAnomalyModel] = {}
        self.tx: dict[int, TxFamily] = {}
        self.miners: dict[tuple[int, str], MinerFamily] = {}
        self.fork_risk: dict[int, ForkRisk] = {}
        self.pretrained = pretrained or {}
        for family, model in self.pretrained.items():
            metrics.model_info.labels(family, model.kind, model.version or "unknown").set(1)
        self.health = NodeHealth(config.health)
        # records whose processing raised: (record, reason), for the caller to dead-letter
        self.failed: list[tuple[AnyRecord, str]] = []
        # batch-level steps (a model, a family) that raised in the last batch, for the log
        self.step_errors: list[str] = []
        self._children: dict[tuple[int, tuple[str, ...]], Any] = {}  # see _series
        # rows each family's model scored and flagged, all chains: against the model's
        # contamination, how well it fits what it sees (replay reports it)
        self.scored_rows: Counter[str] = Counter()
        self.flagged_rows: Counter[str] = Counter()
        # replay only, where nothing watches when a finding comes out (no --speed, --emit,
        # --labels): blocks wait to be scored by the block model and the tx family in
        # runs of up to this many blocks (0: every batch at once). Both cost mostly per
        # call (the tx family ~10 ms), which thin blocks pay 500 blocks at a time
        # otherwise. Only frozen models (trained, --models) are scored so, and
        # transactions only while nothing else reads their family's state (`_defers_txs`):
        # the same findings with the same stamps, out later.
        self.run_blocks = 0
        self._tx_runs: dict[int, _TxRun] = {}
        self._block_run = _BlockRun()
        self._run_findings: list[Finding] = []  # stamped already (see _flush_txs)

    def _series(self, metric: Any, *labels: str) -> Any:
        """`metric.labels(*labels)`, remembered: the per-record metrics took ~3 us per
        labels() call, several per block (no series is ever removed)."""
        key = (id(metric), labels)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = metric.labels(*labels)
        return child

    def model_for(self, chain_id: int) -> BlockAnomalyModel:
        model = self.models.get(chain_id)
        if model is None:
            c = self.config
            model = self.models[chain_id] = BlockAnomalyModel(
                BLOCK_FEATURES,
                warmup=c.warmup_blocks,
                refit_every=c.refit_every_blocks,
                history=c.history_blocks,
                contamination=c.contamination,
                seed=c.seed,
                min_scale=BLOCK_FEATURE_MIN_SCALE,
                median_scale=BLOCK_FEATURE_MEDIAN_SCALE,
                z_limit=c.z_limit,
                kind=c.model_kind,
                pretrained=self.pretrained.get("block"),
                fit_ahead=c.fit_ahead,
            )
        return model

    def tx_family(self, chain_id: int) -> TxFamily:
        family = self.tx.get(chain_id)
        if family is None:
            family = self.tx[chain_id] = TxFamily(
                self.config.families, kind=self.config.model_kind, seed=self.config.seed,
                pretrained=self.pretrained.get("tx"), fit_ahead=self.config.fit_ahead,
            )
        return family

    def miner_family(self, chain_id: int, node: str) -> MinerFamily:
        family = self.miners.get((chain_id, node))
        if family is None:
            family = self.miners[(chain_id, node)] = MinerFamily(self.config.families)
        return family

    def fork_risk_of(self, chain_id: int) -> ForkRisk:
        risk = self.fork_risk.get(chain_id)
        if risk is None:
            risk = self.fork_risk[chain_id] = ForkRisk(self.config.families)
        return risk

    def process(
        self, records: Sequence[AnyRecord], txs: pl.DataFrame | TxColumns | None = None
    ) -> list[Finding]:
        """Apply a batch in order; return the findings it produced (new ones only).

        `txs`: the included transactions of the batch's blocks as one tx frame (or the
        columns to build it from), when the source holds them in columns (replay of an
        archive: its blocks come without `transactions`); see
        `detector.tx_features.included_tx_frame`.
        """
        findings: list[Finding] = []
        rows: list[BlockRow] = []
        block_of_row: list[Block] = []
        touched_chains: set[int] = set()
        pending: dict[int, list[PendingTx]] = {}
        lifecycles: dict[int, list[TxLifecycle]] = {}
        self.failed = []
        self.step_errors = []
        tally = _BlockTally()
        events: Counter[str] = Counter()
        self._block_now = {}
        self._run_findings = []
        latest = self._last_now
        for record in records:
            if isinstance(record, Finding):
                continue  # findings are outputs; other detectors' findings are not inputs
            if record.observed_at > latest:
                latest = record.observed_at
            if not self.seen.add(record.event_id):
                self.metrics.duplicate_events.labels(record.type).inc()
                continue
            events[record.type] += 1
            if (record.chain_id, record.node) not in self.state.nodes:
                self.metrics.init_node(record.chain_id, record.node)
                self.state.node(record.chain_id, record.node)
            touched_chains.add(record.chain_id)
            try:
                if isinstance(record, Block):
                    rows.append(self._on_block(record, tally))
                    block_of_row.append(record)
                    self._block_now[id(record)] = latest
                elif isinstance(record, Reorg):
                    findings.extend(self._on_reorg(record, latest))
                elif isinstance(record, NodeStatus):
                    self.state.apply_status(record)
                else:
                    self._on_mempool_or_peers(record)
                    if isinstance(record, PendingTx):
                        pending.setdefault(record.chain_id, []).append(record)
                    elif isinstance(record, TxLifecycle):
                        lifecycles.setdefault(record.chain_id, []).append(record)
                    elif isinstance(record, MempoolSnapshot):
                        self.miner_family(record.chain_id, record.node).on_snapshot(record)
                        self.fork_risk_of(record.chain_id).add(record)
                    else:
                        self.fork_risk_of(record.chain_id).add(record)
            except Exception as exc:  # a bug must cost one record, never the detector
                self.failed.append((record, f"{type(exc).__name__}: {exc}"))
        for kind, n in events.items():
            self._series(self.metrics.events_processed, kind).inc(n)
        tally.flush(self.metrics, self._series)
        for chain_id in touched_chains:
            for node in self.state.chain_nodes(chain_id):
                self.metrics.head_lag.labels(str(chain_id), node.node).set(
                    self.state.head_lag(chain_id, node.node)
                )
            findings.extend(self._on_splits(chain_id))
        if touched_chains:
            findings.extend(self._on_transitions(self.health.evaluate(self.state, self.clock())))
        if rows and self.run_blocks and self.clock_follows_records and (
                "block" in self.pretrained):  # the frozen block model: rows wait in a run
            run = self._block_run
            now = self.clock()
            run.rows.extend(rows)
            run.blocks.extend(block_of_row)
            run.stamps.extend(self._block_times(block_of_row, now))
            # blocks that carry their transactions (not read in columns) hold them in
            # memory while they wait: a mainnet block's ~150
            run.held_txs += sum(len(b.transactions) for b in block_of_row)
            if len(run.blocks) >= self.run_blocks or run.held_txs >= RUN_MAX_TXS:
                self._run_findings.extend(self._guarded("block", self._flush_blocks))
        elif rows:
            findings.extend(self._guarded("block", lambda: self._score(rows, block_of_row)))
        findings.extend(self._families(touched_chains, block_of_row, pending, lifecycles, txs))
        now = self.clock()
        if records:
            self.metrics.last_event_processed.set(now)
        self._last_now = now
        return self._count(self._stamped(findings, block_of_row, now) + self._run_findings)

    def flush(self) -> list[Finding]:
        """The findings of blocks and transactions still waiting in runs (`run_blocks`):
        replay calls this at its end."""
        now = self.clock()
        findings = self._guarded("block", self._flush_blocks)
        for chain_id in sorted(self._tx_runs):
            findings.extend(self._guarded("tx", partial(self._flush_txs, chain_id, now)))
        return self._count(findings)

    def _block_times(self, blocks: list[Block], now: float) -> list[float]:
        """When a finding about each block of the current batch is stamped: `_record_time`
        of the block, in one pass (it is asked for each block up to three times)."""
        if not self.clock_follows_records:
            return [now] * len(blocks)
        get = self._block_now.get
        return [min(get(id(b), now), now) for b in blocks]

    def _record_time(self, latest: float, now: float) -> float:
        """A finding caused by a record: stamped with the clock as it read once that record
        was in (`latest`) when the clock follows the records (replay), else with `now`."""
        return min(latest, now) if self.clock_follows_records else now

    def _stamped(
        self, findings: list[Finding], blocks: list[Block], now: float
    ) -> list[Finding]:
        """Block and transaction findings about a block of this batch, stamped with the
        time of the delivery that caused them (`_block_times`): a block finding with its
        node's block, a transaction finding with the first block delivered at its height
        (the one its family scored). Neither depends on which other records share the
        batch, so runs (`run_blocks`) stamp the same."""
        if not self.clock_follows_records or not findings or not blocks or not any(
                f.family in ("block", "tx") for f in findings):  # (others keep theirs)
            return findings
        by_block: dict[tuple[int, str, str], float] = {}
        by_height: dict[tuple[int, int], float] = {}
        for b, when in zip(blocks, self._block_times(blocks, now), strict=True):
            by_block.setdefault((b.chain_id, b.node, b.hash), when)
            by_height.setdefault((b.chain_id, b.number), when)
        out: list[Finding] = []
        for f in findings:
            at = (by_block.get((f.chain_id, f.node, f.subject)) if f.family == "block"
                  else by_height.get((f.chain_id, f.block_number))
                  if f.family == "tx" and f.block_number is not None else None)
            out.append(_restamped(f, at))
        return out

    def _families(
        self, chains: set[int], blocks: list[Block], pending: dict[int, list[PendingTx]],
        lifecycles: dict[int, list[TxLifecycle]], txs: pl.DataFrame | TxColumns | None = None,
    ) -> list[Finding]:
        """Transactions, miners and fork risk for the chains this batch touched."""
        now = self.clock()
        # each block's time, read once here for both families rather than by each
        times = self._block_times(blocks, now)
        split = _split_by(blocks, times, attrgetter("chain_id"))
        # every chain touched, also one whose records held no block (its fork risk)
        by_chain = {chain_id: split.get(chain_id, ([], [])) for chain_id in sorted(chains)}
        waits = {chain_id: self._defers_txs(chain_id, chain_blocks, pending.get(chain_id, []),
                                            lifecycles.get(chain_id, []))
                 for chain_id, (chain_blocks, _) in by_chain.items()}
        # built now only if some chain scores its txs now; a chain whose txs wait has no
        # high-fee tx watched, so its miner family does not read the frame either
        frame = txs.frame() if isinstance(txs, TxColumns) and not all(waits.values()) else txs
        now_frame = frame if isinstance(frame, pl.DataFrame) else None
        findings: list[Finding] = []
        for chain_id, (chain_blocks, chain_times) in by_chain.items():
            if waits[chain_id]:
                run = self._tx_runs.setdefault(chain_id, _TxRun())
                run.add(chain_blocks, chain_times, frame)
                if len(run.blocks) >= self.run_blocks or run.txs >= RUN_MAX_TXS:
                    self._run_findings.extend(
                        self._guarded("tx", partial(self._flush_txs, chain_id, now)))
            else:
                if chain_id in self._tx_runs:  # what waits goes first, in order
                    self._run_findings.extend(
                        self._guarded("tx", partial(self._flush_txs, chain_id, now)))
                findings.extend(self._guarded("tx", partial(
                    self._txs, chain_id, chain_blocks, chain_times, pending.get(chain_id, []),
                    lifecycles.get(chain_id, []), now, now_frame)))
            findings.extend(self._guarded("miner", partial(
                self._miners, chain_id, chain_blocks, chain_times, now, now_frame)))
            findings.extend(self._guarded("fork_risk", partial(self._fork_risk, chain_id, now)))
        return findings

    def _defers_txs(
        self, chain_id: int, blocks: list[Block], pending: list[PendingTx],
        lifecycles: list[TxLifecycle],
    ) -> bool:
        """Whether this batch's blocks may wait in the chain's run: the findings come out
        later but the same. Only when nothing else reads the tx family's state meanwhile
        and scoring many blocks at once is what scoring them batch by batch gives: no
        pending txs or lifecycles (the pool state), no high-fee tx watched (the censorship
        rule reads the family's offers every block), a frozen model (a live one refits
        between batches), and no block at a height the run holds another block at (a
        finding's stamp is its height's first block)."""
        if not self.run_blocks or not self.clock_follows_records or pending or lifecycles:
            return False
        family = self.tx_family(chain_id)
        if family.offers or not family.model.frozen:
            return False
        run = self._tx_runs.get(chain_id)
        return run is None or not run.holds_other_block_at(blocks)

    def _flush_blocks(self) -> list[Finding]:
        """Score the waiting block run: its findings, stamped as `_stamped` stamps a
        batch's (they go out with this batch's, past `_stamped`: `_run_findings`)."""
        run, self._block_run = self._block_run, _BlockRun()
        return self._score(run.rows, run.blocks, run.stamps) if run.rows else []

    def _flush_txs(self, chain_id: int, now: float) -> list[Finding]:
        """Score a chain's waiting run: its findings, stamped with their blocks' times as
        `_stamped` stamps a batch's (they go out past `_stamped`: `_run_findings`)."""
        run = self._tx_runs.pop(chain_id, None)
        if run is None or not run.blocks:
            return []
        findings = self._txs(chain_id, run.blocks, run.times, [], [], now, run.frame())
        by_height: dict[int, float] = {}
        for b, when in zip(run.blocks, run.times, strict=True):
            by_height.setdefault(b.number, when)
        return [_restamped(f, by_height.get(f.block_number)
                           if f.block_number is not None else None) for f in findings]

    def _guarded(self, step: str, run: Callable[[], list[Finding]]) -> list[Finding]:
        """A bug in one batch-level step costs that step's findings for this batch only.

        Records are already applied; re-raising would make the consumer re-read the batch
        and fail again forever (a crash loop). Counted and handed to the service to log.
        """
        try:
            return run()
        except Exception as exc:
            self.metrics.detector_step_errors.labels(step).inc()
            self.step_errors.append(f"{step}: {type(exc).__name__}: {exc}")
            return []

    def _txs(
        self, chain_id: int, blocks: list[Block], block_nows: list[float],
        pending: list[PendingTx], lifecycles: list[TxLifecycle], now: float,
        tx_frame: pl.DataFrame | None = None,
    ) -> list[Finding]:
        txs = self.tx_family(chain_id)
        findings = txs.on_pending(pending, now)
        findings.extend(txs.on_lifecycles(lifecycles, now))
        findings.extend(txs.on_blocks(blocks, now, tx_frame, block_nows=block_nows))
        if txs.last_scored is not None:
            self._export_scores(chain_id, "tx", txs.last_scored)
            self.metrics.transactions_scored.labels(str(chain_id)).inc(len(txs.last_scored.scores))
        return findings

    def _miners(
        self, chain_id: int, blocks: list[Block], block_nows: list[float], now: float,
        tx_frame: pl.DataFrame | None = None,
    ) -> list[Finding]:
        findings: list[Finding] = []
        for node, (node_blocks, node_nows) in _split_by(
                blocks, block_nows, attrgetter("node")).items():
            miners = self.miner_family(chain_id, node)
            findings.extend(miners.on_blocks(
                node_blocks, self.tx_family(chain_id), now, tx_frame, block_nows=node_nows))
            self.metrics.miner_top_share.labels(str(chain_id), node).set(miners.top_share)
            self.metrics.miner_window_hhi.labels(str(chain_id), node).set(miners.hhi)
        return findings

    def _fork_risk(self, chain_id: int, now: float) -> list[Finding]:
        nodes = self.state.chain_nodes(chain_id)
        risk = self.fork_risk_of(chain_id)
        findings = risk.evaluate(
            now,
            head_lag={(chain_id, n.node): self.state.head_lag(chain_id, n.node) for n in nodes},
            split_length=split_lengths(
                s for s in self.health.splits.values() if s.chain_id == chain_id
            ),
            heads={(chain_id, n.node): n.head_number for n in nodes},
        )
        for (_, node), score in risk.scores.items():
            self.metrics.fork_risk_score.labels(str(chain_id), node).set(score)
        return findings

    def tick(self) -> list[Finding]:
        """Time-driven checks (a node that stops producing heads sends nothing)."""
        now = self._last_now = self.clock()
        return self._count(self._on_transitions(self.health.evaluate(self.state, now)))

    def _count(self, findings: list[Finding]) -> list[Finding]:
        fresh = [f for f in findings if self.seen.add(f.event_id)]
        for f in fresh:
            self.metrics.findings.labels(str(f.chain_id), f.detector, f.severity).inc()
        return fresh

    def _on_transitions(self, transitions: list[Transition]) -> list[Finding]:
        findings: list[Finding] = []
        for t in transitions:
            labels = (str(t.chain_id), t.node)
            if t.old is not None:
                self.metrics.node_state.labels(*labels, t.old).set(0)
            self.metrics.node_state.labels(*labels, t.new).set(1)
            self.metrics.node_state_transitions.labels(*labels, t.new).inc()
            if t.new == "up":
                continue
            since = f"{t.seconds_since_head:.0f}s" if t.seconds_since_head is not None else "n/a"
            detail = {
                "lagging": f"{t.lag} blocks behind the best head",
                "stalled": f"no new head for {since}",
                "unreachable": "the collector cannot reach its RPC endpoint",
            }[t.new]
            now = self.clock()
            head = self.state.node(t.chain_id, t.node).head_number
            findings.append(
                Finding(
                    chain_id=t.chain_id,
                    node=t.node,
                    # the state and the head it happened at, not the clock: re-evaluated
                    # after a crash, the same transition gets the same id (counted once)
                    event_id=Finding.id_for(t.chain_id, t.node, "node_state", f"{t.new}@{head}"),
                    observed_at=now,
                    detector="node_state",
                    family="fork_risk",
                    severity="critical" if t.new == "unreachable" else "warning",
                    score=1.0,
                    threshold=1.0,
                    subject_kind="node",
                    subject=t.node,
                    block_number=head,
                    summary=f"node {t.node} is {t.new} (was {t.old or 'unknown'}): {detail}",
                )
            )
        return findings

    def _on_splits(self, chain_id: int) -> list[Finding]:
        new, _resolved = self.health.update_splits(self.state, chain_id)
        nodes = self.state.chain_nodes(chain_id)
        for i, a in enumerate(nodes):  # every pair has a series: 0 while they agree
            for b in nodes[i + 1 :]:
                split = self.health.splits.get((chain_id, a.node, b.node))
                labels = (str(chain_id), a.node, b.node)
                self.metrics.chain_split_blocks.labels(*labels).set(split.length if split else 0)
                if split is not None:
                    point = split.split_point if split.split_point is not None else -1
                    self.metrics.chain_split_point.labels(*labels).set(point)
        findings: list[Finding] = []
        for split in new:
            self.metrics.chain_splits.labels(str(chain_id)).inc()
            findings.append(self._split_finding(split))
        return findings

    def _split_finding(self, split: Split) -> Finding:
        c = self.config
        where = (
            f"diverging from height {split.first_diverging_height}"
            if split.split_point is not None
            else "diverging below both windows"
        )
        subject = f"{split.node}|{split.other}"
        now = self.clock()
        return Finding(
            chain_id=split.chain_id,
            node=split.node,
            # where the chains diverge, not the clock: the same split keeps its id
            event_id=Finding.id_for(split.chain_id, split.node, "chain_split",
                                    f"{subject}@{split.first_diverging_height}"),
            observed_at=now,
            detector="chain_split",
            family="fork_risk",
            severity="critical" if split.length >= c.split_critical_blocks else "warning",
            score=min(split.length / c.split_critical_blocks, 1.0),
            threshold=min(1 / c.split_critical_blocks, 1.0),
            subject_kind="node",
            subject=subject,
            block_number=split.first_diverging_height,
            summary=(
                f"chain split between {split.node} and {split.other}: {split.length} block(s) "
                f"{where}, last common block {split.split_point}"
            ),
        )

    def _on_mempool_or_peers(
        self, record: PendingTx | MempoolSnapshot | TxLifecycle | PeerSnapshot
    ) -> None:
        m = self.metrics
        labels = (str(record.chain_id), record.node)
        if isinstance(record, PendingTx):
            m.pending_tx_arrivals.labels(*labels).inc()
        elif isinstance(record, TxLifecycle):
            m.tx_fates.labels(*labels, record.fate).inc()
            if record.fate == "included" and record.inclusion_delay_seconds is not None:
                m.tx_inclusion_delay.labels(*labels).observe(record.inclusion_delay_seconds)
        elif isinstance(record, MempoolSnapshot):
            m.mempool_pending.labels(*labels).set(record.pending_count)
            if record.queued_count is not None:
                m.mempool_queued.labels(*labels).set(record.queued_count)
            m.mempool_senders.labels(*labels).set(record.sender_count)
            for quantile, value in (
                ("0.5", record.priority_fee_p50),
                ("0.9", record.priority_fee_p90),
                ("0.99", record.priority_fee_p99),
            ):
                if value is not None:
                    m.mempool_priority_fee.labels(*labels, quantile).set(value)
        else:
            m.peer_count.labels(*labels).set(record.peer_count)
            if record.detailed:
                if record.inbound is not None and record.outbound is not None:
                    m.peers.labels(*labels, "inbound").set(record.inbound)
                    m.peers.labels(*labels, "outbound").set(record.outbound)
                for client, count in record.clients.items():
                    m.peers_by_client.labels(*labels, client).set(count)
                m.peer_connects.labels(*labels).inc(len(record.connected))
                m.peer_disconnects.labels(*labels).inc(len(record.disconnected))

    def _on_block(self, block: Block, tally: _BlockTally) -> BlockRow:
        update = self.state.apply_block(block)
        self.fork_risk_of(block.chain_id).add(block)
        tally.add(block, update.new_head, update.parent_timestamp)
        return block_row(block, update)

    def _on_reorg(self, reorg: Reorg, latest: float) -> list[Finding]:
        """`latest`: the clock as it read once the reorg was in (replay), see
        `_record_time`."""
        self.state.apply_reorg(reorg)
        self.fork_risk_of(reorg.chain_id).add(reorg)
        labels = (str(reorg.chain_id), reorg.node)
        self.metrics.reorgs.labels(*labels).inc()
        self.metrics.reorg_depth.labels(*labels).observe(reorg.depth)
        c = self.config
        # an ancestor beyond the collector's reach means a depth we cannot even measure
        severity: Severity = (
            "critical"
            if reorg.depth >= c.reorg_critical_depth or not reorg.ancestor_found
            else "warning"
            if reorg.depth >= c.reorg_warning_depth
            else "info"
        )
        ancestor = (
            f"common ancestor {reorg.common_ancestor_number}"
            if reorg.ancestor_found
            else "common ancestor deeper than the reorg limit"
        )
        return [
            Finding(
                chain_id=reorg.chain_id,
                node=reorg.node,
                event_id=Finding.id_for(reorg.chain_id, reorg.node, "reorg_depth", reorg.event_id),
                observed_at=self._record_time(latest, self.clock()),
                detector="reorg_depth",
                family="fork_risk",
                severity=severity,
                score=min(reorg.depth / c.reorg_critical_depth, 1.0),
                threshold=min(c.reorg_warning_depth / c.reorg_critical_depth, 1.0),
                subject_kind="node",
                subject=reorg.node,
                block_number=reorg.new_head_number,
                summary=(
                    f"reorg of depth {reorg.depth} on {reorg.node}: head "
                    f"{reorg.old_head_number} -> {reorg.new_head_number}, {ancestor}"
                ),
            )
        ]

    def _score(
        self, rows: list[BlockRow], blocks: list[Block],
        stamps: list[float] | None = None,
    ) -> list[Finding]:
        """The block model's findings; `stamps`: each row's finding time (else the
        clock's, which `_stamped` then replaces)."""
        frame = block_input_frame(rows)
        features = block_features(frame)
        complete = features.select(
            pl.all_horizontal(pl.col(list(BLOCK_FEATURES)).is_not_null()).alias("ok")
        )["ok"].to_numpy()
        matrix = features.select(BLOCK_FEATURES).to_numpy()
        findings: list[Finding] = []
        by_chain: dict[int, list[int]] = {}
        if len({b.chain_id for b in blocks}) == 1:  # the usual case: one chain
            by_chain[blocks[0].chain_id] = np.flatnonzero(complete).tolist()
        else:
            for i, block in enumerate(blocks):
                if complete[i]:
                    by_chain.setdefault(block.chain_id, []).append(i)
        c = self.config
        for chain_id, idx in by_chain.items():
            model = self.model_for(chain_id)
            x = matrix[idx]
            scored = model.score(x)
            if scored is not None:
                self.metrics.block_anomaly_threshold.labels(str(chain_id)).set(scored.threshold)
                self._export_scores(chain_id, "block", scored)
                far = scored.max_z >= c.block_min_deviation
                for j in np.flatnonzero(scored.anomalous & far).tolist():
                    i = idx[j]
                    findings.append(self._block_finding(
                        blocks[i], float(scored.scores[j]), scored.threshold, x[j],
                        stamps[i] if stamps is not None else self.clock()))
                # the gauge shows each node's latest score (its last row)
                last_row = {blocks[i].node: j for j, i in enumerate(idx)}
                for node, j in last_row.items():
                    self.metrics.block_anomaly_score.labels(str(chain_id), node).set(
                        float(scored.scores[j]))
            if model.learn(x):
                self.metrics.model_info.labels("block", model.kind,
                                               model.version or "unknown").set(1)
                self.metrics.model_fits.labels(str(chain_id)).inc()
                self.metrics.model_last_fit.labels(str(chain_id)).set(self.clock())
        return findings

    def _export_scores(self, chain_id: int, family: str, scored: Scored) -> None:
        """A model's threshold, the distribution of what it scored and how many rows it
        flagged, per family."""
        flagged = int(np.count_nonzero(scored.anomalous))
        self.metrics.anomaly_threshold.labels(str(chain_id), family).set(scored.threshold)
        observe_all(self.metrics.anomaly_score.labels(str(chain_id), family), scored.scores)
        self.metrics.anomalous_rows.labels(str(chain_id), family).inc(flagged)
        self.scored_rows[family] += len(scored.scores)
        self.flagged_rows[family] += flagged

    def _block_finding(
        self, block: Block, score: float, threshold: float, row: np.ndarray, at: float
    ) -> Finding:
        model = self.model_for(block.chain_id)
        explanation = model.explain(row)
        top = ", ".join(f"{e.feature}={e.value:.3g} (z={e.deviation:+.1f})" for e in explanation)
        return Finding(
            chain_id=block.chain_id,
            node=block.node,
            event_id=Finding.id_for(block.chain_id, block.node, "block_iforest", block.hash),
            observed_at=at,
            detector="block_iforest",
            family="block",
            severity="info",
            score=score,
            threshold=threshold,
            subject_kind="block",
            subject=block.hash,
            block_number=block.number,
            explanation=explanation,
            summary=f"abnormal block {block.number} on {block.node}: {top}",
            model_version=model.version,
        )

