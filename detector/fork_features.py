"""Per-node fork-risk features over a recent window, and one risk score from them.

Domain code: no I/O, `now` passed in. Block-derived features use each node's last
`window_blocks` blocks (one per height, last received wins); event-derived ones
(reorgs, peer and mempool snapshots) those observed in the last `window_seconds`
before `now`. Head lag and split length are the latest values, read from ChainState and
NodeHealth by the caller (`split_lengths` folds NodeHealth.splits into per-node values).
"""

from __future__ import annotations

import itertools
import math
import operator
from collections.abc import Iterable, Mapping, Sequence
from typing import TypeVar

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


_NODE_KEY = operator.attrgetter("chain_id", "node")
_OBSERVED_AT = operator.attrgetter("observed_at")
RecordT = TypeVar("RecordT")


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

    Computed in plain Python: the inputs are a few nodes' small windows and this runs on
    every batch (every block when replaying per block), where building and joining
    polars frames cost ~10 ms a call. Medians are polars' (lower + (upper - lower) / 2),
    so the values are the same as the frame version's to the last bit.
    """
    since = now - window_seconds
    lags = head_lag or {}
    splits = split_length or {}
    keys: set[NodeKey] = set(map(_NODE_KEY, blocks))
    keys.update(map(_NODE_KEY, reorgs), map(_NODE_KEY, peers), map(_NODE_KEY, mempool))
    keys |= set(lags) | set(splits)
    ordered = sorted(keys)
    block_part = _block_part(blocks, window_blocks)
    reorg_part = _reorg_part(reorgs, since, now)
    peer_part = _peer_part(peers, since, now)
    mempool_part = _mempool_part(mempool, since, now)
    columns: dict[str, list[float]] = {name: [] for name in FORK_FEATURES}
    for key in ordered:
        count, depth = reorg_part.get(key, (0.0, 0.0))
        propagation, interval_z = block_part.get(key, (0.0, 0.0))
        row = {
            "reorg_count": count,
            "max_reorg_depth": depth,
            "head_lag": float(lags.get(key, 0)),
            "split_length": float(splits.get(key, 0)),
            "interval_z": interval_z,
            "propagation_delay_seconds": propagation,
            "peer_drop_ratio": peer_part.get(key, 0.0),
            "mempool_change_ratio": mempool_part.get(key, 0.0),
        }
        for name in FORK_FEATURES:
            columns[name].append(row[name])
    return pl.DataFrame(
        {"chain_id": [k[0] for k in ordered], "node": [k[1] for k in ordered], **columns},
        schema={"chain_id": pl.Int64, "node": pl.Utf8,
                **dict.fromkeys(FORK_FEATURES, pl.Float64)},
    )


def _median(values: list[float]) -> float:
    """Polars' median: the middle value, or lower + (upper - lower) * 0.5 between two."""
    ordered = sorted(values)
    n = len(ordered)
    if n % 2:
        return ordered[n // 2]
    lower, upper = ordered[n // 2 - 1], ordered[n // 2]
    return lower + (upper - lower) * 0.5


def _block_part(blocks: Sequence[Block], window: int) -> dict[NodeKey, tuple[float, float]]:
    """Per node: (median propagation delay, interval_z) over its last `window` heights."""
    latest: dict[tuple[int, str, int], Block] = {}
    for b in blocks:  # one block per height: the last received wins
        height = (b.chain_id, b.node, b.number)
        latest.pop(height, None)
        latest[height] = b
    per_node: dict[NodeKey, list[Block]] = {}
    for (chain_id, node, _), b in sorted(latest.items(), key=lambda kv: kv[0]):
        per_node.setdefault((chain_id, node), []).append(b)
    out: dict[NodeKey, tuple[float, float]] = {}
    for key, node_blocks in per_node.items():
        tail = node_blocks[-window:] if window > 0 else []
        if not tail:
            continue
        # an interval is only meaningful between consecutive heights
        intervals = [
            float(b.timestamp) - float(a.timestamp)
            for a, b in itertools.pairwise(tail)
            if b.number - a.number == 1
        ]
        delay = _median([b.observed_at - float(b.timestamp) for b in tail])
        out[key] = (delay, _robust_z_of_latest(np.asarray(intervals, dtype=np.float64)))
    return out


def _in_window(observed_at: float, since: float, now: float) -> bool:
    return since < observed_at <= now


def _windowed(records: Sequence[RecordT], since: float, now: float) -> list[RecordT]:
    """The records observed in (since, now], in their order.

    The snapshot windows hold up to 5,000 records of which a few hundred are recent:
    one vectorised comparison instead of a Python step per record.
    """
    if not records:
        return []
    items = records if isinstance(records, list) else list(records)
    at = np.fromiter(map(_OBSERVED_AT, items), dtype=np.float64, count=len(items))
    return [items[i] for i in np.flatnonzero((at > since) & (at <= now)).tolist()]


def _reorg_part(
    reorgs: Sequence[Reorg], since: float, now: float
) -> dict[NodeKey, tuple[float, float]]:
    """Per node: (reorgs in the window, deepest of them); each event id counted once."""
    seen: set[str] = set()
    out: dict[NodeKey, tuple[float, float]] = {}
    for r in reorgs:
        if r.event_id in seen:  # at-least-once delivery
            continue
        seen.add(r.event_id)
        if not _in_window(r.observed_at, since, now):
            continue
        key = (r.chain_id, r.node)
        count, depth = out.get(key, (0.0, float("-inf")))
        out[key] = (count + 1.0, max(depth, float(r.depth)))
    return out


def _latest_and_values(
    records: Sequence[PeerSnapshot] | Sequence[MempoolSnapshot], value: str, since: float,
    now: float,
) -> dict[NodeKey, tuple[float, list[float]]]:
    """Per node, of the records in the window: (value of the latest one, all values)."""
    latest: dict[NodeKey, tuple[float, float]] = {}  # key -> (observed_at, value)
    values: dict[NodeKey, list[float]] = {}
    for r in _windowed(records, since, now):
        key = (r.chain_id, r.node)
        v = float(getattr(r, value))
        values.setdefault(key, []).append(v)
        last = latest.get(key)
        if last is None or r.observed_at >= last[0]:
            latest[key] = (r.observed_at, v)
    return {key: (latest[key][1], vs) for key, vs in values.items()}


def _peer_part(peers: Sequence[PeerSnapshot], since: float, now: float) -> dict[NodeKey, float]:
    out: dict[NodeKey, float] = {}
    for key, (latest, counts) in _latest_and_values(peers, "peer_count", since, now).items():
        most = max(counts)
        out[key] = 1.0 - latest / most if most > 0 else 0.0
    return out


def _mempool_part(
    mempool: Sequence[MempoolSnapshot], since: float, now: float
) -> dict[NodeKey, float]:
    out: dict[NodeKey, float] = {}
    for key, (latest, pending) in _latest_and_values(mempool, "pending_count", since,
                                                      now).items():
        median = _median(pending)
        out[key] = (latest - median) / max(median, 1.0)
    return out


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
