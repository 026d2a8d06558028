"""Per-transaction features, vectorised in polars. Domain code: no I/O, time passed in.

Included transactions come from `Block.transactions`, pending ones from `PendingTx`
records; both become the same columnar frame (`TX_FRAME_SCHEMA`), so one feature
definition serves the live path and replay.

Three small stateful helpers hold what "normal" means right now: `FeeMarket` (tips of the
last blocks), `SelectorStats` (4-byte selector frequencies of recent txs) and
`SenderStats` (per-sender recent activity and last nonce). `tx_features` only reads them.
Order on the live path: score a batch first, then learn from it
(`market.update(blocks)`, `selectors.update(frame)`, `senders.update(frame)`), so a
transaction is never compared with itself.

Wei amounts are Float64: they can exceed Int64, and 53 bits of precision are plenty for
features. Addresses and selectors are lower-cased in the frame.
"""

from __future__ import annotations

import operator
from collections import OrderedDict, deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from itertools import groupby, pairwise
from typing import Any, cast

import numpy as np
import polars as pl

from chainwatch.schema import Block, PendingTx, TxSummary
from detector.compiled import compiled
from detector.pools import pool

TX_FEATURES: tuple[str, ...] = (
    "priority_fee_percentile",
    "priority_fee_log_z",
    "gas_price_log_z",
    "log_value",
    "gas_limit_log",
    "input_size_log",
    "selector_rarity",
    "sender_rate",
    "nonce_gap",
    "is_contract_creation",
    "replacement_count",
    "time_pending_seconds",
)

# The fee features measured in log space against the market (see FeeMarket.tip_log_z).
TX_FEE_FEATURES: tuple[str, ...] = ("priority_fee_log_z", "gas_price_log_z")

# Smallest meaningful deviation of each feature, in its own unit (see BLOCK_FEATURE_MIN_SCALE):
# percentiles move in 5% steps, logs in fractions of e, a pending time in about one block.
TX_FEATURE_MIN_SCALE: tuple[float, ...] = (
    0.05, 1.0, 1.0, 1.0, 0.25, 0.5, 0.5, 1.0, 1.0, 1.0, 1.0, 12.0,
)

# Columns `tx_features` puts before the features (to join results back to transactions).
TX_KEYS: tuple[str, ...] = ("hash",)

TX_FRAME_SCHEMA: dict[str, type[pl.DataType]] = {
    "source": pl.Utf8,  # "block" (included) or "pending"
    "chain_id": pl.Int64,
    "node": pl.Utf8,
    "block_number": pl.Int64,
    "block_hash": pl.Utf8,
    "tx_index": pl.Int64,
    "hash": pl.Utf8,
    "from_address": pl.Utf8,
    "to_address": pl.Utf8,
    "nonce": pl.Int64,
    "value": pl.Float64,
    "gas": pl.Float64,
    "gas_price": pl.Float64,
    "max_fee_per_gas": pl.Float64,
    "max_priority_fee_per_gas": pl.Float64,
    "tx_type": pl.Int64,
    "input_size": pl.Int64,
    "method_id": pl.Utf8,
    "is_contract_creation": pl.Boolean,
    "base_fee_per_gas": pl.Float64,
    "timestamp": pl.Int64,  # block timestamp; null for pending txs
    "observed_at": pl.Float64,  # when chainwatch saw the block / the pending tx record
    "first_seen_at": pl.Float64,  # mempool first sighting; null for included txs
}

_I64_MAX = 2**63 - 1
_IQR_TO_SIGMA = 1.349  # IQR of a normal distribution in standard deviations
# A fee far below the market is not an abnormal tx (it waits, or is never mined: the
# censorship rule's concern); only the high side of the log fee z-scores can go far out.
LOG_Z_CLIP = 3.0
_NO_SELECTOR = ""  # key for txs without a 4-byte selector (plain transfers)
_ROW_LOOKUP_MAX = 2_048  # rows looked up one by one; a bigger batch per distinct value


def _opt_float(value: int | None) -> float | None:
    return None if value is None else float(value)


_LOWERCASED = ("from_address", "to_address", "method_id")  # compared lower-case


def _lowercase(column: pl.Expr) -> pl.Expr:
    return column.str.to_lowercase()


def _normalise(frame: pl.DataFrame) -> pl.DataFrame:
    return frame.with_columns(_lowercase(pl.col(k)) for k in _LOWERCASED)


# the columns included and pending transactions share, under the same attribute names
_TX_COLUMNS: tuple[str, ...] = (
    "hash", "from_address", "to_address", "nonce", "value", "gas", "gas_price",
    "max_fee_per_gas", "max_priority_fee_per_gas", "tx_type", "input_size", "method_id",
    "is_contract_creation",
)
_INCLUDED_COLUMNS: tuple[str, ...] = ("transaction_index", *_TX_COLUMNS)


def _columns_of(
    txs: Sequence[TxSummary] | Sequence[PendingTx], attributes: tuple[str, ...],
    names: tuple[str, ...],
) -> dict[str, Sequence[object]]:
    """Each attribute of the transactions as a column under its name, nonces clipped to Int64.

    Wei amounts stay Python ints: polars converts them to Float64 exactly as float() does
    (tests/unit/test_tx_bookkeeping.py checks it), without a Python-level pass per column.
    """
    cols: dict[str, Sequence[object]] = dict(
        zip(names, _attribute_columns(txs, attributes), strict=True))
    nonces = cast("list[int]", cols["nonce"])
    if nonces and max(nonces) > _I64_MAX:
        cols["nonce"] = [min(n, _I64_MAX) for n in nonces]
    return cols


def _attribute_columns(
    txs: Sequence[TxSummary] | Sequence[PendingTx], names: tuple[str, ...]
) -> list[list[object]]:
    """The transactions' `names` (two or more) as columns, at C speed.

    Pydantic keeps field values in the instance dict, read with one itemgetter; objects
    without one (or without every field there) go through attribute access.
    """
    try:
        return _transposed(list(map(vars, txs)), operator.itemgetter(*names), len(names))
    except (TypeError, KeyError):
        return _transposed(txs, operator.attrgetter(*names), len(names))


# Rows transposed at a time: one pass per chunk reads each transaction while it is in
# the cache, and the chunk's row tuples are freed before the next. (One column at a time
# took twice as long; a tuple per row for a whole batch kept 100k objects alive, which
# woke the garbage collector several times per batch.)
_CHUNK = 1_024


def _transposed(
    items: Sequence[Any], row_of: Callable[[Any], tuple[object, ...]], width: int
) -> list[list[object]]:
    cols: list[list[object]] = [[] for _ in range(width)]
    for start in range(0, len(items), _CHUNK):
        rows = map(row_of, items[start : start + _CHUNK])
        for col, values in zip(cols, zip(*rows, strict=True), strict=True):
            col.extend(values)
    return cols


def _tx_columns(txs: Sequence[TxSummary] | Sequence[PendingTx]) -> dict[str, Sequence[object]]:
    """The shared columns, nonces clipped to Int64 (wei amounts become Float64 in polars)."""
    return _columns_of(txs, _TX_COLUMNS, _TX_COLUMNS)


def blocks_to_tx_frame(blocks: Sequence[Block]) -> pl.DataFrame:
    """One row per included transaction, in block order then transaction order."""
    txs = [tx for b in blocks for tx in b.transactions]
    if not txs:  # the same empty frame, without building one (~1.5 ms per 500 blocks)
        return pl.DataFrame(schema=TX_FRAME_SCHEMA)
    names = ("tx_index", *_TX_COLUMNS)
    tx_cols = pl.DataFrame(
        _columns_of(txs, _INCLUDED_COLUMNS, names),
        schema={k: TX_FRAME_SCHEMA[k] for k in names},
    )
    return tx_frame_of(blocks, [len(b.transactions) for b in blocks], tx_cols)


# The block columns of a tx frame, taken from each transaction's block.
_BLOCK_COLUMNS: tuple[str, ...] = (
    "chain_id", "node", "block_number", "block_hash", "base_fee_per_gas", "timestamp",
    "observed_at",
)


