"""Per-node fork-risk window features and the combined fork risk score."""

import math
import random

import polars as pl
import pytest

from chainwatch.schema import Block, MempoolSnapshot, PeerSnapshot, Reorg
from detector.fork_features import (
    FORK_FEATURE_MIN_SCALE,
    FORK_FEATURES,
    FORK_KEYS,
    FORK_RISK_LIMITS,
    fork_risk_score,
    fork_window_features,
    split_lengths,
)
from detector.health import Split
from tests.fakes import make_block

T0 = 10_000.0
NOW = T0 + 600


def blocks(intervals: list[int], node: str = "n1", delay: float = 0.5) -> list[Block]:
    out: list[Block] = []
    parent, ts = "0x" + "00" * 32, int(T0)
    for n in range(len(intervals) + 1):
        if n:
            ts += intervals[n - 1]
        b = make_block(n, parent, node=node, timestamp=ts, observed_at=ts + delay)
        out.append(b)
        parent = b.hash
    return out


def reorg(event_id: str, depth: int, at: float, node: str = "n1") -> Reorg:
    return Reorg(chain_id=1, node=node, event_id=event_id, observed_at=at, old_head_number=50,
                 old_head_hash="0xold", new_head_number=50, new_head_hash="0xnew", depth=depth)


def peers(counts: list[int], node: str = "n1") -> list[PeerSnapshot]:
    return [PeerSnapshot(chain_id=1, node=node, event_id=f"p{i}", observed_at=T0 + i,
                         peer_count=c, detailed=False) for i, c in enumerate(counts)]


def pool(counts: list[int], node: str = "n1") -> list[MempoolSnapshot]:
    return [MempoolSnapshot(chain_id=1, node=node, event_id=f"m{i}", observed_at=T0 + i,
                            pending_count=c, tracked_count=0, sender_count=0)
            for i, c in enumerate(counts)]


def row(frame: pl.DataFrame, node: str = "n1") -> dict[str, object]:
    return frame.filter(pl.col("node") == node).row(0, named=True)


def test_reorgs_in_the_time_window_counted_once_each():
    events = [
        reorg("r1", 2, NOW - 10),
        reorg("r1", 2, NOW - 10),  # delivered twice
        reorg("r2", 4, NOW - 100),
        reorg("r3", 9, NOW - 1000),  # older than 15 minutes
    ]
    r = row(fork_window_features([], events, now=NOW))
    assert r["reorg_count"] == 2.0 and r["max_reorg_depth"] == 4.0


def test_interval_z_compares_the_latest_interval_with_the_earlier_ones():
    # reference 10..14: median 12, IQR 2 -> scale 2 / 1.349; latest 20
    r = row(fork_window_features(blocks([10, 11, 12, 13, 14, 20]), now=NOW))
    assert r["interval_z"] == pytest.approx(8 / (2 / 1.349))
    # steady chain: IQR 0, the scale floor (1 s) keeps one late second at z = 1
    steady = row(fork_window_features(blocks([12, 12, 12, 12, 13]), now=NOW))
    assert steady["interval_z"] == 1.0
    assert row(fork_window_features(blocks([12, 40]), now=NOW))["interval_z"] == 0.0


def test_only_the_last_window_blocks_count():
    # the slow 60 s interval falls out of a 4-block window
    r = row(fork_window_features(blocks([60, 12, 12, 12, 14]), now=NOW, window_blocks=4))
    assert r["interval_z"] == 2.0


def test_propagation_delay_is_the_median_of_observed_minus_timestamp():
    chain = blocks([12, 12, 12])
    chain[0] = chain[0].model_copy(update={"observed_at": chain[0].timestamp + 30.0})
    r = row(fork_window_features(chain, now=NOW))
    assert r["propagation_delay_seconds"] == 0.5


def test_peer_drop_and_mempool_change_use_latest_against_the_window():
    r = row(fork_window_features([], peers=peers([10, 8, 5]), mempool=pool([100, 100, 300]),
                                 now=NOW))
    assert r["peer_drop_ratio"] == 0.5  # 1 - 5 / 10
    assert r["mempool_change_ratio"] == 2.0  # (300 - 100) / 100
    calm = row(fork_window_features([], peers=peers([5, 10]), mempool=pool([0, 0]), now=NOW))
    assert calm["peer_drop_ratio"] == 0.0 and calm["mempool_change_ratio"] == 0.0


def test_head_lag_and_split_length_come_from_the_caller_per_node():
    splits = [Split(1, "n1", "n2", 40, 2), Split(1, "n1", "n3", 30, 5)]
    lengths = split_lengths(splits)
    assert lengths == {(1, "n1"): 5, (1, "n2"): 2, (1, "n3"): 5}
    out = fork_window_features(blocks([12]), now=NOW, head_lag={(1, "n2"): 3},
                               split_length=lengths)
    assert out["node"].to_list() == ["n1", "n2", "n3"]
    assert row(out, "n2")["head_lag"] == 3.0 and row(out, "n2")["split_length"] == 2.0
    assert row(out, "n1")["head_lag"] == 0.0 and row(out, "n1")["split_length"] == 5.0


def test_fork_feature_columns_are_the_declared_tuple_all_float_and_complete():
    out = fork_window_features(
        blocks([12, 12, 13, 11, 12]) + blocks([12, 12], node="n2"),
        [reorg("r", 1, NOW - 1)], peers([10, 9]), pool([50, 60]), now=NOW,
        head_lag={(1, "n2"): 1},
    )
    assert out.columns == [*FORK_KEYS, *FORK_FEATURES]
    assert len(FORK_FEATURE_MIN_SCALE) == len(FORK_FEATURES)
    features = out.select(FORK_FEATURES)
    assert out.height == 2
    assert all(dtype == pl.Float64 for dtype in features.dtypes)
    assert features.null_count().sum_horizontal().item() == 0
    assert not any(features.select(pl.all().is_nan().any()).row(0))
    assert fork_window_features([], now=NOW).columns == [*FORK_KEYS, *FORK_FEATURES]


def test_fork_risk_score_on_hand_computed_rows():
    assert fork_risk_score({name: 0.0 for name in FORK_FEATURES}) == 0.0
    assert fork_risk_score({"max_reorg_depth": 3.0}) == 0.5  # weight 1 x 3/6
    # 1 - (1 - 0.5) * (1 - 0.6 x 3/6)
    assert fork_risk_score({"max_reorg_depth": 3.0, "head_lag": 3.0}) == pytest.approx(0.65)
    assert fork_risk_score({"split_length": 3.0}) == 1.0  # saturated at its limit
    assert fork_risk_score({"interval_z": -6.0}) == pytest.approx(0.3)  # |z|
    assert fork_risk_score({"head_lag": None, "interval_z": math.nan}) == 0.0
    assert fork_risk_score({"head_lag": 3.0}, weights={"head_lag": 1.0}) == 0.5


def test_fork_risk_score_is_bounded_and_monotone_in_every_feature():
    rng = random.Random(7)
    for _ in range(200):
        features = {name: rng.uniform(0, 2 * FORK_RISK_LIMITS[name]) for name in FORK_FEATURES}
        score = fork_risk_score(features)
        assert 0.0 <= score <= 1.0
        for name in FORK_FEATURES:
            worse = dict(features, **{name: features[name] * 1.5 + 0.1})
            assert fork_risk_score(worse) >= score
