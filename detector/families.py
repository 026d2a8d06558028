"""Transaction, miner and fork-risk detection beside the block model. Domain code: no I/O.

The engine hands each batch's records here; these classes keep the windows each family
needs and turn features (detector/*_features.py) and rules (detector/rules.py) into
findings. Time is passed in (`now`), so a replay gives the same findings as live.

- `TxFamily` (one per chain): scores every included transaction once (the first node to
  deliver a block wins), an isolation forest over TX_FEATURES plus the sandwich and
  nonce-replacement-spam rules. One finding per (block, sender): a spam burst of 300 txs
  is one finding per block, not 300.
- `MinerFamily` (one per node): rules over the node's last blocks (share, surge, empty
  blocks with a full pool, timestamps, high-fee transactions left out). Findings about
  the chain (share, surge, empty blocks, censorship) carry node-free ids, so several
  nodes seeing the same producer report it once; timestamp findings are per node (they
  compare with that node's arrival times).
- `ForkRisk` (one per chain): fork_window_features and the combined score per node.

Rules that hold over a window (a dominant miner) are reported once per episode: a new
finding when the condition starts, none while it lasts, a new one after it cleared.
"""

from __future__ import annotations

import math
from collections import Counter, OrderedDict, deque
from collections.abc import Callable, Hashable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import polars as pl

from chainwatch.schema import (
    Block,
    FeatureDeviation,
    Finding,
    MempoolSnapshot,
    PeerSnapshot,
    PendingTx,
    Reorg,
    TxLifecycle,
)
from detector.fork_features import (
    FORK_FEATURES,
    FORK_RISK_LIMITS,
    FORK_RISK_WEIGHTS,
    fork_risk_score,
    fork_window_features,
)
from detector.miner_features import share_frame
from detector.model import BlockAnomalyModel, Scored
from detector.models import AnomalyDetector
from detector.pools import pool
from detector.rule_heads import RuleHeads, rule_heads, window_candidates
from detector.rules import (
    SUSPECT_SLACK,
    ClockWindow,
    Offer,
    RuleHit,
    Stamp,
    block_min_tip,
    block_tx_rules,
    count_score,
    drift_hit,
    empty_blocks_rule,
    miner_share_rule,
    miner_surge_rule,
    nonce_replacement_spam_rule,
    skipped_by,
)
from detector.state import NodeKey
from detector.tx_features import (
    TX_FEATURE_MIN_SCALE,
    TX_FEATURES,
    TX_FEE_FEATURES,
    AsOf,
    BlockTxs,
    FeeMarket,
    SelectorStats,
    SenderStats,
    effective_tip_expr,
    included_tx_frame,
    pending_to_tx_frame,
    per_block_txs,
    tx_features,
)

ASYNC_MIN_ROWS = 16_384  # a tx batch this big is scored on the scoring thread
_JUMP_MIN_BLOCKS = 10  # blocks a node must have seen before a timestamp jump is judged
NONCE_SENDERS = 200_000  # senders TxFamily.next_nonce remembers (the least recent go first)


@dataclass(frozen=True)
class FamilyConfig:
    # transactions: a finding needs the model's verdict AND one feature far out. An
    # isolation forest saturates on points far beyond its training range, so the
    # detector's z guard makes such a point anomalous whatever the trees say
    tx_warmup: int = 2_000
    # refits at 2k, 4k, 8k ... txs, then every 200k (~1,300 mainnet blocks) on the last 50k:
    # every 50k cost 75 CPU-s per 10M txs in refits alone (`python -m bench.replay model`)
    tx_refit_every: int = 200_000
    tx_history: int = 50_000
    tx_contamination: float = 0.001
    # robust z of the most unusual non-fee feature: at least tx_min_deviation, and
    # tx_tail_factor times what the training txs reach at the contamination quantile
    tx_min_deviation: float = 20.0
    tx_tail_factor: float = 5.0
    # the fee features (TX_FEE_FEATURES) are z-scores against the last blocks' fees in
    # log space, so their cut is in market spreads: 6 is ~1e-9 per tx for a lognormal
    # market. Mainnet-shaped tips (log sigma 1.2) never reached 6 in 4.5M txs (5.5: 1 in
    # 900k); the scenario's smallest injected outlier (50x a log-sigma-0.55 market) sits
    # at 6.8. Linear z-scores could not separate the two: a lognormal market makes tips
    # hundreds of sigma out by itself (`python -m bench.normal_findings`)
    tx_fee_deviation: float = 6.0
    score_pending: bool = True  # score txs as the pool announces them, not only once mined
    replacement_window_seconds: float = 60.0
    replacement_limit: int = 5
    # miners
    miner_window: int = 100
    miner_share_limit: float = 0.5
    miner_min_blocks: int = 20
    empty_pending_threshold: int = 20
    empty_min_count: int = 2
    timestamp_jump_seconds: float = 120.0  # interval beyond median + this is a jump
    timestamp_future_seconds: float = 15.0  # geth refuses blocks further in the future
    # a takeover: binomial tail of a producer's recent count against its past share
    surge_windows: tuple[int, ...] = (3, 4, 5, 6, 8, 12, 16, 24, 32)
    surge_alpha: float = 1e-6
    surge_newcomer_alpha: float = 1e-5  # a producer absent from the window before
    # blocks a miner rule may pause before its condition counts as a new episode
    miner_episode_hold: int = 8
    # censorship: a top-decile tip left out by this many blocks that had room for it
    censor_blocks: int = 3
    censor_tip_percentile: float = 0.9
    # fork risk
    fork_risk_threshold: float = 0.7  # one moderate reorg alone stays below
    fork_window_blocks: int = 64
    fork_window_seconds: float = 900.0

    def tx_feature_cuts(self) -> tuple[float, ...]:
        """Per TX_FEATURES entry: the fee features' own cut, 0 (the shared cut) for the rest."""
        return tuple(self.tx_fee_deviation if name in TX_FEE_FEATURES else 0.0
                     for name in TX_FEATURES)