def tx_frame_of(
    blocks: Sequence[Block], counts: Sequence[int], tx_cols: pl.DataFrame,
    *, lowercase: bool = False,
) -> pl.DataFrame:
    """A tx frame (`TX_FRAME_SCHEMA`) from the blocks' headers and their txs' own columns.

    `tx_cols` holds the transactions of `blocks` in order (`counts[i]` rows for block i)
    under the frame's names (`tx_index`, `hash` ... `is_contract_creation`), in any type
    that casts to the frame's: replay reads them so from a columnar archive, wei amounts
    as decimal strings, which polars parses to the same Float64 as float(int) gives.
    `lowercase`: the addresses and selectors of `tx_cols` are lower-cased already (an
    archive's files say so), so they are not lower-cased again.
    """
    per_block = pl.DataFrame(
        {
            "chain_id": [b.chain_id for b in blocks],
            "node": [b.node for b in blocks],
            "block_number": [b.number for b in blocks],
            "block_hash": [b.hash for b in blocks],
            "base_fee_per_gas": [_opt_float(b.base_fee_per_gas) for b in blocks],
            "timestamp": [b.timestamp for b in blocks],
            "observed_at": [b.observed_at for b in blocks],
        },
        schema={k: TX_FRAME_SCHEMA[k] for k in _BLOCK_COLUMNS},
    )
    owner = np.repeat(np.arange(len(blocks)), counts)
    block_cols = per_block[owner] if len(owner) else per_block.clear()
    names = ("tx_index", *_TX_COLUMNS)
    # the casts, the lower-casing and the constant columns in one query
    exprs = {k: pl.col(k).cast(TX_FRAME_SCHEMA[k]) for k in names}
    if not lowercase:
        exprs |= {k: _lowercase(exprs[k]) for k in _LOWERCASED}
    exprs |= {"source": pl.lit("block", pl.Utf8), "first_seen_at": pl.lit(None, pl.Float64)}
    if set(tx_cols.columns) != set(names):
        tx_cols = tx_cols.select(names)
    return pl.concat([block_cols, tx_cols], how="horizontal").select(
        exprs.get(k, pl.col(k)).alias(k) for k in TX_FRAME_SCHEMA)


@dataclass(frozen=True)
class TxColumns:
    """Blocks' transactions as a source holds them (`parts`, opaque here), made into one
    tx frame by `build` only when scored: a run of batches (`Detector.run_blocks`)
    is built in one go instead of batch by batch (~5 ms a batch, most of it fixed)."""

    parts: tuple[Any, ...]
    build: Callable[[Sequence[Any]], pl.DataFrame]

    def frame(self) -> pl.DataFrame:
        return self.build(self.parts)

    @staticmethod
    def frame_of(items: Sequence[pl.DataFrame | TxColumns]) -> pl.DataFrame | None:
        """The rows of several batches' transactions, in order, as one tx frame."""
        frames: list[pl.DataFrame] = []
        # consecutive columns of one source are built together; frames are taken as they are
        for build, group in groupby(
                items, key=lambda item: item.build if isinstance(item, TxColumns) else None):
            if build is None:
                frames.extend(cast(list[pl.DataFrame], list(group)))
            else:
                frames.append(build([p for c in cast(list[TxColumns], group) for p in c.parts]))
        if not frames:
            return None
        return frames[0] if len(frames) == 1 else pl.concat(frames, rechunk=True)


def included_tx_frame(
    blocks: Sequence[Block], given: pl.DataFrame | None = None
) -> tuple[pl.DataFrame, list[int]]:
    """The included txs of `blocks` as one tx frame, block by block in the order given,
    and how many rows each block has.

    On the live path the txs come from the blocks' own `transactions`. Replay of a
    columnar archive decodes only the headers and hands the batch's txs in as `given`
    (a tx frame, possibly with rows of other blocks, which are left out); a block that
    does carry its transactions adds them. Either way the detectors read the same frame.
    """
    if given is None:
        return blocks_to_tx_frame(blocks), [len(b.transactions) for b in blocks]
    counts = _counts_if_exactly(given, blocks)
    if counts is not None:  # the usual replay batch: these blocks' txs, in this order
        return given, counts
    keys = pl.DataFrame(
        {
            "chain_id": [b.chain_id for b in blocks],
            "node": [b.node for b in blocks],
            "block_hash": [b.hash for b in blocks],
            "_block": list(range(len(blocks))),
        },
        schema={"chain_id": pl.Int64, "node": pl.Utf8, "block_hash": pl.Utf8,
                "_block": pl.Int64},
    )
    own = [b for b in blocks if b.transactions]
    parts = [given, blocks_to_tx_frame(own)] if own else [given]
    frame = (
        pl.concat(parts)
        .join(keys, on=["chain_id", "node", "block_hash"], how="inner", maintain_order="left")
        .sort("_block", maintain_order=True)
    )
    per_block = np.bincount(frame["_block"].to_numpy(), minlength=len(blocks))
    return frame.drop("_block"), per_block.tolist()


def _counts_if_exactly(frame: pl.DataFrame, blocks: Sequence[Block]) -> list[int] | None:
    """Each block's row count when `frame` holds the txs of `blocks` and nothing else, in
    their order (runs of one block after another); None otherwise."""
    if any(b.transactions for b in blocks):
        return None
    runs = frame.select(
        pl.struct("chain_id", "node", "block_hash").rle().alias("run")
    ).unnest("run")
    keys = runs["value"].struct.unnest()
    wanted = {(b.chain_id, b.node, b.hash): i for i, b in enumerate(blocks)}
    if len(wanted) != len(blocks):
        return None
    positions = [wanted.get(k) for k in zip(keys["chain_id"].to_list(), keys["node"].to_list(),
                                            keys["block_hash"].to_list(), strict=True)]
    if None in positions or positions != sorted(set(positions)):  # type: ignore[type-var]
        return None  # a block not asked for, a block in two runs, or out of order
    counts = [0] * len(blocks)
    for i, n in zip(positions, runs["len"].to_list(), strict=True):
        counts[i] = n  # type: ignore[index]
    return counts


@dataclass(frozen=True)
class BlockTxs:
    """One block's included transactions as the censorship rule reads them: their hashes
    and effective tips (NaN when no fee is known), in the block's order."""

    block: Block  # the header: its own `transactions` may be empty (a columnar replay)
    hashes: list[str]
    tips: list[float]


def per_block_txs(
    frame: pl.DataFrame, counts: Sequence[int], blocks: Sequence[Block]
) -> list[BlockTxs]:
    """`included_tx_frame`'s result cut into one `BlockTxs` per block (lists read once)."""
    cols = frame.select("hash", effective_tip_expr())
    hashes = cols["hash"].to_list()
    tips = cols["effective_tip"].fill_null(np.nan).to_list()
    out: list[BlockTxs] = []
    start = 0
    for block, n in zip(blocks, counts, strict=True):
        out.append(BlockTxs(block, hashes[start:start + n], tips[start:start + n]))
        start += n
    return out


def pending_to_tx_frame(txs: Sequence[PendingTx]) -> pl.DataFrame:
    """One row per pending transaction; block columns are null."""
    frame = pl.DataFrame(
        {
            "source": ["pending"] * len(txs),
            "chain_id": [t.chain_id for t in txs],
            "node": [t.node for t in txs],
            "block_number": [None] * len(txs),
            "block_hash": [None] * len(txs),
            "tx_index": [None] * len(txs),
            **_tx_columns(txs),
            "base_fee_per_gas": [None] * len(txs),
            "timestamp": [None] * len(txs),
            "observed_at": [t.observed_at for t in txs],
            "first_seen_at": [t.first_seen_at for t in txs],
        },
        schema=TX_FRAME_SCHEMA,
    )
    return _normalise(frame)


def effective_tip_expr(base_fee: pl.Expr | None = None) -> pl.Expr:
    """What the block producer earns per gas, floored at 0 (null when no fee is known).

    EIP-1559 fields present: min(max_priority_fee, max_fee - base_fee); otherwise
    (legacy, access-list): gas_price - base_fee. A missing base fee (pre-London) counts as 0.
    """
    base = (base_fee if base_fee is not None else pl.col("base_fee_per_gas")).fill_null(0.0)
    dynamic = pl.min_horizontal(
        pl.col("max_priority_fee_per_gas"), pl.col("max_fee_per_gas") - base
    )
    has_dynamic = (
        pl.col("max_priority_fee_per_gas").is_not_null() & pl.col("max_fee_per_gas").is_not_null()
    )
    tip = pl.when(has_dynamic).then(dynamic).otherwise(pl.col("gas_price") - base)
    return tip.clip(lower_bound=0.0).alias("effective_tip")


def effective_tip(tx: TxSummary, base_fee: int | None) -> int | None:
    """`effective_tip_expr` for one transaction (the rules' scalar path)."""
    base = base_fee or 0
    if tx.max_priority_fee_per_gas is not None and tx.max_fee_per_gas is not None:
        return max(min(tx.max_priority_fee_per_gas, tx.max_fee_per_gas - base), 0)
    if tx.gas_price is not None:
        return max(tx.gas_price - base, 0)
    return None


