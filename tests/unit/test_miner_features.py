"""Per-miner window features: concentration, empty blocks, drift, self-dealing, censorship."""

import polars as pl
import pytest

from chainwatch.schema import Block, MempoolSnapshot, TxSummary
from detector.miner_features import (
    MINER_FEATURE_MIN_SCALE,
    MINER_FEATURES,
    MINER_KEYS,
    miner_window_features,
    snapshot_points,
)
from tests.fakes import make_block

T0 = 1000.0


def chain(miners: str, **per_block: list[object]) -> list[Block]:
    """One block per letter (the miner), 12 s apart, observed 0.5 s after its timestamp."""
    out: list[Block] = []
    parent = "0x" + "00" * 32
    for i, m in enumerate(miners):
        b = make_block(i, parent, timestamp=int(T0) + 12 * i, observed_at=T0 + 12 * i + 0.5)
        update: dict[str, object] = {"miner": f"0x{m}"}
        update.update({k: v[i] for k, v in per_block.items()})
        b = b.model_copy(update=update)
        out.append(b)
        parent = b.hash
    return out


def rows(frame: pl.DataFrame) -> dict[str, dict[str, object]]:
    return {r["miner"]: r for r in frame.iter_rows(named=True)}


def tx(index: int, sender: str) -> TxSummary:
    return TxSummary(
        hash=f"0x{sender}{index}", transaction_index=index, from_address=sender, to_address="0xc",
        value=0, gas=21_000, gas_price=10**10, nonce=index, input_size=0, method_id=None,
        is_contract_creation=False,
    )


def test_shares_hhi_and_longest_run_on_a_hand_computed_window():
    out = rows(miner_window_features(chain("aabaaacc")))
    assert {m: r["blocks"] for m, r in out.items()} == {"0xa": 5, "0xb": 1, "0xc": 2}
    assert out["0xa"]["block_share"] == 5 / 8
    assert out["0xc"]["block_share"] == 2 / 8
    assert all(r["window_hhi"] == pytest.approx(30 / 64) for r in out.values())  # 25+1+4 / 64
    assert {m: r["longest_run"] for m, r in out.items()} == {"0xa": 3.0, "0xb": 1.0, "0xc": 2.0}
    assert all(r["window_blocks"] == 8 for r in out.values())


def test_only_the_last_window_blocks_count_and_a_replaced_height_counts_once():
    blocks = chain("aaaabbbb")
    # a reorg replaced height 7: the last block received at a height wins
    replaced = blocks[7].model_copy(update={"miner": "0xc", "hash": "0xother"})
    out = rows(miner_window_features([*blocks, replaced], window=4))
    assert {m: r["blocks"] for m, r in out.items()} == {"0xb": 3, "0xc": 1}
    assert out["0xb"]["block_share"] == 0.75


def test_miner_is_compared_case_insensitively():
    blocks = chain("aa")
    blocks[1] = blocks[1].model_copy(update={"miner": "0xA"})
    out = miner_window_features(blocks)
    assert out["miner"].to_list() == ["0xa"] and out["longest_run"].to_list() == [2.0]


def test_empty_blocks_count_only_when_the_last_earlier_snapshot_was_full():
    blocks = chain("aaab", tx_count=[0, 0, 0, 0])
    seen = [b.observed_at for b in blocks]
    snapshots = [
        (seen[0] - 1, 50),  # before block 0: full
        (seen[1] - 1, 5),  # before block 1: nearly empty pool
        (seen[2], 80),  # same instant as block 2: not "before" it, block 2 sees 5
        (seen[3] - 1, 11),  # before block 3: just above the threshold
    ]
    out = rows(miner_window_features(blocks, snapshots, pending_threshold=10))
    assert out["0xa"]["empty_blocks_with_mempool"] == 1.0
    assert out["0xb"]["empty_blocks_with_mempool"] == 1.0
    assert rows(miner_window_features(blocks))["0xa"]["empty_blocks_with_mempool"] == 0.0


