"""Per-miner features over a node's recent blocks. Domain code: no I/O, time passed in.

`miner` is the block's coinbase / fee recipient. Over the last `window` blocks of one node
(one block per height: the last one received wins, so a reorg's replacement counts),
each miner gets one row. Concentration (share, HHI, runs), empty blocks while the
mempool was full, gas use, clock drift, front-of-block self-dealing and a censorship
hint are what distinguishes a misbehaving producer from an unlucky one.

Mempool snapshots are (observed_at, pending_count) pairs on chainwatch's clock, compared
with the block's `observed_at` (same clock): the pool "before the block" is the last
snapshot taken strictly before the node saw the block.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import polars as pl

from chainwatch.schema import Block, MempoolSnapshot

MINER_FEATURES: tuple[str, ...] = (
    "block_share",
    "window_hhi",
    "empty_blocks_with_mempool",
    "gas_used_ratio_mean",
    "longest_run",
    "timestamp_drift_seconds",
    "own_tx_front_share",
    "censorship_hint",
)

MINER_FEATURE_MIN_SCALE: tuple[float, ...] = (0.05, 0.02, 1.0, 0.05, 1.0, 1.0, 0.1, 1.0)

# Columns before the features: who, and how many blocks the shares are out of.
MINER_KEYS: tuple[str, ...] = ("chain_id", "node", "miner", "blocks", "window_blocks")

FRONT_SLOTS = 3  # "placed at the front" = transaction index 0, 1 or 2
TOP_DECILE = 0.9

Snapshot = tuple[float, int]  # (observed_at, pending_count)


def snapshot_points(snapshots: Sequence[MempoolSnapshot]) -> list[Snapshot]:
    """(observed_at, pending_count) pairs from mempool snapshot records."""
    return [(s.observed_at, s.pending_count) for s in snapshots]


def window_blocks_frame(blocks: Sequence[Block], window: int | None = None) -> pl.DataFrame:
    """One row per height of one node (last received wins), ascending, the last `window`."""
    nodes = {(b.chain_id, b.node) for b in blocks}
    if len(nodes) > 1:
        raise ValueError(f"blocks of one node expected, got {len(nodes)} nodes")
    frame = pl.DataFrame(
        {
            "chain_id": [b.chain_id for b in blocks],
            "node": [b.node for b in blocks],
            "number": [b.number for b in blocks],
            "hash": [b.hash for b in blocks],
            "miner": [b.miner.lower() for b in blocks],
            "timestamp": [float(b.timestamp) for b in blocks],
            "observed_at": [b.observed_at for b in blocks],
            "tx_count": [b.tx_count for b in blocks],
            "gas_used": [float(b.gas_used) for b in blocks],
            "gas_limit": [float(b.gas_limit) for b in blocks],
        },
        schema={
            "chain_id": pl.Int64, "node": pl.Utf8, "number": pl.Int64, "hash": pl.Utf8,
            "miner": pl.Utf8, "timestamp": pl.Float64, "observed_at": pl.Float64,
            "tx_count": pl.Int64, "gas_used": pl.Float64, "gas_limit": pl.Float64,
        },
    )
    frame = frame.unique(subset="number", keep="last", maintain_order=True).sort("number")
    return frame.tail(window) if window is not None else frame


def empty_with_mempool(
    frame: pl.DataFrame, snapshots: Sequence[Snapshot], pending_threshold: int
) -> pl.Series:
    """Per block of a window frame: empty while the last earlier snapshot showed a full pool."""
    points = pl.DataFrame(
        {"at": [float(t) for t, _ in snapshots], "pending": [int(n) for _, n in snapshots]},
        schema={"at": pl.Float64, "pending": pl.Int64},
    ).sort("at")
    before = (
        frame.select(pl.int_range(pl.len()).alias("row"), "observed_at", "tx_count")
        .sort("observed_at")
        .join_asof(
            points, left_on="observed_at", right_on="at", strategy="backward",
            allow_exact_matches=False,
        )
        .sort("row")
    )
    flag = (pl.col("tx_count") == 0) & (pl.col("pending").fill_null(0) > pending_threshold)
    return before.select(flag.alias("empty_with_mempool"))["empty_with_mempool"]


def share_frame(producers: Sequence[str], *, chain_id: int, node: str) -> pl.DataFrame:
    """MINER_KEYS plus block_share and window_hhi from a window's producers (one per height).

    The live path needs only these two per block; miner_window_features builds every
    feature (~40 ms per call on mainnet-sized blocks) for analysis and tests.
    """
    counts: dict[str, int] = {}
    for miner in producers:
        counts[miner] = counts.get(miner, 0) + 1
    total = len(producers)
    shares = {m: c / total for m, c in counts.items()}
    hhi = sum(v * v for v in shares.values())
    miners = sorted(counts, key=lambda m: (-counts[m], m))
    return pl.DataFrame(
        {
            "chain_id": [chain_id] * len(miners),
            "node": [node] * len(miners),
            "miner": miners,
            "blocks": [counts[m] for m in miners],
            "window_blocks": [total] * len(miners),
            "block_share": [shares[m] for m in miners],
            "window_hhi": [hhi] * len(miners),
        },
        schema={"chain_id": pl.Int64, "node": pl.Utf8, "miner": pl.Utf8, "blocks": pl.Int64,
                "window_blocks": pl.Int64, "block_share": pl.Float64, "window_hhi": pl.Float64},
    )


def miner_window_features(
    blocks: Sequence[Block],
    snapshots: Sequence[Snapshot] = (),
    *,
    window: int = 100,
    pending_threshold: int = 10,
    pending_since: Mapping[str, float] | None = None,
    tip_percentile: Mapping[str, float] | None = None,
    censor_blocks: int = 3,
) -> pl.DataFrame:
    """MINER_KEYS and MINER_FEATURES, one row per miner of the node's last `window` blocks.

    Features (all Float64, complete when blocks are given):
    - block_share: the miner's blocks / blocks in the window; window_hhi: sum of all
      miners' squared shares (1.0 = one producer), the same on every row;
    - empty_blocks_with_mempool: its blocks with no tx while the pool held more than
      `pending_threshold` pending txs (0 without snapshots);
    - gas_used_ratio_mean; longest_run: most consecutive heights it produced;
    - timestamp_drift_seconds: mean of observed_at - timestamp (a producer that lies about
      its clock, or whose blocks arrive late);
    - own_tx_front_share: of the txs sent from the miner's own address in its blocks, the
      share at index 0..2 (0 when it sent none): producers front-running with their own
      transactions; builders' payouts sit at the end and do not count;
    - censorship_hint: high-fee txs (tip percentile >= 0.9 in `tip_percentile`) still
      pending (`pending_since`: hash -> first seen, of txs pending NOW) although more than
      `censor_blocks` window blocks were seen after they arrived, counted for every miner
      that produced one of those blocks. Only a hint: full blocks, nonce gaps and fee
      caps below the base fee also keep txs out.
    """
    frame = window_blocks_frame(blocks, window)
    total = frame.height
    flags = empty_with_mempool(frame, snapshots, pending_threshold)
    frame = frame.with_columns(
        flags,
        pl.col("miner").rle_id().alias("run"),
        pl.when(pl.col("gas_limit") > 0)
        .then(pl.col("gas_used") / pl.col("gas_limit"))
        .otherwise(0.0)
        .alias("gas_used_ratio"),
    )
    runs = frame.group_by("miner", "run").agg(pl.len().alias("run_len"))
    longest = runs.group_by("miner").agg(pl.col("run_len").max().alias("longest_run"))
    per_miner = (
        frame.group_by("chain_id", "node", "miner")
        .agg(
            pl.len().alias("blocks"),
            pl.col("empty_with_mempool").sum().cast(pl.Float64).alias(
                "empty_blocks_with_mempool"
            ),
            pl.col("gas_used_ratio").mean().alias("gas_used_ratio_mean"),
            (pl.col("observed_at") - pl.col("timestamp")).mean().alias("timestamp_drift_seconds"),
            pl.col("observed_at").max().alias("last_seen"),
        )
        .with_columns(
            pl.lit(total, pl.Int64).alias("window_blocks"),
            (pl.col("blocks") / total).alias("block_share"),
        )
        .with_columns((pl.col("block_share") ** 2).sum().alias("window_hhi"))
        .join(longest, on="miner", how="left")
        .join(_own_front_share(blocks, frame), on="miner", how="left")
    )
    hint = _censorship_hint(
        frame, per_miner["last_seen"].to_numpy(), pending_since, tip_percentile, censor_blocks
    )
    return (
        per_miner.with_columns(
            pl.Series("censorship_hint", hint, pl.Float64),
            pl.col("own_tx_front_share").fill_null(0.0),
            pl.col("blocks").cast(pl.Int64),
            pl.col("longest_run").cast(pl.Float64),
        )
        .select(*MINER_KEYS, *MINER_FEATURES)
        .sort("blocks", "miner", descending=[True, False])
    )


def _own_front_share(blocks: Sequence[Block], frame: pl.DataFrame) -> pl.DataFrame:
    """Per miner: own txs at index < FRONT_SLOTS / own txs, over the window's blocks.

    A plain loop over the window's transactions: building a tx frame of the whole window
    on every block cost ~50 ms on mainnet-sized blocks, this costs a few.
    """
    in_window = set(frame["hash"].to_list())
    own: dict[str, int] = {}
    front: dict[str, int] = {}
    for b in blocks:
        if b.hash not in in_window:
            continue
        miner = b.miner.lower()
        for tx in b.transactions:
            if tx.from_address.lower() == miner:
                own[miner] = own.get(miner, 0) + 1
                front[miner] = front.get(miner, 0) + (tx.transaction_index < FRONT_SLOTS)
    miners = sorted(own)
    return pl.DataFrame(
        {"miner": miners, "own_tx_front_share": [front[m] / own[m] for m in miners]},
        schema={"miner": pl.Utf8, "own_tx_front_share": pl.Float64},
    )


def _censorship_hint(
    frame: pl.DataFrame,
    last_seen: np.ndarray,
    pending_since: Mapping[str, float] | None,
    tip_percentile: Mapping[str, float] | None,
    censor_blocks: int,
) -> np.ndarray:
    """Per miner (by when its latest block was seen): overdue high-fee txs it passed over."""
    if not pending_since or not tip_percentile:
        return np.zeros(len(last_seen))
    since = np.array(
        [t for h, t in pending_since.items() if tip_percentile.get(h, 0.0) >= TOP_DECILE],
        dtype=np.float64,
    )
    order = np.sort(frame["observed_at"].to_numpy())
    # window blocks seen after each tx arrived: they all could have included it
    first_after = np.searchsorted(order, since, side="right")
    overdue = np.sort(first_after[len(order) - first_after > censor_blocks])
    # a miner passed over a tx when one of its blocks came after the tx arrived
    positions = np.searchsorted(order, last_seen, side="left")
    return np.searchsorted(overdue, positions, side="right").astype(np.float64)