def fee_cap_expr() -> pl.Expr:
    """The most the sender offered per gas: max_fee_per_gas, or gas_price for legacy txs."""
    return pl.coalesce(pl.col("max_fee_per_gas"), pl.col("gas_price")).alias("fee_cap")


@dataclass(frozen=True)
class AsOf:
    """Where each row of a batch's tx frame stands, so that its features read the state
    as it was when its own block came (what one block at a time gives): `block`, the
    row's block (0, 1, ... in the frame's order of blocks, row-aligned, non-decreasing),
    and `nows`, the clock as each block was processed."""

    block: np.ndarray
    nows: np.ndarray

    @staticmethod
    def of(counts: Sequence[int], nows: Sequence[float]) -> AsOf:
        return AsOf(np.repeat(np.arange(len(counts)), counts), np.asarray(nows, dtype=np.float64))


@compiled
def _windows_as_of(  # pragma: no cover - compiled; tests compare it with _BatchWindow
    prior: np.ndarray, prior_ends: np.ndarray, values: np.ndarray, row_starts: np.ndarray,
    capacity: int, percentile: np.ndarray, quartiles: np.ndarray,
) -> None:
    """For each block k of a batch, the window of the `capacity` blocks before it: the
    mid-rank percentile of each of block k's values, and the window's quartiles.

    `prior`: the window's values before the batch (NaN-free), block after block, ending
    at `prior_ends`. `values`: the batch's values (NaN: unknown, not learnt), block k's
    at rows row_starts[k]:row_starts[k + 1]. After block k is scored its values join
    the window and the oldest block leaves once there are more than `capacity`: as
    `_BatchWindow.push` block by block.

    The window stays sorted. One pass per block merges the block's sorted values in,
    drops the leaving block's, and reads each new value's rank on the way (the window
    elements below it, and those equal to it: the run just passed). Quartiles: numpy's
    "linear" quantile, its arithmetic step for step.
    """
    n_prior = len(prior_ends)
    n_blocks = len(row_starts) - 1
    prior_sorted = prior.copy()  # each prior block's values sorted, to drop them later
    for b in range(n_prior):
        prior_sorted[(prior_ends[b - 1] if b > 0 else 0):prior_ends[b]].sort()
    window = np.empty(len(prior) + len(values))
    spare = np.empty_like(window)
    n = len(prior)
    window[:n] = np.sort(prior)
    batch_sorted = np.empty(len(values))  # each batch block's values sorted
    batch_ends = np.zeros(n_blocks, dtype=np.int64)
    first = 0  # the oldest block in the window: prior ones first, then the batch's
    for k in range(n_blocks):
        rows = np.arange(row_starts[k], row_starts[k + 1])
        known = rows[~np.isnan(values[rows])]
        percentile[rows] = np.nan
        known = known[np.argsort(values[known])]
        start = batch_ends[k - 1] if k > 0 else 0
        m = len(known)
        block = batch_sorted[start:start + m]
        block[:] = values[known]
        batch_ends[k] = start + m
        for j, q in enumerate((0.25, 0.5, 0.75)):
            if n == 0:
                quartiles[k, j] = np.nan
                continue
            virtual = (n - 1) * q
            previous = int(np.floor(virtual))
            following = min(previous + 1, n - 1)
            gamma = virtual - previous
            low, high = window[previous], window[following]
            diff = high - low
            quartiles[k, j] = high - diff * (1 - gamma) if gamma >= 0.5 else low + diff * gamma
        leaving = prior_sorted
        g = g_end = 0
        if n_prior + k + 1 - first > capacity:
            if first < n_prior:
                g, g_end = (prior_ends[first - 1] if first > 0 else 0), prior_ends[first]
            else:
                leaving = batch_sorted
                b = first - n_prior
                g, g_end = (batch_ends[b - 1] if b > 0 else 0), batch_ends[b]
            first += 1
        a = out = run = 0  # run: where the run of values equal to window[i - 1] starts
        for i in range(n):
            v = window[i]
            while a < m and block[a] < v:
                below = run if i > 0 and window[i - 1] == block[a] else i
                percentile[known[a]] = (below + i) / (2.0 * n)
                spare[out] = block[a]
                out += 1
                a += 1
            if i > 0 and v != window[i - 1]:
                run = i
            if g < g_end and v == leaving[g]:
                g += 1
            else:
                spare[out] = v
                out += 1
        while a < m:
            if n > 0:
                below = run if window[n - 1] == block[a] else n
                percentile[known[a]] = (below + n) / (2.0 * n)
            spare[out] = block[a]
            out += 1
            a += 1
        window, spare, n = spare, window, out