class Episodes:
    """Which (scope, key) conditions are active, so a lasting one is reported once.

    With `hold`, a key missing from an update stays active for that many more updates:
    a condition that flickers (a takeover with one honest block in it) is one episode.
    """

    def __init__(self, hold: int = 0) -> None:
        self.hold = hold
        self._active: dict[Hashable, dict[Hashable, str]] = {}
        self._missed: dict[Hashable, dict[Hashable, int]] = {}

    def has_active(self, scope: Hashable) -> bool:
        """Whether any key of the scope is active (or held): an update with none then
        changes nothing."""
        return bool(self._active.get(scope))

    def update(self, scope: Hashable, now_active: Mapping[Any, str]) -> dict[Hashable, str]:
        """Set a scope's active keys (key -> episode label); return the newly started ones."""
        before = self._active.get(scope, {})
        missed = self._missed.setdefault(scope, {})
        started = {k: v for k, v in now_active.items() if k not in before}
        active = {k: before.get(k, v) for k, v in now_active.items()}
        for k, label in before.items():
            if k in now_active:
                missed.pop(k, None)
            elif missed.get(k, 0) < self.hold:
                missed[k] = missed.get(k, 0) + 1
                active[k] = label
            else:
                missed.pop(k, None)
        self._active[scope] = active
        return started


class _Bounded(OrderedDict[str, float]):
    """An insertion-ordered dict that forgets its oldest entries beyond `limit`."""

    def __init__(self, limit: int) -> None:
        super().__init__()
        self.limit = limit

    def put(self, key: str, value: float) -> None:
        self[key] = value
        if len(self) > self.limit:
            self.popitem(last=False)

    def put_new(self, keys: Iterable[str], value: float) -> None:
        """`put` of each key in order, for distinct keys not in yet: one update, then the
        oldest beyond `limit` dropped (the same entries, without a step per key)."""
        self.update(dict.fromkeys(keys, value))
        while len(self) > self.limit:
            self.popitem(last=False)


class RecentKeys:
    """Keys added lately, for membership: every one of the last `limit` keys added
    (counted with repeats) is in; older ones are forgotten in time.

    Two generations of plain sets (the current one is retired once it holds `limit`
    keys): adding a replay batch's 75k hashes is one set update at C speed, where an
    exact bound kept in insertion order cost ~20 ms per batch. Keys added as a column
    (`add_column`) stay a column until membership is next asked: a replay of mined
    blocks alone never asks, and turning a batch's 75k hashes into Python strings and
    adding them cost ~13 ms per batch. Unread columns older than the last `limit` keys
    are dropped unread, so memory stays bounded either way.
    """

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._current: set[str] = set()
        self._previous: set[str] = set()
        self._unread: deque[pl.Series] = deque()  # oldest first, all newer than the sets
        self._unread_keys = 0

    def __contains__(self, key: object) -> bool:
        self._read()
        return key in self._current or key in self._previous

    def __len__(self) -> int:
        self._read()
        return len(self._current | self._previous)

    def add_many(self, keys: Iterable[str]) -> None:
        self._read()
        self._add(keys)

    def add(self, key: str) -> None:
        self.add_many((key,))

    def add_column(self, keys: pl.Series) -> None:
        """Add a column of keys (strings), read only when membership is next asked."""
        if not len(keys):
            return
        self._unread.append(keys)
        self._unread_keys += len(keys)
        while len(self._unread) > 1 and self._unread_keys - len(self._unread[0]) >= self.limit:
            self._unread_keys -= len(self._unread.popleft())
        if self._unread_keys >= self.limit:  # the sets hold only older keys
            self._current, self._previous = set(), set()

    def _read(self) -> None:
        while self._unread:
            self._add(self._unread.popleft().to_list())
        self._unread_keys = 0

    def _add(self, keys: Iterable[str]) -> None:
        self._current.update(keys)
        if len(self._current) >= self.limit:
            self._previous, self._current = self._current, set()


