"""Per-node fork-risk features over a recent window, and one risk score from them.

Domain code: no I/O, `now` passed in. Block-derived features use each node's last
`window_blocks` blocks (one per height, last received wins); event-derived ones
(reorgs, peer and mempool snapshots) those observed in the last `window_seconds`
before `now`. Head lag and split length are the latest values, read from ChainState and
NodeHealth by the caller (`split_lengths` folds NodeHealth.splits into per-node values).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence

import numpy as np
import polars as pl

from chainwatch.schema import Block, MempoolSnapshot, PeerSnapshot, Reorg
from detector.health import Split
from detector.state import NodeKey

FORK_FEATURES: tuple[str, ...] = (
    "reorg_count",
    "max_reorg_depth",
    "head_lag",
    "split_length",
    "interval_z",
    "propagation_delay_seconds",
    "peer_drop_ratio",
    "mempool_change_ratio",
)

FORK_FEATURE_MIN_SCALE: tuple[float, ...] = (1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 0.1, 0.1)

FORK_KEYS: tuple[str, ...] = ("chain_id", "node")

_IQR_TO_SIGMA = 1.349
INTERVAL_MIN_SCALE = 1.0  # seconds: block intervals on a steady chain barely vary

# fork_risk_score: each feature saturates at its limit (s = min(|x| / limit, 1)) and
# counts with its weight. Depth and splits alone can make the score 1; the softer
# symptoms (slow intervals, late blocks, lost peers, a disturbed pool) only add to it.
FORK_RISK_LIMITS: dict[str, float] = {
    "reorg_count": 3.0,
    "max_reorg_depth": 6.0,
    "head_lag": 6.0,
    "split_length": 3.0,
    "interval_z": 6.0,
    "propagation_delay_seconds": 30.0,
    "peer_drop_ratio": 1.0,
    "mempool_change_ratio": 2.0,
}
FORK_RISK_WEIGHTS: dict[str, float] = {
    "reorg_count": 0.5,
    "max_reorg_depth": 1.0,
    "head_lag": 0.6,
    "split_length": 1.0,
    "interval_z": 0.3,
    "propagation_delay_seconds": 0.3,
    "peer_drop_ratio": 0.4,
    "mempool_change_ratio": 0.2,
}


def split_lengths(splits: Iterable[Split]) -> dict[NodeKey, int]:
    """Per node, the longest split it is part of (either side of the pair)."""
    out: dict[NodeKey, int] = {}
    for s in splits:
        for node in (s.node, s.other):
            key = (s.chain_id, node)
            out[key] = max(out.get(key, 0), s.length)
    return out


def _robust_z_of_latest(intervals: np.ndarray) -> float:
    """The latest interval against the ones before it (0 with fewer than 2 references)."""
    if len(intervals) < 3:
        return 0.0
    reference, latest = intervals[:-1], intervals[-1]
    q1, median, q3 = np.quantile(reference, [0.25, 0.5, 0.75])
    return float((latest - median) / max((q3 - q1) / _IQR_TO_SIGMA, INTERVAL_MIN_SCALE))


def fork_window_features(
    blocks: Sequence[Block],
    reorgs: Sequence[Reorg] = (),
    peers: Sequence[PeerSnapshot] = (),
    mempool: Sequence[MempoolSnapshot] = (),
    *,
    now: float,
    head_lag: Mapping[NodeKey, int] | None = None,
    split_length: Mapping[NodeKey, int] | None = None,
    window_blocks: int = 64,
    window_seconds: float = 900.0,
) -> pl.DataFrame:
    """FORK_KEYS and FORK_FEATURES, one row per node seen in any input, sorted.

    - reorg_count, max_reorg_depth: reorgs in the time window (0 without);
    - head_lag, split_length: latest values given by the caller (0 when absent);
    - interval_z: robust z of the latest block interval against the window's earlier
      ones (0 with fewer than three intervals);
    - propagation_delay_seconds: median of observed_at - timestamp (0 without blocks);
    - peer_drop_ratio: 1 - latest peer count / the window's max (0 = no loss);
    - mempool_change_ratio: (latest pending - window median) / max(median, 1), signed.
    """
    since = now - window_seconds
    keys: set[NodeKey] = {(b.chain_id, b.node) for b in blocks}
    keys |= {(r.chain_id, r.node) for r in reorgs}
    keys |= {(p.chain_id, p.node) for p in peers}
    keys |= {(m.chain_id, m.node) for m in mempool}
    keys |= set(head_lag or {}) | set(split_length or {})
    ordered = sorted(keys)
    base = pl.DataFrame(
        {
            "chain_id": [k[0] for k in ordered],
            "node": [k[1] for k in ordered],
            "head_lag": [float((head_lag or {}).get(k, 0)) for k in ordered],
            "split_length": [float((split_length or {}).get(k, 0)) for k in ordered],
        },
        schema={"chain_id": pl.Int64, "node": pl.Utf8, "head_lag": pl.Float64,
                "split_length": pl.Float64},
    )
    features = (
        base.join(_block_part(blocks, window_blocks), on=["chain_id", "node"], how="left")
        .join(_reorg_part(reorgs, since, now), on=["chain_id", "node"], how="left")
        .join(_peer_part(peers, since, now), on=["chain_id", "node"], how="left")
        .join(_mempool_part(mempool, since, now), on=["chain_id", "node"], how="left")
    )
    return features.select(
        *FORK_KEYS, *(pl.col(name).cast(pl.Float64).fill_null(0.0) for name in FORK_FEATURES)
    ).sort(*FORK_KEYS)


def _block_part(blocks: Sequence[Block], window: int) -> pl.DataFrame:
    frame = (
        pl.DataFrame(
            {
                "chain_id": [b.chain_id for b in blocks],
                "node": [b.node for b in blocks],
                "number": [b.number for b in blocks],
                "timestamp": [float(b.timestamp) for b in blocks],
                "observed_at": [b.observed_at for b in blocks],
            },
            schema={"chain_id": pl.Int64, "node": pl.Utf8, "number": pl.Int64,
                    "timestamp": pl.Float64, "observed_at": pl.Float64},
        )
        .unique(subset=["chain_id", "node", "number"], keep="last", maintain_order=True)
        .sort("chain_id", "node", "number")
    )
    tail = frame.group_by("chain_id", "node", maintain_order=True).tail(window)
    # an interval is only meaningful between consecutive heights
    interval = pl.when(pl.col("number").diff() == 1).then(pl.col("timestamp").diff())
    per_node = tail.group_by("chain_id", "node", maintain_order=True).agg(
        interval.drop_nulls().alias("intervals"),
        (pl.col("observed_at") - pl.col("timestamp")).median().alias(
            "propagation_delay_seconds"
        ),
    )
    # a handful of nodes: one small numpy call each
    z = [_robust_z_of_latest(np.asarray(v, dtype=np.float64)) for v in per_node["intervals"]]
    return per_node.select(
        "chain_id", "node", "propagation_delay_seconds",
        pl.Series("interval_z", z, pl.Float64),
    )


def _in_window(since: float, now: float) -> pl.Expr:
    return (pl.col("observed_at") > since) & (pl.col("observed_at") <= now)


def _reorg_part(reorgs: Sequence[Reorg], since: float, now: float) -> pl.DataFrame:
    frame = pl.DataFrame(
        {
            "chain_id": [r.chain_id for r in reorgs],
            "node": [r.node for r in reorgs],
            "event_id": [r.event_id for r in reorgs],
            "observed_at": [r.observed_at for r in reorgs],
            "depth": [float(r.depth) for r in reorgs],
        },
        schema={"chain_id": pl.Int64, "node": pl.Utf8, "event_id": pl.Utf8,
                "observed_at": pl.Float64, "depth": pl.Float64},
    )
    return (
        frame.unique(subset="event_id")  # at-least-once delivery
        .filter(_in_window(since, now))
        .group_by("chain_id", "node")
        .agg(pl.len().alias("reorg_count"), pl.col("depth").max().alias("max_reorg_depth"))
    )


def _peer_part(peers: Sequence[PeerSnapshot], since: float, now: float) -> pl.DataFrame:
    frame = pl.DataFrame(
        {
            "chain_id": [p.chain_id for p in peers],
            "node": [p.node for p in peers],
            "observed_at": [p.observed_at for p in peers],
            "peer_count": [float(p.peer_count) for p in peers],
        },
        schema={"chain_id": pl.Int64, "node": pl.Utf8, "observed_at": pl.Float64,
                "peer_count": pl.Float64},
    )
    latest = pl.col("peer_count").sort_by("observed_at").last()
    most = pl.col("peer_count").max()
    return (
        frame.filter(_in_window(since, now))
        .group_by("chain_id", "node")
        .agg(
            pl.when(most > 0).then(1.0 - latest / most).otherwise(0.0).alias("peer_drop_ratio")
        )
    )


def _mempool_part(mempool: Sequence[MempoolSnapshot], since: float, now: float) -> pl.DataFrame:
    frame = pl.DataFrame(
        {
            "chain_id": [m.chain_id for m in mempool],
            "node": [m.node for m in mempool],
            "observed_at": [m.observed_at for m in mempool],
            "pending": [float(m.pending_count) for m in mempool],
        },
        schema={"chain_id": pl.Int64, "node": pl.Utf8, "observed_at": pl.Float64,
                "pending": pl.Float64},
    )
    latest = pl.col("pending").sort_by("observed_at").last()
    median = pl.col("pending").median()
    return (
        frame.filter(_in_window(since, now))
        .group_by("chain_id", "node")
        .agg(
            ((latest - median) / pl.max_horizontal(median, pl.lit(1.0))).alias(
                "mempool_change_ratio"
            )
        )
    )


def fork_risk_score(
    row: Mapping[str, float | None],
    weights: Mapping[str, float] = FORK_RISK_WEIGHTS,
    limits: Mapping[str, float] = FORK_RISK_LIMITS,
) -> float:
    """1 - prod(1 - w_i * s_i), s_i = min(|x_i| / limit_i, 1): in [0, 1], deterministic.

    Monotone: a larger |feature| never lowers the score. Each weight in [0, 1] is the
    most that feature can contribute alone; missing, null or NaN features count as 0.
    """
    keep = 1.0
    for name, weight in weights.items():
        value = row.get(name)
        if value is None or math.isnan(value):
            continue
        s = min(abs(float(value)) / limits[name], 1.0)
        keep *= 1.0 - min(max(weight, 0.0), 1.0) * s
    return min(max(1.0 - keep, 0.0), 1.0)