@compiled
def _groups(ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:  # pragma: no cover
    """Indices of `ids` grouped by id (a stable counting sort: within a group, in their
    order), and where each group starts (ids are small non-negative numbers)."""
    starts = np.zeros(ids.max() + 2 if len(ids) else 1, dtype=np.int64)
    for i in ids:
        starts[i + 1] += 1
    starts = np.cumsum(starts)
    filled = starts[:-1].copy()
    order = np.empty(len(ids), dtype=np.int64)
    for j in range(len(ids)):
        order[filled[ids[j]]] = j
        filled[ids[j]] += 1
    return order, starts


@compiled
def _sender_counts(  # pragma: no cover - compiled; tests compare with SenderStats.lookup
    ids: np.ndarray, begins: np.ndarray, ends: np.ndarray, n_prior: int, out: np.ndarray,
) -> None:
    """For each batch row (record n_prior + i, of block begins - 1), how many of its
    sender's records (events) count in its block: begin <= block < end. Records come
    with begins in order (the prior ones, 0, then the rows block after block).

    Each sender's ends are sorted in one shared buffer (insertion sort for a few, most
    senders have a few): a sorted copy per sender cost ~30 ms per 75k-tx batch in
    allocations alone. Senders without a batch row are passed over."""
    order, starts = _groups(ids)
    ended = np.empty(len(ids), dtype=ends.dtype)
    for g in range(len(starts) - 1):
        a, b = starts[g], starts[g + 1]
        if b == a or order[b - 1] < n_prior:  # no record, or the last is a prior one
            continue
        members = order[a:b]
        k = b - a
        if k > 32:
            ended[:k] = np.sort(ends[members])
        else:
            for i in range(k):
                end = ends[members[i]]
                j = i
                while j > 0 and ended[j - 1] > end:
                    ended[j] = ended[j - 1]
                    j -= 1
                ended[j] = end
        begun = gone = 0
        for j in members:
            if j < n_prior:
                continue
            block = begins[j] - 1
            while begun < k and begins[members[begun]] <= block:
                begun += 1
            while gone < k and ended[gone] <= block:
                gone += 1
            out[j - n_prior] = begun - gone


@compiled
def _selector_counts(  # pragma: no cover - compiled; tests compare with SelectorStats
    ids: np.ndarray, entries: np.ndarray, weights: np.ndarray, n_prior: int,
    window_starts: np.ndarray, window_counts: np.ndarray, unread_from: int, out: np.ndarray,
) -> None:
    """For each batch row (record n_prior + i, of entry entries[n_prior + i]), its
    selector's weight in the entries [window_starts[i], its own entry).

    Records come in entry order: the window's entries read one by one (0 ..
    unread_from - 1, the n_prior first records), then the batch's rows block after block.
    The window's later entries (unread_from up to the batch's) are not read: their
    weight is the selector's count in the window (`window_counts`) less the read ones',
    and is added where the row's window starts at or before them.
    """
    order, starts = _groups(ids)
    for g in range(len(starts) - 1):
        members = order[starts[g]:starts[g + 1]]
        read = 0.0  # the selector's weight in the entries read one by one
        for j in members:
            if j < n_prior:
                read += weights[j]
        seen = 0.0  # weight of the records passed
        before_entry = 0.0  # weight of the records before the current entry
        entry = -1
        left = 0  # the first record not before the window's start, and the weight before it
        left_weight = 0.0
        for j in members:
            if entries[j] != entry:
                entry = entries[j]
                before_entry = seen
            if j >= n_prior:
                row = j - n_prior
                while entries[members[left]] < window_starts[row]:
                    left_weight += weights[members[left]]
                    left += 1
                out[row] = before_entry - left_weight
                if window_starts[row] <= unread_from:
                    out[row] += window_counts[row] - read
            seen += weights[j]


class _BatchWindow:
    """Values of the last `capacity` batches, with a sorted copy for rank queries."""

    def __init__(self, capacity: int) -> None:
        self._batches: deque[np.ndarray] = deque(maxlen=capacity)
        self._sorted: np.ndarray | None = None

    def push(self, values: np.ndarray) -> None:
        self._batches.append(values[~np.isnan(values)])
        self._sorted = None

    def __len__(self) -> int:
        return len(self._batches)

    @property
    def values(self) -> np.ndarray:
        if self._sorted is None:
            joined = np.concatenate(self._batches) if self._batches else np.empty(0)
            self._sorted = np.sort(joined)
        return self._sorted

    def percentile(self, x: np.ndarray) -> np.ndarray:
        """Mid-rank percentile in [0, 1]: ties count half, so a common value sits mid-way."""
        window = self.values
        x = np.asarray(x, dtype=np.float64)
        if len(window) == 0:
            return np.full(x.shape, np.nan)
        below = np.searchsorted(window, x, side="left")
        at_or_below = np.searchsorted(window, x, side="right")
        out = (below + at_or_below) / (2.0 * len(window))
        return np.where(np.isnan(x), np.nan, out)

    def as_of(self, x: np.ndarray, as_of: AsOf) -> tuple[np.ndarray, np.ndarray]:
        """`percentile` of each row's value and the quartiles of each block's window (one
        row per block), the window being what it was when the row's block came: the
        batch's earlier blocks are in it (`_windows_as_of`). x's rows join the window,
        block by block, as they would be pushed."""
        blocks = list(self._batches)
        prior = np.concatenate(blocks) if blocks else np.empty(0)
        prior_ends = np.cumsum([len(b) for b in blocks], dtype=np.int64)
        row_starts = np.searchsorted(as_of.block, np.arange(len(as_of.nows) + 1))
        percentile = np.empty(len(x))
        quartiles = np.empty((len(as_of.nows), 3))
        _windows_as_of(prior, prior_ends, np.ascontiguousarray(x, dtype=np.float64),
                       row_starts.astype(np.int64), self._batches.maxlen or 0, percentile,
                       quartiles)
        return percentile, quartiles

    def log_robust_z(self, x: np.ndarray, floor: float, min_scale: float) -> np.ndarray:
        """Robust z of log(x + floor) against the window's: (log x' - median) / max(IQR/1.349,
        min_scale), below-median values clipped at -LOG_Z_CLIP.

        Quartiles are taken of the raw window and then logged (log is monotone: the same
        order statistics, without logging the whole window per call).
        """
        window = self.values
        x = np.asarray(x, dtype=np.float64)
        if len(window) == 0:
            return np.full(x.shape, np.nan)
        quartiles = np.quantile(window, [0.25, 0.5, 0.75])[None, :]
        return _log_z(x, quartiles, np.zeros(len(x), dtype=np.int64), floor, min_scale)


class FeeMarket:
    """Tips and fee caps of the last `window_blocks` blocks: what "a normal fee" is now.

    Fees are compared in log space: a fee market is lognormal-like (mainnet tips spread
    over orders of magnitude), so "how many market spreads above the median" is a ratio
    of fees, and a tip 100x a wide market is ordinary where 50x a narrow one is not.

    A block is learnt once per hash (several nodes report the same block). Empty blocks
    take a window slot without adding values: the window is "the last N blocks".
    """

    def __init__(
        self,
        window_blocks: int = 50,
        *,
        tip_floor: float = 1e8,  # 0.1 gwei: finer tip differences are noise
        fee_cap_floor: float = 1e9,  # 1 gwei
        log_min_scale: float = 0.5,  # a uniform market: one spread is a factor of ~1.6
    ) -> None:
        self.window_blocks = window_blocks
        self.tip_floor = tip_floor
        self.fee_cap_floor = fee_cap_floor
        self.log_min_scale = log_min_scale
        self._tips = _BatchWindow(window_blocks)
        self._caps = _BatchWindow(window_blocks)
        self._seen: OrderedDict[str, None] = OrderedDict()
        self._head: int | None = None
        self.base_fee: float | None = None  # of the highest block learnt; prices pending txs

    @property
    def blocks(self) -> int:
        return len(self._tips)

    @property
    def size(self) -> int:
        """Number of tip values in the window."""
        return len(self._tips.values)

    def update(
        self, blocks: Sequence[Block], frame: pl.DataFrame | None = None,
        counts: Sequence[int] | None = None,
    ) -> None:
        """Learn the tips of new blocks (in the order given; already-seen hashes skipped).

        `frame`, `counts`: `included_tx_frame(blocks)` when the caller built it already
        (the tx family scores that frame first); without them, the blocks' own txs.
        """
        fresh, kept = self._learn_heads(blocks)
        if not fresh:
            return
        if frame is None or counts is None:
            frame, counts = included_tx_frame(fresh)
        elif len(fresh) != len(blocks):  # only the rows of the blocks new to the market
            starts = np.concatenate(([0], np.cumsum(counts)))
            frame = frame[np.concatenate(
                [np.arange(starts[i], starts[i + 1]) for i in kept] or [np.empty(0, int)])]
            counts = [counts[i] for i in kept]
        skip = len(counts) - self.window_blocks  # blocks the last ones would push out
        if skip > 0:
            counts = list(counts[skip:])
            frame = frame.slice(frame.height - int(sum(counts)))
        frame = frame.select(effective_tip_expr(), fee_cap_expr())
        tips = frame["effective_tip"].fill_null(np.nan).to_numpy()
        caps = frame["fee_cap"].fill_null(np.nan).to_numpy()
        cuts = np.cumsum(counts)[:-1]
        for block_tips, block_caps in zip(
            np.split(tips, cuts), np.split(caps, cuts), strict=True
        ):
            self._tips.push(block_tips)
            self._caps.push(block_caps)

    def _learn_heads(self, blocks: Sequence[Block]) -> tuple[list[Block], list[int]]:
        """The blocks not seen before and their positions; remembers their hashes (the
        last 4 windows' worth) and the highest one's base fee (the last block at the
        highest height, as taking them one by one gives)."""
        seen, most = self._seen, 4 * self.window_blocks
        hashes = [b.hash for b in blocks]
        if blocks and len(set(hashes)) == len(hashes) and seen.keys().isdisjoint(hashes):
            # all new, as a replay's run of thousands of blocks is: no step per block
            top = max(b.number for b in blocks)
            if self._head is None or top >= self._head:
                self._head = top
                highest = next(b for b in reversed(blocks) if b.number == top)
                self.base_fee = _opt_float(highest.base_fee_per_gas)
            if len(hashes) >= most:
                self._seen = OrderedDict.fromkeys(hashes[-most:])
            else:
                seen.update(dict.fromkeys(hashes))
                while len(seen) > most:
                    seen.popitem(last=False)
            return list(blocks), list(range(len(blocks)))
        fresh: list[Block] = []
        kept: list[int] = []
        for i, b in enumerate(blocks):
            if b.hash in self._seen:
                continue
            self._seen[b.hash] = None
            if len(self._seen) > most:
                self._seen.popitem(last=False)
            fresh.append(b)
            kept.append(i)
            if self._head is None or b.number >= self._head:
                self._head = b.number
                self.base_fee = _opt_float(b.base_fee_per_gas)
        return fresh, kept

    def percentile_of(self, tips: np.ndarray) -> np.ndarray:
        """Empirical (mid-rank) percentile in [0, 1] of each tip; NaN while the window is empty."""
        return self._tips.percentile(tips)

    def tip_log_z(self, tips: np.ndarray) -> np.ndarray:
        """Robust z-score of each log tip against the window's (NaN while empty)."""
        return self._tips.log_robust_z(tips, self.tip_floor, self.log_min_scale)

    def fee_cap_log_z(self, caps: np.ndarray) -> np.ndarray:
        """Robust z-score of each log fee cap against the window's (NaN while empty)."""
        return self._caps.log_robust_z(caps, self.fee_cap_floor, self.log_min_scale)

    def as_of(
        self, tips: np.ndarray, caps: np.ndarray, as_of: AsOf
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """`percentile_of(tips)`, `tip_log_z(tips)` and `fee_cap_log_z(caps)` of a batch's
        included txs, each against the window as it was when the tx's block came (the
        batch's blocks learnt one after the other, as `update` would)."""
        percentile, tip_quartiles = self._tips.as_of(tips, as_of)
        _, cap_quartiles = self._caps.as_of(caps, as_of)
        return (
            percentile,
            _log_z(tips, tip_quartiles, as_of.block, self.tip_floor, self.log_min_scale),
            _log_z(caps, cap_quartiles, as_of.block, self.fee_cap_floor, self.log_min_scale),
        )


def _log_z(
    x: np.ndarray, quartiles: np.ndarray, block: np.ndarray, floor: float, min_scale: float
) -> np.ndarray:
    """Robust z of log(x + floor) against its window's (`_BatchWindow.log_robust_z`), each
    row against the quartiles of window `block[row]` (one row of `quartiles` each)."""
    logs = np.log(quartiles + floor)
    scale = np.maximum((logs[:, 2] - logs[:, 0]) / _IQR_TO_SIGMA, min_scale)
    z = (np.log(np.maximum(x, 0.0) + floor) - logs[block, 1]) / scale[block]
    return np.maximum(z, -LOG_Z_CLIP)


class SelectorStats:
    """Counts of 4-byte selectors over about the last `capacity` transactions.

    Learnt in batches; the oldest batches are evicted whole, so the window holds between
    `capacity - last batch` and `capacity` txs. A tx without a selector counts as "".
    """

    def __init__(self, capacity: int = 50_000) -> None:
        self.capacity = capacity
        self._batches: deque[tuple[list[str], list[int]]] = deque()
        self._sizes: deque[int] = deque()  # txs in each of _batches
        self._counts: dict[str, int] = {}
        self.total = 0

    def __len__(self) -> int:
        """Distinct selectors in the window."""
        return len(self._counts)

    def count(self, selector: str | None) -> int:
        return self._counts.get((selector or _NO_SELECTOR).lower(), 0)

    def update(self, frame: pl.DataFrame, counts: Sequence[int] | None = None) -> None:
        """Learn the selectors of a tx frame (`method_id` column). With `counts` (rows per
        block, in order) block after block, as one block at a time would: the window then
        ends at a block's edge (`rarity_as_of` relies on it)."""
        if counts is not None and len(counts) > 1:
            sizes = np.asarray(counts, dtype=np.int64)
            # only the newest blocks that fit are learnt (`_learn`): the others are not
            # even listed (a replay batch of 75k txs against a window of 50k)
            # rows from each block on to the end; 0 after the last, so one always fits
            tail = np.append(np.cumsum(sizes[::-1])[::-1], 0)
            first = int(np.argmax(tail <= self.capacity))
            keys = frame["method_id"].slice(int(tail[0] - tail[first])).fill_null(_NO_SELECTOR)
            block = np.repeat(np.arange(first, len(sizes)), sizes[first:])
            # (block, selector) pairs counted as numbers: each selector numbered once
            ids, distinct = _numbered(keys)
            pairs, ns = np.unique(block * len(distinct) + ids, return_counts=True)
            selectors = [distinct[i] for i in (pairs % len(distinct)).tolist()]
            cuts = np.searchsorted(pairs // len(distinct),
                                   np.arange(first, len(sizes) + 1)).tolist()
            per_entry = ns.tolist()

            def totals() -> tuple[list[str], list[int]]:
                return distinct, np.bincount(ids, minlength=len(distinct)).tolist()

            self._learn([(selectors[a:b], per_entry[a:b]) for a, b in pairwise(cuts)],
                        left_out=bool(sizes[:first].any()), totals=totals)
            return
        keys = frame["method_id"].fill_null(_NO_SELECTOR).tail(self.capacity)
        if keys.len() == 0:
            return
        counted = keys.value_counts(name="n")
        self._learn([(counted["method_id"].to_list(), counted["n"].to_list())])

    def _learn(
        self, batches: list[tuple[list[str], list[int]]], *, left_out: bool = False,
        totals: Callable[[], tuple[list[str], list[int]]] | None = None,
    ) -> None:
        """Learn batches in order, as one at a time would (add it, then drop the oldest
        while the window holds more than `capacity`): the window ends up the newest
        batches that fit, so only those are counted in, and only counted ones taken out.
        (A block of more than `capacity` txs learnt with others is left out whole.)
        `left_out`: older batches of the same call did not fit (the caller left them
        out). `totals`: the batches' counts summed, asked for when they all fit
        (one step per distinct selector instead of one per batch's entry)."""
        batches = [b for b in batches if b[0]]
        sizes = [sum(ns) for _, ns in batches]
        fit, room = 0, self.capacity
        for size in reversed(sizes):
            if size > room:
                break
            room -= size
            fit += 1
        incoming = self.capacity - room
        left_out = left_out or fit < len(batches)
        if self._batches and (left_out or self._sizes[-1] + incoming > self.capacity):
            # every entry leaves (even the newest does not fit beside the incoming ones)
            self._batches.clear()
            self._sizes.clear()
            self._counts.clear()
            self.total = 0
        while self._batches and self.total + incoming > self.capacity:
            self._count(self._batches.popleft(), -1)
            self.total -= self._sizes.popleft()
        if totals is not None and fit == len(batches):  # one step per distinct selector
            if self._batches:
                self._count(totals(), +1)
            else:
                self._counts = dict(zip(*totals(), strict=True))
            self._batches.extend(batches)
            self._sizes.extend(sizes)
            self.total += incoming
            return
        for batch, size in zip(batches[len(batches) - fit:], sizes[len(sizes) - fit:],
                               strict=True):
            self._batches.append(batch)
            self._sizes.append(size)
            self._count(batch, +1)
            self.total += size

    def _count(self, batch: tuple[list[str], list[int]], sign: int) -> None:
        counts = self._counts
        for key, n in zip(*batch, strict=True):  # one step per distinct selector of a batch
            left = counts.get(key, 0) + sign * n
            if left:
                counts[key] = left
            else:
                del counts[key]

    def _window_counts(self, lowered: pl.Series) -> np.ndarray:
        """Each row's selector's count in the window (lower-cased selectors)."""
        # looked up per distinct selector: handing polars every known selector on each call
        # cost more, and a replay batch of 75k txs has a few thousand distinct ones
        get = self._counts.get
        if len(lowered) <= _ROW_LOOKUP_MAX:
            return np.array([get(k, 0) for k in lowered], dtype=np.float64)
        seen = {k: float(get(k, 0)) for k in lowered.unique().to_list()}
        return lowered.replace_strict(seen, return_dtype=pl.Float64).to_numpy()

    def rarity(self, method_ids: pl.Series) -> np.ndarray:
        """-log((count + 1) / (total + 1)): 0 for the only selector seen, high for unseen ones.

        Selectors are compared as given: lower-case, as tx frames carry them
        (`tx_frame_of`, `pending_to_tx_frame`) and as `update` learns them."""
        counts = self._window_counts(method_ids.fill_null(_NO_SELECTOR))
        return -np.log((counts + 1.0) / (self.total + 1.0))

    def rarity_as_of(self, method_ids: pl.Series, as_of: AsOf) -> np.ndarray:
        """`rarity` of each row's selector against the window as it was when the row's
        block came: the batch's earlier blocks learnt one by one (`update` with counts),
        the oldest batches leaving whole while the window holds more than `capacity`.

        A row's count: the window's count now, less its selector's occurrences in the
        kept batches that have left by the row's block, plus those in the batch's blocks
        from the window's first one up to the row's (one pass over each selector's
        occurrences, `_selector_counts`). Only the kept batches that leave during this
        batch are read one by one.
        """
        blocks = len(as_of.nows)
        if blocks == 1:
            return self.rarity(method_ids)
        keys = method_ids.fill_null(_NO_SELECTOR)
        rows_before = np.concatenate([[0], np.cumsum(np.bincount(as_of.block,
                                                                 minlength=blocks))])
        # the window before block k holds the kept batches and rows_before[k] rows, less
        # the oldest whole entries that make up `excess[k]`
        excess = self.total + rows_before[:-1] - self.capacity
        most = excess.max()
        leaving: list[tuple[list[str], list[int]]] = []
        left_before = [0]  # txs of the kept batches before each leaving one
        for batch, size in zip(self._batches, self._sizes, strict=True):
            if left_before[-1] >= most:
                break
            leaving.append(batch)
            left_before.append(left_before[-1] + size)
        kept = len(self._batches)  # batch block k is entry kept + k; leaving ones 0, 1 ...
        from_kept = np.searchsorted(left_before, np.maximum(excess, 0), side="left")
        from_batch = kept + np.searchsorted(rows_before, excess - self.total, side="left")
        starts = np.where(excess <= left_before[-1], from_kept, from_batch)
        total = np.where(
            starts <= len(leaving),
            self.total - np.asarray(left_before)[np.minimum(starts, len(leaving))]
            + rows_before[:-1],
            rows_before[:-1] - rows_before[np.maximum(starts - kept, 0)],
        ).astype(np.float64)
        leaving_keys = [k for ks, _ in leaving for k in ks]
        entries = np.concatenate([
            np.repeat(np.arange(len(leaving)), [len(ks) for ks, _ in leaving]),
            kept + as_of.block,
        ]).astype(np.int64)
        weights = np.concatenate([[float(n) for _, ns in leaving for n in ns],
                                  np.ones(len(keys))])
        every_key = pl.concat([pl.Series(leaving_keys, dtype=pl.Utf8), keys], rechunk=True)
        ids, distinct = _numbered(every_key)
        # each selector's count in the window, looked up once per distinct selector
        get = self._counts.get
        in_window = np.array([get(k, 0) for k in distinct], dtype=np.float64)
        counts = np.empty(len(keys))
        _selector_counts(ids, entries, weights, len(leaving_keys),
                         starts[as_of.block].astype(np.int64),
                         in_window[ids[len(leaving_keys):]], len(leaving), counts)
        return -np.log((counts + 1.0) / (total[as_of.block] + 1.0))


_EVENTS_SCHEMA = {"sender": pl.Utf8, "at": pl.Float64}
_LAST_SCHEMA = {"sender": pl.Utf8, "last_nonce": pl.Int64, "last_seen": pl.Float64}


class SenderStats:
    """Per sender: txs in the last `window_seconds` and the highest nonce seen.

    Bounded: at most `max_events` recent (sender, time) events and `max_senders` senders
    (least recently seen ones are forgotten first). Columnar; a batch finds its senders'
    last nonces through a hash index of the remembered senders (`KeyIndex`), and
    joins only where that does not apply (nulls, a shared hash).
    """

    def __init__(
        self,
        window_seconds: float = 300.0,
        *,
        max_senders: int = 100_000,
        max_events: int = 200_000,
    ) -> None:
        self.window_seconds = window_seconds
        self.max_senders = max_senders
        self.max_events = max_events
        self._events = pl.DataFrame(schema=_EVENTS_SCHEMA)
        self._last = pl.DataFrame(schema=_LAST_SCHEMA)
        self._index: KeyIndex | None = KeyIndex.of(self._last["sender"])

    def __len__(self) -> int:
        """Senders remembered (for their last nonce)."""
        return self._last.height

    @property
    def events(self) -> int:
        return self._events.height

    def update(self, frame: pl.DataFrame, now: float | None = None) -> None:
        """Learn a tx frame (`from_address`, `nonce`, `observed_at`)."""
        if frame.height == 0:
            return
        now = _frame_now(frame, now)
        new_events = frame.select(
            pl.col("from_address").alias("sender"), pl.col("observed_at").alias("at")
        )
        self._events = (
            pl.concat([self._events, new_events])
            .filter(pl.col("at") > now - self.window_seconds)
            .tail(self.max_events)
        )
        if self._update_by_index(frame):
            return
        new_last = frame.group_by(pl.col("from_address").alias("sender")).agg(
            pl.col("nonce").max().alias("new_nonce"),
            pl.col("observed_at").max().alias("new_seen"),
        )
        last = self._last.join(new_last, on="sender", how="full", coalesce=True).select(
            "sender",
            pl.max_horizontal("last_nonce", "new_nonce").alias("last_nonce"),
            pl.max_horizontal("last_seen", "new_seen").alias("last_seen"),
        )
        if last.height > self.max_senders:  # the most recent; ties (one block) by sender
            last = _latest_senders(last, self.max_senders)
        self._last = last
        self._index = KeyIndex.of(last["sender"])

    def _update_by_index(self, frame: pl.DataFrame) -> bool:
        """`update`'s last nonces and times through the index, without the join; False
        (nothing changed) where it does not apply: nulls, NaN times, other column types,
        or two senders that share a hash."""
        index, last = self._index, self._last
        senders, nonces, seen = frame["from_address"], frame["nonce"], frame["observed_at"]
        if (index is None or senders.dtype != pl.Utf8 or nonces.dtype != pl.Int64
                or seen.dtype != pl.Float64 or senders.null_count() or nonces.null_count()
                or seen.null_count() or seen.is_nan().any()
                or last["last_nonce"].null_count() or last["last_seen"].null_count()
                or last["last_seen"].is_nan().any()):
            return False
        groups = index.grouped(last["sender"], senders)
        if groups is None:
            return False
        nonce_max, seen_max = _max_by_id(groups.ids, nonces.to_numpy(), seen.to_numpy(),
                                         len(groups.distinct))
        known = groups.rows >= 0
        last_nonce = last["last_nonce"].to_numpy().copy()
        last_seen = last["last_seen"].to_numpy().copy()
        at = groups.rows[known]
        last_nonce[at] = np.maximum(last_nonce[at], nonce_max[known])
        last_seen[at] = np.maximum(last_seen[at], seen_max[known])
        new = ~known
        updated = pl.DataFrame({
            "sender": pl.concat([last["sender"], groups.distinct.filter(new)]),
            "last_nonce": np.concatenate([last_nonce, nonce_max[new]]),
            "last_seen": np.concatenate([last_seen, seen_max[new]]),
        }, schema=_LAST_SCHEMA)
        kept_hashes = np.concatenate([index.hashes, groups.hashes[new]])
        if updated.height > self.max_senders:
            latest = _latest_rows(updated["last_seen"].to_numpy(), updated["sender"],
                                  self.max_senders)
            updated, kept_hashes = updated.filter(latest), kept_hashes[latest]
        self._index = KeyIndex.of(updated["sender"], kept_hashes)
        self._last = updated
        return True

    def _last_nonces(self, senders: pl.Series) -> pl.Series:
        """Each row's sender's last nonce (null for a sender not remembered): through the
        index (hash, find, check the strings), else a join."""
        index, last = self._index, self._last
        if index is not None and senders.dtype == pl.Utf8 and not senders.null_count():
            rows = index.rows_of(last["sender"], senders)
            if rows is not None:
                known = rows >= 0
                if not known.any():
                    return pl.repeat(None, len(senders), dtype=pl.Int64, eager=True).alias(
                        "last_nonce")
                nonces = last["last_nonce"].gather(np.maximum(rows, 0))
                if not known.all():
                    nonces = nonces.scatter(np.flatnonzero(~known), None)
                return nonces.alias("last_nonce")
        return senders.to_frame("sender").join(
            last, on="sender", how="left", maintain_order="left")["last_nonce"]

    def lookup(
        self, frame: pl.DataFrame, now: float | None = None, *, rate: bool = True
    ) -> pl.DataFrame:
        """Row-aligned `sender_rate` (txs per minute in the window; left out without
        `rate`) and `last_nonce` (or null)."""
        now = _frame_now(frame, now)
        last_nonce = self._last_nonces(frame["from_address"])
        if not rate:
            return last_nonce.to_frame()
        senders = frame.select(pl.col("from_address").alias("sender"))
        recent = (
            self._events.filter(pl.col("at") > now - self.window_seconds, pl.col("at") <= now)
            .group_by("sender")
            .agg(pl.len().cast(pl.Float64).alias("recent"))
        )
        joined = senders.join(recent, on="sender", how="left", maintain_order="left")
        return joined.select(
            (pl.col("recent").fill_null(0.0) * 60.0 / self.window_seconds).alias("sender_rate"),
        ).with_columns(last_nonce)

    def rate_as_of(
        self, frame: pl.DataFrame, as_of: AsOf
    ) -> tuple[np.ndarray, np.ndarray]:
        """Each row's `sender_rate` as of its block: its sender's txs learnt before the
        batch and in the batch's earlier blocks, within the window that ends at the
        block's clock. What `lookup` then `update`, block after block, gives. Also each
        row's sender id (`_ids`: equal senders, equal ids), which `_previous_nonce` reuses.

        An event (a tx at time `at`, of batch block j; j = -1 before the batch) counts for
        the blocks k > j whose window still holds it, `at` > nows[k] - window. With the
        clock never going back that is a range of blocks, [j + 1, end): a row's count is
        how many of its sender's ranges have begun by its block less how many have ended.
        """
        senders = frame["from_address"].fill_null("")
        cutoffs = np.maximum.accumulate(as_of.nows - self.window_seconds)
        prior = self._events.filter(pl.col("at") > cutoffs[0])
        if prior.height > 4 * frame.height:  # the batch's senders' events only: fewer ids
            prior = prior.filter(pl.col("sender").is_in(senders.implode()))
        at = np.concatenate([prior["at"].to_numpy(), frame["observed_at"].to_numpy()])
        begins = np.concatenate([np.zeros(prior.height, dtype=np.int64), as_of.block + 1])
        ends = np.maximum(np.searchsorted(cutoffs, at, side="left"), begins)
        counts = np.empty(frame.height, dtype=np.int64)
        ids = _ids(pl.concat([prior["sender"], senders]))
        _sender_counts(ids, begins, ends, prior.height, counts)
        return counts * 60.0 / self.window_seconds, ids[prior.height:]


def _latest_senders(last: pl.DataFrame, keep: int) -> pl.DataFrame:
    """The `keep` senders seen last, ties (senders of one block) broken by the higher
    address: `top_k(keep, by=["last_seen", "sender"])`'s rows (in another order)."""
    seen = last["last_seen"]
    if seen.null_count() or seen.is_nan().any():  # polars' own order for those
        return last.top_k(keep, by=["last_seen", "sender"])
    return last.filter(_latest_rows(seen.to_numpy(), last["sender"], keep))


def _latest_rows(seen: np.ndarray, senders: pl.Series, keep: int) -> np.ndarray:
    """Which rows `_latest_senders` keeps (times without NaN). The two-key top-k sorted
    the addresses of all ~110k rows (~17 ms per replay batch); this cuts at the keep-th
    latest time and sorts only the senders seen at that time (~1 ms)."""
    n = len(seen)
    if keep >= n:
        return np.ones(n, dtype=bool)
    if keep <= 0:
        return np.zeros(n, dtype=bool)
    cut = np.partition(seen, n - keep)[n - keep]
    rows = seen > cut
    ties = np.flatnonzero(seen == cut)
    highest = senders.gather(ties).arg_sort(descending=True).to_numpy()
    rows[ties[highest[:keep - int(rows.sum())]]] = True
    return rows


def _ids(strings: pl.Series) -> np.ndarray:
    """A number per distinct string (equal strings, equal numbers; 0, 1, ... in order of
    first appearance), at hashing speed. From the strings' 64-bit hashes, checked: each
    string is compared with the first string of its number, and should two strings share
    a hash, a categorical of their own numbers them instead. ~2.5 ms per 75k senders,
    against 5-7 ms for the categorical alone (sorting the strings for a rank took 4x
    longer than that). No nulls: the callers fill them."""
    if strings.n_chunks() > 1:  # gathering across chunks took 2-3x longer than a copy
        strings = strings.rechunk()
    checked = _checked_ids(strings)
    return checked[0] if checked is not None else _category_ids(strings)


def _checked_ids(strings: pl.Series) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    """`_ids` from the strings' hashes (a series of one chunk, no nulls), with the row
    where each number first appears and the hashes; None should two strings share one."""
    hashes = string_hashes(strings)
    ids, first = dense_ids(hashes)
    if (strings == strings.gather(first[ids])).all():
        return ids, first, hashes
    return None


def _category_ids(strings: pl.Series) -> np.ndarray:
    """A number per distinct string from a categorical of its own: faster than `_ids`
    for a few distinct strings repeated (selectors: 3.8 ms per 125k against 6.5 ms)."""
    codes = strings.cast(pl.Categorical(pl.Categories.random())).to_physical()
    return codes.to_numpy().astype(np.int64)


def _numbered(keys: pl.Series) -> tuple[np.ndarray, list[str]]:
    """Each key's number (`_category_ids`: 0 .. distinct - 1) and the keys by number, so
    that what is done per distinct key is done once per number."""
    ids = _category_ids(keys)
    return ids, keys.gather(_a_row_of_each(ids)).to_list()


def _a_row_of_each(ids: np.ndarray) -> np.ndarray:
    """For numbers 0 .. n - 1 (each present in `ids`), a row that has it (which of its
    rows is left to numpy: equal numbers, equal keys)."""
    rows = np.empty(int(ids.max()) + 1 if len(ids) else 0, dtype=np.int64)
    rows[ids] = np.arange(len(ids))
    return rows


def string_hashes(strings: pl.Series) -> np.ndarray:
    """Each string's 64-bit hash (polars', seed 0): equal strings, equal hashes."""
    return strings.hash(0).to_numpy()


@dataclass(frozen=True)
class KeyIndex:
    """Where each key (a sender) of a keyed state is among the state's rows: an
    open-addressing table of the keys' 64-bit hashes (`hashes`, row-aligned), at most
    half full. A batch finds its keys' rows by hash and then checks their strings,
    instead of a join that hashes all of a ~100k-row state again (`SenderStats`' two
    joins per batch took ~10 and ~15 ms; through the index ~5 and ~10 ms)."""

    table: np.ndarray
    hashes: np.ndarray

    @classmethod
    def of(cls, keys: pl.Series, hashes: np.ndarray | None = None) -> KeyIndex | None:
        """The index of these keys (`hashes`: theirs, if known); None if some are null
        or two share a hash (then the state joins)."""
        if keys.null_count():
            return None
        if hashes is None:
            hashes = string_hashes(keys)
        table, unique = _index_table(hashes)
        return cls(table, hashes) if unique else None

    def rows_of(self, state_keys: pl.Series, keys: pl.Series) -> np.ndarray | None:
        """Each key's row in the state (`state_keys`, the keys this index was made of),
        -1 where absent; None if a key shares its hash with another key of the state."""
        if keys.n_chunks() > 1:
            keys = keys.rechunk()
        rows = _index_find(self.table, self.hashes, string_hashes(keys))
        known = rows >= 0
        if known.any() and not (keys.filter(known) == state_keys.gather(rows[known])).all():
            return None
        return rows

    def grouped(self, state_keys: pl.Series, keys: pl.Series) -> KeyGroups | None:
        """A batch's keys (no nulls) numbered and found in the state; None if two keys of
        the batch, or one of the batch and one of the state, share a hash."""
        if keys.n_chunks() > 1:
            keys = keys.rechunk()
        checked = _checked_ids(keys)
        if checked is None:
            return None
        ids, first, hashes = checked
        distinct, distinct_hashes = keys.gather(first), hashes[first]
        rows = _index_find(self.table, self.hashes, distinct_hashes)
        known = rows >= 0
        if not (distinct.filter(known) == state_keys.gather(rows[known])).all():
            return None
        return KeyGroups(ids, distinct, distinct_hashes, rows)


@dataclass(frozen=True)
class KeyGroups:
    """A batch's keys by `KeyIndex.grouped`: each row's key number (`ids`, 0, 1, ... in
    order of first appearance), the distinct keys and their hashes in that order, and
    each one's row in the state (-1: new)."""

    ids: np.ndarray
    distinct: pl.Series
    hashes: np.ndarray
    rows: np.ndarray


@compiled
def _index_table(hashes: np.ndarray) -> tuple[np.ndarray, bool]:  # pragma: no cover
    """Row of each hash in an open-addressing table; False when two rows share one."""
    size = 16
    while size < 2 * len(hashes):
        size <<= 1
    mask = np.uint64(size - 1)
    table = np.full(size, -1, dtype=np.int64)
    for i in range(len(hashes)):
        slot = hashes[i] & mask
        while table[slot] >= 0:
            if hashes[table[slot]] == hashes[i]:
                return table, False
            slot = (slot + np.uint64(1)) & mask
        table[slot] = i
    return table, True


@compiled
def _index_find(
    table: np.ndarray, hashes: np.ndarray, wanted: np.ndarray
) -> np.ndarray:  # pragma: no cover
    """The row of each wanted hash in `_index_table(hashes)`'s table, -1 if absent."""
    mask = np.uint64(len(table) - 1)
    rows = np.empty(len(wanted), dtype=np.int64)
    for i in range(len(wanted)):
        slot = wanted[i] & mask
        while table[slot] >= 0 and hashes[table[slot]] != wanted[i]:
            slot = (slot + np.uint64(1)) & mask
        rows[i] = table[slot]
    return rows


@compiled
def _max_by_id(
    ids: np.ndarray, nonces: np.ndarray, seen: np.ndarray, count: int
) -> tuple[np.ndarray, np.ndarray]:  # pragma: no cover
    """Per id (0 .. count-1): the largest nonce and the latest time of its rows."""
    nonce_max = np.full(count, np.iinfo(np.int64).min, dtype=np.int64)
    seen_max = np.full(count, -np.inf)
    for i in range(len(ids)):
        k = ids[i]
        nonce_max[k] = max(nonce_max[k], nonces[i])
        seen_max[k] = max(seen_max[k], seen[i])
    return nonce_max, seen_max


@compiled
def dense_ids(hashes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:  # pragma: no cover
    """Each hash's number (0, 1, ... in order of first appearance; an open-addressing
    table at most half full), and the row where each number first appears. Strings that
    share a hash share a number: `_ids` checks them where that matters."""
    size = 16
    while size < 2 * len(hashes):
        size <<= 1
    mask = np.uint64(size - 1)
    number_at = np.full(size, -1, dtype=np.int64)
    first = np.empty(len(hashes), dtype=np.int64)
    ids = np.empty(len(hashes), dtype=np.int64)
    numbers = 0
    for i in range(len(hashes)):
        h = hashes[i]
        slot = h & mask
        while True:
            number = number_at[slot]
            if number < 0:
                number_at[slot] = numbers
                first[numbers] = i
                ids[i] = numbers
                numbers += 1
                break
            if hashes[first[number]] == h:
                ids[i] = number
                break
            slot = (slot + np.uint64(1)) & mask
    return ids, first[:numbers]


_SIDE_THREAD_MIN_ROWS = 4_096  # a smaller batch's fee windows cost less than a hand-over


def _frame_now(frame: pl.DataFrame, now: float | None) -> float:
    if now is not None:
        return now
    latest = frame["observed_at"].max() if frame.height else None
    return float(latest) if isinstance(latest, int | float) else 0.0


def _previous_nonce(frame: pl.DataFrame, sender_ids: np.ndarray | None = None) -> pl.Expr:
    """Each row's nonce of its sender's tx just below it in the frame (null for the
    sender's lowest): `nonce.shift(1).over("from_address", order_by="nonce")`, which took
    ~40 ms per replay batch of 75k txs, and two stable argsorts ~15 ms; grouping the rows
    by sender (a counting sort of their ids) and ordering each sender's txs by nonce gives
    the same in ~7 ms with the ids given, ~1.5 ms of it when no sender is busy (ties in
    the frame's order, as polars keeps them). `sender_ids`: the senders' ids when the
    caller has them (`_ids` of `from_address`, row-aligned)."""
    senders, nonces = frame["from_address"], frame["nonce"]
    if frame.height < 2 or senders.null_count() or nonces.null_count():
        return pl.col("nonce").shift(1).over("from_address", order_by="nonce")
    ids = _ids(senders) if sender_ids is None else sender_ids
    has_previous = np.zeros(frame.height, dtype=bool)
    previous = np.zeros(frame.height, dtype=np.int64)
    _previous_nonces(ids, nonces.to_numpy(), previous, has_previous)
    return pl.when(pl.Series(has_previous)).then(pl.Series(previous))


@compiled
def _previous_nonces(  # pragma: no cover - compiled; tests compare with polars' window
    ids: np.ndarray, nonces: np.ndarray, previous: np.ndarray, has_previous: np.ndarray
) -> None:
    """previous[i]: the nonce before row i's in its sender's rows ordered by nonce, then
    row (a stable sort); has_previous[i] false for each sender's first."""
    order, starts = _groups(ids)
    for g in range(len(starts) - 1):
        k = starts[g + 1] - starts[g]
        if k < 2:
            continue
        members = order[starts[g]:starts[g + 1]]  # sorted in place: order is ours
        if k > 32:  # a busy sender: a stable sort, not insertion's k * k
            members[:] = members[np.argsort(nonces[members], kind="mergesort")]
        else:  # insertion sort, stable; a sender's txs mostly come in nonce order
            for i in range(1, k):
                row = members[i]
                j = i
                while j > 0 and nonces[members[j - 1]] > nonces[row]:
                    members[j] = members[j - 1]
                    j -= 1
                members[j] = row
        for i in range(1, k):
            previous[members[i]] = nonces[members[i - 1]]
            has_previous[members[i]] = True


def _mapped(
    frame: pl.DataFrame, column: str, mapping: Mapping[str, float] | None
) -> pl.Series | pl.Expr:
    """The mapping's value (as a float) for each row's `column`, null where absent.

    Looked up row by row: the mappings (pending txs, replacements) hold up to 200k entries
    and a batch a few hundred rows, so handing polars the whole mapping cost far more.
    """
    if not mapping:
        return pl.lit(None, pl.Float64)
    get = mapping.get
    values = [None if (v := get(k)) is None else float(v) for k in frame[column]]
    return pl.Series(values, dtype=pl.Float64)


def tx_features(
    frame: pl.DataFrame,
    market: FeeMarket,
    selectors: SelectorStats,
    senders: SenderStats,
    replacements: Mapping[str, float] | None = None,
    pending_since: Mapping[str, float] | None = None,
    *,
    now: float | None = None,
    as_of: AsOf | None = None,
) -> pl.DataFrame:
    """`hash` and TX_FEATURES for each row of a tx frame, in the frame's order.

    Pure given the stats' state: score first, then update the stats. Unknowns are null:
    percentiles/z-scores while the fee window is empty, `nonce_gap` for a sender neither
    remembered nor earlier in the frame, `time_pending_seconds` for an included tx never
    seen pending (no `pending_since` entry). `replacement_count` of an unknown hash is 0.
    Pending txs are priced against the latest block's base fee. `now` (default: the
    frame's latest `observed_at`) ends the sender-rate window. With `as_of` (a batch of
    included txs) the fee features, the sender rate and the selector rarity read the fee
    market, senders and selectors as they were when each row's block came, not as at
    the batch's start.
    """
    now = _frame_now(frame, now)
    base = pl.coalesce(pl.col("base_fee_per_gas"), pl.lit(market.base_fee, pl.Float64))
    prices = frame.select(effective_tip_expr(base), fee_cap_expr())
    tips = prices["effective_tip"].fill_null(np.nan).to_numpy()
    caps = prices["fee_cap"].fill_null(np.nan).to_numpy()
    sender_ids = None
    if as_of is None:
        sender = senders.lookup(frame, now)
        fees = (market.percentile_of(tips), market.tip_log_z(tips), market.fee_cap_log_z(caps))
        rate = sender["sender_rate"]
        rarity = selectors.rarity(frame["method_id"])
    else:
        # a big batch's fee windows are walked on another thread meanwhile (compiled, no
        # GIL held): the second core is otherwise idle until the model scores the batch
        fees_later = (pool("tx-features").submit(market.as_of, tips, caps, as_of)
                      if frame.height >= _SIDE_THREAD_MIN_ROWS else None)
        sender = senders.lookup(frame, now, rate=False)
        rates, sender_ids = senders.rate_as_of(frame, as_of)
        rate = pl.Series("sender_rate", rates, pl.Float64)
        rarity = selectors.rarity_as_of(frame["method_id"], as_of)
        fees = (fees_later.result() if fees_later is not None
                else market.as_of(tips, caps, as_of))
    # a sender's earlier tx in the same batch is the better reference than the stats
    previous_nonce = pl.coalesce(_previous_nonce(frame, sender_ids), pl.col("last_nonce"))
    since = pl.coalesce(_mapped(frame, "hash", pending_since), pl.col("first_seen_at"))
    out = frame.with_columns(
        pl.Series("priority_fee_percentile", fees[0], pl.Float64),
        pl.Series("priority_fee_log_z", fees[1], pl.Float64),
        pl.Series("gas_price_log_z", fees[2], pl.Float64),
        pl.Series("selector_rarity", rarity, pl.Float64),
        rate,
        sender["last_nonce"],
    ).select(
        pl.col("hash"),
        pl.col("priority_fee_percentile").fill_nan(None),
        pl.col("priority_fee_log_z").fill_nan(None),
        pl.col("gas_price_log_z").fill_nan(None),
        (pl.col("value") / 1e9).log1p().alias("log_value"),  # log(1 + gwei): dust ~ 0
        pl.col("gas").log1p().alias("gas_limit_log"),
        pl.col("input_size").cast(pl.Float64).log1p().alias("input_size_log"),
        pl.col("selector_rarity"),
        pl.col("sender_rate"),
        (pl.col("nonce") - previous_nonce - 1).clip(lower_bound=0).cast(pl.Float64).alias(
            "nonce_gap"
        ),
        pl.col("is_contract_creation").cast(pl.Float64),
        _mapped(frame, "hash", replacements).fill_null(0.0).alias("replacement_count"),
        (pl.col("observed_at") - since).clip(lower_bound=0.0).alias("time_pending_seconds"),
    )
    return out


def complete_tx_rows(features: pl.DataFrame) -> pl.DataFrame:
    """Rows usable by a model: every feature present."""
    return features.drop_nulls(subset=list(TX_FEATURES))