class NextNonces:
    """Each sender's next nonce (one above its highest included one), for the `limit`
    senders whose txs were mined most recently; the others are forgotten.

    Columnar: the batches' (sender, nonce) pairs wait, and are folded into the state
    when it is read or when `fold_every` batches wait (a replay batch holds ~75k txs of
    ~30k senders; a dict touched per tx cost ~1 s per 1M txs, a join per batch with the
    200k-sender state ~80 ms per 1M). Within what is folded the txs count in order (a
    sender's last tx counts), so the senders kept are those one tx at a time would keep;
    a sender forgotten in between, only to come back before the fold, keeps its old value
    where one tx at a time would have started it again (equal unless its nonces went
    down, which a chain does not allow).
    """

    _SCHEMA: dict[str, type[pl.DataType]] = {
        "sender": pl.Utf8, "next_nonce": pl.UInt64, "touched": pl.Int64,
    }

    def __init__(self, limit: int, fold_every: int = 8) -> None:
        self.limit = limit
        self.fold_every = fold_every
        self._frame = pl.DataFrame(schema=self._SCHEMA)
        self._waiting: list[pl.DataFrame] = []
        self._clock = 0  # txs learnt so far: the order senders were last touched in

    def __len__(self) -> int:
        self._fold()
        return self._frame.height

    def learn(self, senders: pl.Series, nonces: pl.Series) -> None:
        """The included txs of a batch, in order (senders lower-cased, nonces as Int64)."""
        if not len(senders):
            return
        self._waiting.append(pl.DataFrame({
            "sender": senders, "nonce": nonces.cast(pl.UInt64),
            "position": pl.int_range(self._clock, self._clock + len(senders), eager=True),
        }))
        self._clock += len(senders)
        if len(self._waiting) >= self.fold_every:
            self._fold()

    def _fold(self) -> None:
        if not self._waiting:
            return
        batch = (
            pl.concat(self._waiting)
            .group_by("sender")
            .agg((pl.col("nonce").max() + 1).alias("new"), pl.col("position").max().alias("last"))
        )
        self._waiting = []
        merged = self._frame.join(batch, on="sender", how="full", coalesce=True).select(
            "sender",
            pl.max_horizontal(pl.col("next_nonce").fill_null(0), pl.col("new").fill_null(0))
            .alias("next_nonce"),
            pl.coalesce("last", "touched").alias("touched"),
        )
        if merged.height > self.limit:  # the most recently touched (all distinct)
            merged = merged.top_k(self.limit, by="touched")
        self._frame = merged

    def of(self, senders: Iterable[str]) -> dict[str, int]:
        """The next nonce of each of `senders` that is known."""
        self._fold()
        wanted = list(set(senders))
        if not wanted or not self._frame.height:
            return {}
        rows = self._frame.filter(pl.col("sender").is_in(wanted))
        return dict(zip(rows["sender"].to_list(), rows["next_nonce"].to_list(), strict=True))

    def items(self) -> list[tuple[str, int]]:
        """(sender, next nonce), least recently touched first (tests, analysis)."""
        self._fold()
        rows = self._frame.sort("touched")
        return list(zip(rows["sender"].to_list(), rows["next_nonce"].to_list(), strict=True))