def test_snapshot_points_take_time_and_pending_count():
    snap = MempoolSnapshot(chain_id=1, node="n1", event_id="s", observed_at=5.0,
                           pending_count=42, tracked_count=0, sender_count=0)
    assert snapshot_points([snap]) == [(5.0, 42)]


def test_gas_use_and_timestamp_drift_are_means_over_the_miners_blocks():
    blocks = chain("aab", gas_used=[30_000_000, 0, 15_000_000])
    blocks[1] = blocks[1].model_copy(update={"observed_at": blocks[1].timestamp + 4.5})
    out = rows(miner_window_features(blocks))
    assert out["0xa"]["gas_used_ratio_mean"] == 0.5
    assert out["0xb"]["gas_used_ratio_mean"] == 0.5
    assert out["0xa"]["timestamp_drift_seconds"] == 2.5  # (0.5 + 4.5) / 2
    assert out["0xb"]["timestamp_drift_seconds"] == 0.5


def test_own_tx_front_share_is_the_share_of_own_txs_at_index_0_to_2():
    own = [tx(0, "0xa"), tx(1, "0xd"), tx(2, "0xd"), tx(3, "0xd"), tx(4, "0xa")]
    blocks = chain("ab")
    blocks[0] = blocks[0].model_copy(update={"transactions": tuple(own), "tx_count": 5})
    # 0xb's last tx is its own payout: at the end, not at the front
    payout = [tx(0, "0xd"), tx(1, "0xd"), tx(2, "0xd"), tx(3, "0xB")]
    blocks[1] = blocks[1].model_copy(update={"transactions": tuple(payout), "tx_count": 4})
    out = rows(miner_window_features(blocks))
    assert out["0xa"]["own_tx_front_share"] == 0.5
    assert out["0xb"]["own_tx_front_share"] == 0.0


def test_censorship_hint_counts_overdue_high_fee_txs_each_miner_passed_over():
    blocks = chain("aabaac")
    seen = [b.observed_at for b in blocks]
    pending_since = {
        "0xold": T0 - 100,  # before every block: 6 blocks could have included it
        "0xmid": seen[2] + 0.1,  # after block 2: blocks 3, 4, 5 passed it over
        "0xnew": seen[4] + 0.1,  # only block 5 came after: not overdue yet
        "0xcheap": T0 - 100,  # overdue but low fee: not a hint
    }
    percentile = {"0xold": 0.95, "0xmid": 0.99, "0xnew": 0.99, "0xcheap": 0.3}
    out = rows(miner_window_features(
        blocks, pending_since=pending_since, tip_percentile=percentile, censor_blocks=2
    ))
    assert out["0xa"]["censorship_hint"] == 2.0  # produced blocks after both
    assert out["0xb"]["censorship_hint"] == 1.0  # its only block came before 0xmid arrived
    assert out["0xc"]["censorship_hint"] == 2.0


def test_blocks_of_several_nodes_are_refused():
    blocks = chain("ab")
    blocks[1] = blocks[1].model_copy(update={"node": "n2"})
    with pytest.raises(ValueError, match="one node"):
        miner_window_features(blocks)


def test_miner_feature_columns_are_the_declared_tuple_all_float_and_complete():
    blocks = chain("abcab", tx_count=[0, 3, 0, 1, 0])
    out = miner_window_features(
        blocks, [(T0 - 1, 20)], pending_since={"0x1": T0 - 5}, tip_percentile={"0x1": 0.95}
    )
    assert out.columns == [*MINER_KEYS, *MINER_FEATURES]
    assert len(MINER_FEATURE_MIN_SCALE) == len(MINER_FEATURES)
    features = out.select(MINER_FEATURES)
    assert all(dtype == pl.Float64 for dtype in features.dtypes)
    assert features.null_count().sum_horizontal().item() == 0
    assert not any(features.select(pl.all().is_nan().any()).row(0))
    assert miner_window_features([]).columns == [*MINER_KEYS, *MINER_FEATURES]