class TxFamily:
    """Transaction anomalies of one chain."""

    def __init__(
        self, config: FamilyConfig, *, kind: str, seed: int,
        pretrained: AnomalyDetector | None = None, fit_ahead: bool = False,
    ) -> None:
        c = self.config = config
        self.market = FeeMarket()
        self.selectors = SelectorStats()
        self.senders = SenderStats()
        self.model = BlockAnomalyModel(
            TX_FEATURES, warmup=c.tx_warmup, refit_every=c.tx_refit_every,
            history=c.tx_history, contamination=c.tx_contamination, seed=seed,
            min_scale=TX_FEATURE_MIN_SCALE, z_limit=c.tx_min_deviation,
            tail_factor=c.tx_tail_factor, feature_cuts=c.tx_feature_cuts(), kind=kind,
            family="tx", pretrained=pretrained, fit_ahead=fit_ahead,
        )
        self.pending_since = _Bounded(200_000)  # hash -> first seen, of txs pending now
        self.tip_percentile = _Bounded(200_000)  # hash -> fee percentile on arrival
        # what the top-decile pending txs offer, for the censorship rule
        self.offers: OrderedDict[str, Offer] = OrderedDict()
        self.next_nonce = NextNonces(NONCE_SENDERS)  # sender -> last included + 1
        self.replacements = _Bounded(100_000)  # new hash -> how many replacements led to it
        self._replaced: deque[TxLifecycle] = deque(maxlen=10_000)
        self._seen_blocks = _Bounded(10_000)
        # mined already: a pending record that arrives after its block must not re-open it
        # (such records come seconds late; 50k txs is ~250 mainnet blocks, ~50 minutes)
        self._included = RecentKeys(50_000)
        self.last_scored: Scored | None = None
        self.scored_rows = 0

    def on_pending(self, txs: list[PendingTx], now: float) -> list[Finding]:
        """Remember pending txs (arrival, fee rank, offers) and score them as they arrive.

        A fee outlier is flagged when the node first announces it, a block before it is
        mined; its finding id is the tx's, so the same verdict on inclusion is a duplicate.
        """
        if not txs:
            return []
        frame = pending_to_tx_frame(txs)
        base = pl.lit(self.market.base_fee, pl.Float64)
        tips = frame.select(effective_tip_expr(base))["effective_tip"].fill_null(np.nan)
        pct = self.market.percentile_of(tips.to_numpy())
        fresh = np.ones(len(txs), dtype=bool)
        for i, (tx, p) in enumerate(zip(txs, pct, strict=True)):
            if tx.hash in self._included:
                fresh[i] = False
                continue
            self.pending_since.put(tx.hash, tx.first_seen_at)
            if not math.isnan(p):
                self.tip_percentile.put(tx.hash, float(p))
                if p >= self.config.censor_tip_percentile:
                    self._offer(tx)
        if not self.config.score_pending or not self.model.fitted or not fresh.any():
            return []
        return self._score(frame.filter(pl.Series(fresh)), now)

    def _offer(self, tx: PendingTx) -> None:
        fee_cap = tx.max_fee_per_gas if tx.max_fee_per_gas is not None else tx.gas_price
        tip_cap = (tx.max_priority_fee_per_gas if tx.max_priority_fee_per_gas is not None
                   else tx.gas_price)
        if fee_cap is None or tip_cap is None:
            return
        self.offers[tx.hash] = Offer(fee_cap, tip_cap, tx.gas, tx.first_seen_at,
                                     tx.from_address.lower(), tx.nonce)
        if len(self.offers) > 50_000:
            self.offers.popitem(last=False)

    def _gone(self, tx_hash: str) -> None:
        """A tx left the pool (included, dropped, replaced)."""
        self.pending_since.pop(tx_hash, None)
        self.offers.pop(tx_hash, None)

    def on_lifecycles(self, records: list[TxLifecycle], now: float) -> list[Finding]:
        for r in records:
            if r.fate in ("dropped", "replaced", "included"):
                self._gone(r.hash)
            if r.fate == "included":
                self._included.add(r.hash)
            if r.fate == "replaced":
                self._replaced.append(r)
                if r.replaced_by:
                    self.replacements.put(r.replaced_by, self.replacements.get(r.hash, 0) + 1)
        if not any(r.fate == "replaced" for r in records):
            return []
        c = self.config
        recent = [r for r in self._replaced if r.observed_at > now - c.replacement_window_seconds]
        hits = nonce_replacement_spam_rule(recent, c.replacement_window_seconds,
                                           c.replacement_limit)
        return [h.to_finding(now) for h in hits]

    def on_blocks(
        self, blocks: list[Block], now: float, txs: pl.DataFrame | None = None,
        block_nows: Sequence[float] | None = None,
    ) -> list[Finding]:
        """Score the transactions of blocks not seen before, then learn from them.

        `txs`: the batch's included txs as a tx frame when replay read them in columns
        (`included_tx_frame`); without it, the blocks' own `transactions`. `block_nows`:
        the clock as each block was processed (default `now`). A tx's features read the
        fee market, its sender's rate and its selector's count as they were when its
        block came (`AsOf`), so a batch of many blocks scores its txs as one block at a
        time would.
        """
        self.last_scored = None  # what this call scored, for the metrics: nothing yet
        first: dict[str, Block] = {}  # several nodes deliver a block: the first one wins
        seen = self._seen_blocks
        for b in blocks:
            if b.hash not in seen:
                first.setdefault(b.hash, b)
        if not first:
            return []
        fresh = sorted(first.values(), key=lambda b: b.number)
        seen.put_new([b.hash for b in fresh], 0.0)
        frame, counts = included_tx_frame(fresh, txs)
        nows: dict[str, float] = {}  # a block's clock at its first delivery, as `first`
        for b, block_now in zip(blocks, block_nows or [], strict=False):
            nows.setdefault(b.hash, block_now)
        as_of = AsOf.of(counts, [nows.get(b.hash, now) for b in fresh])
        x, ok = self._matrix(frame, now, as_of) if frame.height else (None, None)
        # a big batch is scored on other threads meanwhile: the bookkeeping below changes
        # only what the features read, and they are computed
        scoring = self._start_scoring(x)
        findings: list[Finding] = []
        if frame.height:  # blocks without txs move the fee market's window only
            findings = [h.to_finding(now) for h in block_tx_rules(frame, as_of.block)]
            self.selectors.update(frame, counts)
            self.senders.update(frame, now)
            self._learn_included(frame)
        self.market.update(fresh, frame, counts)
        if x is not None and ok is not None:
            findings.extend(self._verdicts(frame, x, ok, scoring(), now, included=True))
            self.model.learn(x)
        return findings

    def _start_scoring(self, x: np.ndarray | None) -> Callable[[], Scored | None]:
        """The model's verdict on `x`, to be collected by calling the result; computed on
        the scoring thread when `x` is big (the forest's walk holds no GIL)."""
        if x is None:
            return lambda: None
        if len(x) < ASYNC_MIN_ROWS:
            scored = self.model.score(x)
            return lambda: scored
        return pool("tx-score").submit(self.model.score, x).result

    def _learn_included(self, frame: pl.DataFrame) -> None:
        """The batch's mined txs left the pool, are remembered as mined (`_included`), and
        raise their senders' next nonce."""
        cols = frame.select("hash", "from_address", "nonce")
        if self.pending_since or self.offers:
            hashes = cols["hash"].to_list()
            for pool in (self.pending_since, self.offers):
                for tx_hash in pool.keys() & hashes:
                    del pool[tx_hash]
        self.next_nonce.learn(cols["from_address"], cols["nonce"])
        self._included.add_column(cols["hash"])

    def _matrix(
        self, frame: pl.DataFrame, now: float, as_of: AsOf | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """The model's rows of a tx frame (those with every feature known), and which
        rows of the frame they are (a boolean mask)."""
        filled = {  # unknown gap: first tx of a sender we never saw; never pending: mined
            "nonce_gap": pl.col("nonce_gap").fill_null(0.0),  # at once
            "time_pending_seconds": pl.col("time_pending_seconds").fill_null(0.0),
        }
        columns = [filled.get(name, pl.col(name)) for name in TX_FEATURES]
        features = tx_features(
            frame, self.market, self.selectors, self.senders, self.replacements,
            self.pending_since, now=now, as_of=as_of,
        ).select(*columns, pl.all_horizontal(c.is_not_null() for c in columns).alias("_ok"))
        ok = features["_ok"].to_numpy()
        return features.drop("_ok").to_numpy()[ok], ok

    def _score(self, frame: pl.DataFrame, now: float) -> list[Finding]:
        """Score pending txs (nothing is learnt from them)."""
        x, ok = self._matrix(frame, now)
        return self._verdicts(frame, x, ok, self.model.score(x), now, included=False)

    def _verdicts(
        self, frame: pl.DataFrame, x: np.ndarray, ok: np.ndarray, scored: Scored | None,
        now: float, *, included: bool,
    ) -> list[Finding]:
        """Findings from the model's scores of a frame's rows."""
        if scored is None:
            return []
        if included:
            self.last_scored = scored
        self.scored_rows += len(x)
        flagged = np.flatnonzero(scored.anomalous & scored.beyond)
        if not len(flagged):
            return []
        return self._findings(frame.filter(pl.Series(ok)), x, scored, flagged, now)

    def _findings(
        self, rows: pl.DataFrame, x: np.ndarray, scored: Scored, flagged: np.ndarray,
        now: float,
    ) -> list[Finding]:
        """One finding per (block, sender): the sender's highest-scoring flagged tx."""
        best: dict[tuple[str, str], tuple[int, int]] = {}
        for i in flagged:  # pending txs have no block: one finding per sender and batch
            key = (rows["block_hash"][int(i)] or "", rows["from_address"][int(i)])
            j, n = best.get(key, (int(i), 0))
            if scored.scores[i] > scored.scores[j]:
                j = int(i)
            best[key] = (j, n + 1)
        out: list[Finding] = []
        for (_, sender), (i, count) in best.items():
            row = rows.row(i, named=True)
            pending = row["block_number"] is None
            where = "in the pool" if pending else f"in block {row['block_number']}"
            explanation = self.model.explain(x[i])
            top = ", ".join(f"{e.feature}={e.value:.3g} (z={e.deviation:+.1f})"
                            for e in explanation)
            more = f" and {count - 1} more of its txs" if count > 1 else ""
            out.append(Finding(
                chain_id=int(row["chain_id"]),
                node=str(row["node"]),
                event_id=Finding.id_for(int(row["chain_id"]), "", "tx_iforest", row["hash"]),
                observed_at=now,
                detector="tx_iforest",
                family="tx",
                severity="warning" if scored.scores[i] >= 0.9 else "info",
                score=float(scored.scores[i]),
                threshold=scored.threshold,
                subject_kind="tx",
                subject=str(row["hash"]),
                block_number=None if pending else int(row["block_number"]),
                explanation=explanation,
                summary=f"abnormal {'pending ' if pending else ''}tx {row['hash']} from "
                        f"{sender}{more} {where}: {top}",
                model_version=self.model.version,
            ))
        return out


def _concentration(producers: Sequence[str]) -> tuple[float, float]:
    """The window's top producer share and HHI: share_frame's figures, without a frame
    (same summation order, so the same floats)."""
    counts = Counter(producers)  # in order of first appearance, as share_frame counts
    shares = [n / len(producers) for n in counts.values()]
    return max(shares, default=0.0), sum(v * v for v in shares)


def _stamp(block: Block) -> Stamp:
    return Stamp(block.number, block.miner.lower(), float(block.timestamp), block.observed_at)


class MinerFamily:
    """Producer behaviour as seen by one node."""

    def __init__(self, config: FamilyConfig) -> None:
        self.config = config
        self.blocks: deque[Block] = deque(maxlen=config.miner_window)
        self.stamps: deque[Stamp] = deque(maxlen=config.miner_window)  # one per block above
        self.snapshots: deque[tuple[float, int]] = deque(maxlen=1_000)
        self.episodes = Episodes(hold=config.miner_episode_hold)
        self._overdue_reported = _Bounded(10_000)
        self._skips: dict[str, dict[int, str]] = {}  # tx hash -> {height: miner} that left it out
        self._empties: tuple[str, ...] = ()
        self._empty_hits: list[RuleHit] = []
        self.top_share = 0.0
        self.hhi = 0.0

    def on_snapshot(self, snapshot: MempoolSnapshot) -> None:
        self.snapshots.append((snapshot.observed_at, snapshot.pending_count))

    def on_blocks(
        self, blocks: list[Block], txs: TxFamily, now: float,
        tx_frame: pl.DataFrame | None = None, block_nows: Sequence[float] | None = None,
    ) -> list[Finding]:
        """`tx_frame`: as for `TxFamily.on_blocks` (read only while high-fee txs wait).

        The window rules are evaluated after each block, as a live detector polling one
        block at a time does: a condition that comes and goes inside a batch is still
        found. `block_nows`: the clock as each block was processed (replay: the recorded
        time then), to stamp its findings; `now` for all when not given.
        """
        if not blocks:
            return []
        nows = block_nows if block_nows is not None else [now] * len(blocks)
        findings: list[Finding | None] = []
        included = self._included_txs(blocks, txs, tx_frame)
        next_nonces = (txs.next_nonce.of(o.sender for o in txs.offers.values())
                       if included is not None else {})
        stamps = [*self.stamps, *map(_stamp, blocks)]
        first = len(self.stamps)
        clock = ClockWindow.of(stamps, first, self.config.miner_window)
        suspects = self._clock_suspects(clock).tolist()
        heads = self._rule_heads(blocks)
        empty = heads.empty.tolist()
        share = heads.share.tolist() if heads.share is not None else None
        surge = heads.surge.tolist() if heads.surge is not None else None
        active = self.episodes.has_active("rules")  # changes only where the rules run
        for i, b in enumerate(blocks):
            if suspects[i]:  # elsewhere neither clock check can fire
                findings.append(self._clock(b, stamps[first + i], clock, i, nows[i]))
            if included is not None:
                self._count_skips(included[i], txs, next_nonces)
            self.blocks.append(b)
            self.stamps.append(stamps[first + i])
            may_share, may_surge = ((share[i], surge[i]) if share is not None
                                    and surge is not None else self._candidates_now())
            # elsewhere no rule holds: nothing starts, and with none active nothing ends
            if may_share or empty[i] or may_surge or active:
                findings.extend(self._window_rules(may_share, empty[i], may_surge, nows[i]))
                active = self.episodes.has_active("rules")
        self.top_share, self.hhi = _concentration(self._producers())
        findings.extend(self._censored(txs, now))
        return [f for f in findings if f is not None]

    def _rule_heads(self, blocks: list[Block]) -> RuleHeads:
        c = self.config
        return rule_heads(
            self.blocks, blocks, self.snapshots, window_size=c.miner_window,
            share_limit=c.miner_share_limit, share_min_blocks=c.miner_min_blocks,
            empty_pending=c.empty_pending_threshold, empty_min_count=c.empty_min_count,
            surge_windows=c.surge_windows, surge_alpha=c.surge_alpha,
            surge_newcomer_alpha=c.surge_newcomer_alpha)

    def _candidates_now(self) -> tuple[bool, bool]:
        """(share, surge) marks for the window as it stands, where rule_heads could not
        mark the batch (a height twice in the window)."""
        c = self.config
        return window_candidates(
            self._producers(), window_size=c.miner_window, share_limit=c.miner_share_limit,
            share_min_blocks=c.miner_min_blocks, surge_windows=c.surge_windows,
            surge_alpha=c.surge_alpha, surge_newcomer_alpha=c.surge_newcomer_alpha)

    def _window_rules(self, share: bool, empty: bool, surge: bool,
                      now: float) -> list[Finding]:
        """Share, empty-block and surge rules over the window as it stands now; each run
        only where marked as possibly holding (unmarked, it holds nowhere, so skipping
        it changes nothing)."""
        head = self.blocks[-1]
        hits = self.window_hits(share=share, empty=empty, surge=surge)
        active = {(h.rule, h.subject): str(head.number) for h in hits}
        started = self.episodes.update("rules", active)
        findings: list[Finding] = []
        for h in hits:
            episode = started.get((h.rule, h.subject))
            if episode is not None:  # the same on every node of the chain: counted once
                findings.append(h.to_finding(now, episode, chain_level=True))
        return findings

    def window_hits(self, *, share: bool = True, empty: bool = True,
                    surge: bool = True) -> list[RuleHit]:
        """The chosen window rules' hits over the window as it stands now."""
        if not (share or empty or surge):
            return []
        c = self.config
        head = self.blocks[-1]
        producers = self._producers()
        hits: list[RuleHit] = []
        if share:
            frame = share_frame(producers, chain_id=head.chain_id, node=head.node)
            hits += miner_share_rule(frame, c.miner_share_limit, c.miner_min_blocks)
        if empty:
            hits += self._empty_blocks()
        if surge:
            hits += miner_surge_rule(
                producers, chain_id=head.chain_id, node=head.node, head=head.number,
                windows=c.surge_windows, alpha=c.surge_alpha,
                newcomer_alpha=c.surge_newcomer_alpha)
        return hits

    def _empty_blocks(self) -> list[RuleHit]:
        """empty_blocks_rule, re-run only when the window's empty blocks changed, and only
        when a snapshot showed a full pool (without one, no empty block counts)."""
        empties = tuple(b.hash for b in self.blocks if b.tx_count == 0)
        if empties != self._empties:
            self._empties = empties
            c = self.config
            full_pool = any(n > c.empty_pending_threshold for _, n in self.snapshots)
            self._empty_hits = empty_blocks_rule(
                list(self.blocks), list(self.snapshots), c.empty_pending_threshold,
                c.empty_min_count) if empties and full_pool else []
        return self._empty_hits

    def _producers(self) -> list[str]:
        """The window's producer per height (the last block received at a height wins)."""
        by_height = {b.number: b.miner.lower() for b in self.blocks}
        return [by_height[n] for n in sorted(by_height)]

    def _clock_suspects(self, clock: ClockWindow) -> np.ndarray:
        """The batch's rows where `_clock` may find something (a superset, from the
        window's figures in one numpy pass): the per-block checks run only there."""
        c = self.config
        jump = (clock.follows & (clock.known >= _JUMP_MIN_BLOCKS)
                & ~(clock.interval - clock.usual_interval
                    <= c.timestamp_jump_seconds - SUSPECT_SLACK))
        return clock.drift_suspects(c.timestamp_future_seconds) | jump

    def _clock(
        self, block: Block, stamp: Stamp, clock: ClockWindow, i: int, now: float
    ) -> Finding | None:
        """A producer moving the chain's clock: a made-up timestamp, or a huge jump.

        `clock` row i: the figures of the block's window (the node's blocks before it),
        computed for the whole batch at once.
        """
        hit = drift_hit(stamp, self.stamps[-1] if self.stamps else None, clock, i,
                        chain_id=block.chain_id, node=block.node,
                        future_limit=self.config.timestamp_future_seconds)
        if hit is not None:
            return hit.to_finding(now, episode=block.hash)
        return self._jump(block, clock, i, now)

    def _jump(self, block: Block, clock: ClockWindow, i: int, now: float) -> Finding | None:
        """A timestamp far beyond the usual interval (also when arrival times are unknown)."""
        previous = self.blocks[-1] if self.blocks else None
        if previous is None or not clock.follows[i] or clock.known[i] < _JUMP_MIN_BLOCKS:
            return None
        usual = float(clock.usual_interval[i])
        interval = block.timestamp - previous.timestamp
        excess = interval - usual
        if excess <= self.config.timestamp_jump_seconds:
            return None
        hit = RuleHit(
            rule="timestamp_jump_rule", family="miner", severity="warning",
            chain_id=block.chain_id, node=block.node, subject_kind="miner",
            subject=block.miner.lower(), block_number=block.number,
            score=min(excess / (2 * self.config.timestamp_jump_seconds), 1.0),
            summary=(f"block {block.number} by {block.miner.lower()} is {interval:.0f}s after "
                     f"its parent (usual {usual:.0f}s): its timestamp jumps the chain's clock"),
        )
        return hit.to_finding(now, episode=block.hash)

    @staticmethod
    def _included_txs(
        blocks: list[Block], txs: TxFamily, tx_frame: pl.DataFrame | None
    ) -> list[BlockTxs] | None:
        """Each block's txs with their tips, for the censorship rule; None when no
        high-fee tx is waiting (then there is nothing to skip)."""
        if not txs.offers:
            return None
        frame, counts = included_tx_frame(blocks, tx_frame)
        return per_block_txs(frame, counts, blocks)

    def _count_skips(
        self, block_txs: BlockTxs, txs: TxFamily, next_nonces: Mapping[str, int]
    ) -> None:
        """Note which watched high-fee txs this block's producer could have taken but left."""
        block = block_txs.block
        parent = next((b for b in reversed(self.blocks) if b.number == block.number - 1), None)
        parent_seen = parent.observed_at if parent is not None else None
        min_tip = block_min_tip(block_txs)
        included = set(block_txs.hashes)
        miner = block.miner.lower()
        for tx_hash, offer in txs.offers.items():
            if tx_hash in included or tx_hash in self._overdue_reported:
                continue
            if skipped_by(offer, block, parent_seen, min_tip, next_nonces.get(offer.sender)):
                self._skips.setdefault(tx_hash, {})[block.number] = miner
        if len(self._skips) > 2 * len(txs.offers) + 1_000:
            self._skips = {h: v for h, v in self._skips.items() if h in txs.offers}

    def _censored(self, txs: TxFamily, now: float) -> list[Finding]:
        """High-fee txs left out by several blocks that had room for them: a censorship hint."""
        c = self.config
        head = self.blocks[-1]
        out: list[Finding] = []
        for tx_hash, skips in list(self._skips.items()):
            if len(skips) < c.censor_blocks or tx_hash not in txs.offers:
                continue
            del self._skips[tx_hash]
            self._overdue_reported.put(tx_hash, now)
            since = txs.offers[tx_hash].first_seen_at
            miners = sorted(set(skips.values()))
            out.append(RuleHit(
                rule="censorship_rule", family="miner", severity="warning",
                chain_id=head.chain_id, node=head.node, subject_kind="tx", subject=tx_hash,
                block_number=head.number, score=count_score(len(skips), c.censor_blocks),
                summary=(f"high-fee tx {tx_hash} pending since {now - since:.0f}s ago was left "
                         f"out of {len(skips)} blocks that had room or took cheaper txs, by "
                         f"{', '.join(miners)}"),
                details={"blocks": sorted(skips), "miners": miners},
            ).to_finding(now, chain_level=True))
        return out


class ForkRisk:
    """One fork-risk score per node of a chain, from its recent window."""

    def __init__(self, config: FamilyConfig) -> None:
        self.config = config
        self.blocks: dict[NodeKey, deque[Block]] = {}
        self.reorgs: deque[Reorg] = deque(maxlen=1_000)
        self.peers: deque[PeerSnapshot] = deque(maxlen=5_000)
        self.mempool: deque[MempoolSnapshot] = deque(maxlen=5_000)
        self.episodes = Episodes()
        self.scores: dict[NodeKey, float] = {}

    def add(self, record: Block | Reorg | PeerSnapshot | MempoolSnapshot) -> None:
        if isinstance(record, Block):
            key = (record.chain_id, record.node)
            window = self.blocks.get(key)
            if window is None:
                window = self.blocks[key] = deque(maxlen=self.config.fork_window_blocks)
            window.append(record)
        elif isinstance(record, Reorg):
            self.reorgs.append(record)
        elif isinstance(record, PeerSnapshot):
            self.peers.append(record)
        else:
            self.mempool.append(record)

    def evaluate(
        self, now: float, head_lag: Mapping[NodeKey, int], split_length: Mapping[NodeKey, int],
        heads: Mapping[NodeKey, int | None],
    ) -> list[Finding]:
        c = self.config
        frame = fork_window_features(
            [b for window in self.blocks.values() for b in window], list(self.reorgs),
            list(self.peers), list(self.mempool), now=now, head_lag=head_lag,
            split_length=split_length, window_blocks=c.fork_window_blocks,
            window_seconds=c.fork_window_seconds,
        )
        findings: list[Finding] = []
        active: dict[Hashable, str] = {}
        rows = list(frame.iter_rows(named=True))  # one row per node: a handful
        for row in rows:
            key = (int(row["chain_id"]), str(row["node"]))
            score = fork_risk_score(row)
            self.scores[key] = score
            if score >= c.fork_risk_threshold:
                active[key] = f"{now:.3f}"
        started = self.episodes.update("nodes", active)
        for row in rows:
            key = (int(row["chain_id"]), str(row["node"]))
            if key in started:
                findings.append(self._finding(key, row, now, started[key], heads.get(key)))
        return findings

    def _finding(
        self, key: NodeKey, row: Mapping[str, float], now: float, episode: str,
        head: int | None,
    ) -> Finding:
        chain_id, node = key
        contributions = sorted(
            FORK_FEATURES,
            key=lambda f: -FORK_RISK_WEIGHTS[f] * min(abs(row[f]) / FORK_RISK_LIMITS[f], 1.0),
        )[:3]
        explanation = tuple(
            FeatureDeviation(feature=f, value=float(row[f]), normal=0.0,
                             deviation=round(float(row[f]) / FORK_RISK_LIMITS[f], 3))
            for f in contributions
        )
        top = ", ".join(f"{e.feature}={e.value:.3g}" for e in explanation)
        score = self.scores[key]
        return Finding(
            chain_id=chain_id, node=node,
            event_id=Finding.id_for(chain_id, node, "fork_risk_score", episode),
            observed_at=now, detector="fork_risk_score", family="fork_risk",
            severity="critical" if score >= 0.8 else "warning",
            score=score, threshold=self.config.fork_risk_threshold,
            subject_kind="node", subject=node, block_number=head,
            explanation=explanation,
            summary=f"fork risk of {node} is {score:.2f}: {top}",
        )

