"""Transaction features: frames from blocks and pending txs, fee market, selectors, senders."""

import math

import numpy as np
import polars as pl
import pytest

from chainwatch.schema import Block, PendingTx, TxSummary
from detector.tx_features import (
    _TX_COLUMNS,
    TX_FEATURE_MIN_SCALE,
    TX_FEATURES,
    TX_FRAME_SCHEMA,
    FeeMarket,
    SelectorStats,
    SenderStats,
    _a_row_of_each,
    _category_ids,
    _ids,
    _latest_senders,
    _previous_nonce,
    blocks_to_tx_frame,
    complete_tx_rows,
    effective_tip,
    effective_tip_expr,
    included_tx_frame,
    pending_to_tx_frame,
    tx_features,
    tx_frame_of,
)
from tests.fakes import make_block

GWEI = 10**9
BASE = 10 * GWEI  # make_block's base fee


def tx(
    index: int,
    *,
    sender: str = "0xAA",
    to: str | None = "0xBB",
    nonce: int = 0,
    value: int = 10**18,
    gas_price: int | None = None,
    max_fee: int | None = 30 * GWEI,
    tip: int | None = 2 * GWEI,
    method: str | None = "0xA9059CBB",
    tag: str = "",
) -> TxSummary:
    return TxSummary(
        hash=f"0x{tag}{index:x}", transaction_index=index, from_address=sender,
        to_address=to, value=value, gas=21_000, gas_price=gas_price, max_fee_per_gas=max_fee,
        max_priority_fee_per_gas=tip, nonce=nonce, tx_type=2 if max_fee else 0,
        input_size=68, method_id=method, is_contract_creation=to is None,
    )


def legacy(index: int, tip_gwei: float, tag: str = "") -> TxSummary:
    """A legacy tx whose effective tip against BASE is `tip_gwei`."""
    return tx(index, gas_price=BASE + int(tip_gwei * GWEI), max_fee=None, tip=None, tag=tag)


def block(number: int, txs: tuple[TxSummary, ...], **fields: object) -> Block:
    b = make_block(number, f"0x{number - 1:064x}", observed_at=1000.0 + 12 * number)
    return b.model_copy(update={"transactions": txs, "tx_count": len(txs), **fields})


def pending(h: str, *, sender: str = "0xaa", nonce: int = 0, at: float = 2000.0) -> PendingTx:
    return PendingTx(
        chain_id=1, node="n1", event_id=h, observed_at=at, first_seen_at=at - 1.0, hash=h,
        from_address=sender, to_address="0xbb", nonce=nonce, value=0, gas=50_000,
        max_fee_per_gas=30 * GWEI, max_priority_fee_per_gas=3 * GWEI, tx_type=2,
        input_size=4, method_id="0xdeadbeef", is_contract_creation=False,
    )


def test_blocks_to_tx_frame_has_one_row_per_tx_with_its_block_columns():
    b1 = block(1, (tx(0), tx(1, sender="0xCC", value=2**70)))
    b2 = block(2, (tx(0, tag="b"),), base_fee_per_gas=None)
    frame = blocks_to_tx_frame([b1, block(3, ()), b2])
    assert frame.schema == pl.Schema(TX_FRAME_SCHEMA)
    assert frame["block_number"].to_list() == [1, 1, 2]
    assert frame["tx_index"].to_list() == [0, 1, 0]
    assert frame["from_address"].to_list() == ["0xaa", "0xcc", "0xaa"]  # lower-cased
    assert frame["method_id"].to_list() == ["0xa9059cbb"] * 3
    assert frame["value"].to_list() == [1e18, float(2**70), 1e18]  # beyond Int64
    assert frame["base_fee_per_gas"].to_list() == [float(BASE), float(BASE), None]
    assert frame["observed_at"].to_list() == [1012.0, 1012.0, 1024.0]
    assert frame["source"].unique().to_list() == ["block"]
    assert frame["first_seen_at"].null_count() == 3
    assert blocks_to_tx_frame([]).schema == pl.Schema(TX_FRAME_SCHEMA)


def test_blocks_without_txs_give_the_empty_tx_frame_and_a_zero_count_each():
    empty = [block(3, ()), block(4, ())]
    frame, counts = included_tx_frame(empty)
    # what blocks_to_tx_frame built before its shortcut: block columns, no tx rows
    no_txs = pl.DataFrame(schema={k: TX_FRAME_SCHEMA[k] for k in ("tx_index", *_TX_COLUMNS)})
    assert frame.equals(tx_frame_of(empty, [0, 0], no_txs)) and frame.height == 0
    assert frame.schema == pl.Schema(TX_FRAME_SCHEMA)
    assert counts == [0, 0]


def test_pending_to_tx_frame_has_the_same_columns_with_block_fields_null():
    frame = pending_to_tx_frame([pending("0x1"), pending("0x2", sender="0xDD", nonce=3)])
    assert frame.schema == pl.Schema(TX_FRAME_SCHEMA)
    assert frame["from_address"].to_list() == ["0xaa", "0xdd"]
    assert frame["nonce"].to_list() == [0, 3]
    assert frame["first_seen_at"].to_list() == [1999.0, 1999.0]
    for column in ("block_number", "block_hash", "tx_index", "base_fee_per_gas", "timestamp"):
        assert frame[column].null_count() == 2
    assert pending_to_tx_frame([]).height == 0


def test_effective_tip_follows_eip1559_and_legacy_rules_floored_at_zero():
    b = block(1, (
        tx(0, max_fee=30 * GWEI, tip=2 * GWEI),  # tip fits under the cap: 2
        tx(1, max_fee=12 * GWEI, tip=5 * GWEI),  # capped: 12 - 10 = 2
        tx(2, max_fee=8 * GWEI, tip=2 * GWEI),  # cap below the base fee: 0
        legacy(3, 3),  # 13 - 10 = 3
        tx(4, gas_price=9 * GWEI, max_fee=None, tip=None),  # below base: 0
        tx(5, gas_price=None, max_fee=None, tip=None),  # no fee known: null
    ))
    tips = blocks_to_tx_frame([b]).select(effective_tip_expr())["effective_tip"].to_list()
    assert tips == [2e9, 2e9, 0.0, 3e9, 0.0, None]
    # the scalar twin the rules use gives the same tips
    assert [effective_tip(t, b.base_fee_per_gas) for t in b.transactions] == tips


def test_fee_market_percentile_is_mid_rank_against_the_window():
    market = FeeMarket()
    market.update([block(1, (legacy(0, 1), legacy(1, 2))), block(2, (legacy(0, 3), legacy(1, 4)))])
    assert market.blocks == 2 and market.size == 4
    pct = market.percentile_of(np.array([0.0, 2.5, 3.0, 5.0, np.nan]) * GWEI)
    assert pct[:4].tolist() == [0.0, 0.5, 0.625, 1.0]
    assert math.isnan(pct[4])


def test_fee_market_log_z_is_in_market_spreads_with_low_fees_clipped():
    market = FeeMarket()  # tip floor 0.1 gwei, log scale at least 0.5
    market.update([block(1, tuple(legacy(i, t) for i, t in enumerate((1, 2, 4, 8))))])
    # quartiles 1.75, 3, 5 gwei: log(5.1 / 1.85) / 1.349 = 0.75 market spreads in log
    scale = math.log(5.1 / 1.85) / 1.349
    z = market.tip_log_z(np.array([3.0, 30.9, 309.9, 0.0]) * GWEI)
    assert z[:3] == pytest.approx([0.0, math.log(10) / scale, math.log(100) / scale])
    assert z[3] == -3.0  # log(0.1 / 3.1) / 0.75 = -4.6: a cheap tx is not far out
    # a uniform market: the spread's floor (0.5) keeps a 10x tip from being 30 spreads out
    uniform = FeeMarket()
    uniform.update([block(1, tuple(legacy(i, 2) for i in range(8)))])
    assert uniform.tip_log_z(np.array([20.9 * GWEI])) == pytest.approx(
        [math.log(21.0 / 2.1) / 0.5]
    )


def test_fee_market_keeps_only_the_last_blocks_and_learns_a_block_once():
    market = FeeMarket(window_blocks=3)
    blocks = [block(n, (legacy(0, n),)) for n in range(1, 6)]
    market.update(blocks[:4])
    market.update(blocks[3:])  # block 4 again: skipped
    assert market.blocks == 3 and market.size == 3
    # tips 3, 4, 5 gwei remain: 2 gwei is below all of them
    assert market.percentile_of(np.array([2.0 * GWEI])).tolist() == [0.0]
    assert market.percentile_of(np.array([4.0 * GWEI])).tolist() == [0.5]
    assert market.base_fee == float(BASE)


def test_fee_market_learns_a_long_batch_as_its_blocks_one_by_one():
    """Only the last window_blocks blocks of a batch are pushed: the same window."""
    rng = np.random.default_rng(3)
    blocks = [block(n, tuple(legacy(i, float(rng.integers(1, 50)))
                              for i in range(int(rng.integers(0, 4)))))
              for n in range(1, 40)]
    probe = np.arange(0.0, 60.0, 0.5) * GWEI
    for given in (None, "frame"):
        batched, one_by_one = FeeMarket(window_blocks=7), FeeMarket(window_blocks=7)
        repeated = [*blocks[:20], blocks[5], *blocks[20:], blocks[38]]  # seen ones skipped
        if given:
            frame, counts = included_tx_frame(repeated)
            batched.update(repeated, frame, counts)
        else:
            batched.update(repeated)
        for b in blocks:
            one_by_one.update([b])
        assert batched.blocks == one_by_one.blocks == 7
        assert np.array_equal(batched.percentile_of(probe), one_by_one.percentile_of(probe))
        assert np.array_equal(batched.tip_log_z(probe), one_by_one.tip_log_z(probe))
        assert np.array_equal(batched.fee_cap_log_z(probe), one_by_one.fee_cap_log_z(probe))


@pytest.mark.parametrize("seed", range(6))
def test_fee_market_learns_runs_of_new_blocks_as_one_at_a_time(seed):
    """A call whose blocks are all new (a replay's run) takes a shortcut: the same hashes
    remembered, the same head and base fee, the same window, as the blocks one by one,
    also with heights going back (a reorg) and calls mixing new and seen blocks."""
    rng = np.random.default_rng(seed)
    blocks: list[Block] = []
    for i in range(400):
        number = int(rng.integers(1, 300)) if rng.random() < 0.1 else i  # some go back
        if i % 7 == 6:
            number = blocks[-1].number  # a sibling: the last block at a height wins
        blocks.append(block(number, (legacy(0, float(rng.integers(1, 50)), tag=f"{i}x"),),
                            hash=f"0x{i:064x}",
                            base_fee_per_gas=int(rng.integers(1, 10**6)) * GWEI))
    probe = np.arange(0.0, 60.0, 0.5) * GWEI
    runs, one_by_one = FeeMarket(window_blocks=9), FeeMarket(window_blocks=9)
    start = 0
    while start < len(blocks):
        size = int(rng.choice([1, 2, 30, 35, 36, 37, 80]))
        chunk = blocks[start:start + size]
        if rng.random() < 0.3:  # a seen block again: the careful path
            chunk = [*chunk, blocks[max(start - 3, 0)]]
        runs.update(chunk)
        for b in chunk:
            one_by_one.update([b, b])  # (a hash twice: never the shortcut; skipped twice)
        start += size
        assert list(runs._seen) == list(one_by_one._seen)
        assert (runs._head, runs.base_fee) == (one_by_one._head, one_by_one.base_fee)
        assert np.array_equal(runs.percentile_of(probe), one_by_one.percentile_of(probe))


def test_fee_market_is_unknown_before_any_block():
    market = FeeMarket()
    assert np.isnan(market.percentile_of(np.array([1.0]))).all()
    assert np.isnan(market.tip_log_z(np.array([1.0]))).all()
    assert np.isnan(market.fee_cap_log_z(np.array([1.0]))).all()


def test_selector_rarity_is_minus_log_of_smoothed_frequency():
    stats = SelectorStats()
    txs = (tx(0, method="0xaa"), tx(1, method="0xaa"), tx(2, method="0xAA"), tx(3, method=None))
    stats.update(blocks_to_tx_frame([block(1, txs)]))
    assert stats.total == 4 and len(stats) == 2
    rarity = stats.rarity(pl.Series(["0xaa", None, "0xunseen"]))
    assert rarity == pytest.approx([-math.log(4 / 5), -math.log(2 / 5), -math.log(1 / 5)])


def test_selector_stats_memory_is_bounded_and_forgets_oldest_batches():
    stats = SelectorStats(capacity=2500)
    for batch in range(10):
        keys = [f"0x{batch:02d}{i:06d}" for i in range(1000)]
        stats.update(pl.DataFrame({"method_id": keys}))
        assert stats.total <= 2500 and len(stats) <= 2500
    assert stats.count("0x00000000") == 0  # first batch evicted
    assert stats.count("0x09000999") == 1  # last batch kept


def test_sender_stats_rate_counts_recent_txs_per_minute():
    stats = SenderStats(window_seconds=60.0)
    frame = pl.DataFrame(
        {"from_address": ["0xa", "0xa", "0xa", "0xb"], "nonce": [1, 2, 3, 7],
         "observed_at": [900.0, 950.0, 990.0, 990.0]},
    )
    stats.update(frame, now=1000.0)
    assert stats.events == 3  # 900.0 is outside (940, 1000]
    probe = pl.DataFrame({"from_address": ["0xa", "0xb", "0xc"], "nonce": [4, 8, 0]})
    out = stats.lookup(probe, now=1000.0)
    assert out["sender_rate"].to_list() == [2.0, 1.0, 0.0]
    assert out["last_nonce"].to_list() == [3, 7, None]


def test_sender_stats_forget_least_recently_seen_senders():
    stats = SenderStats(max_senders=100, max_events=150)
    for i in range(10):
        frame = pl.DataFrame(
            {"from_address": [f"0x{i}-{j}" for j in range(100)], "nonce": [1] * 100,
             "observed_at": [float(i)] * 100}
        )
        stats.update(frame, now=float(i))
    assert len(stats) == 100 and stats.events == 150
    probe = pl.DataFrame({"from_address": ["0x9-5", "0x0-5"], "nonce": [2, 2]})
    assert stats.lookup(probe, now=9.0)["last_nonce"].to_list() == [1, None]


def learnt_stats() -> tuple[FeeMarket, SelectorStats, SenderStats, Block]:
    history = block(1, tuple(legacy(i, t, tag="h") for i, t in enumerate((1, 2, 3, 4))))
    market, selectors, senders = FeeMarket(), SelectorStats(), SenderStats()
    frame = blocks_to_tx_frame([history])
    market.update([history])
    selectors.update(frame)
    senders.update(frame)  # 0xaa: nonces 0 -> last nonce 0
    return market, selectors, senders, history


def test_tx_features_columns_are_the_declared_tuple_all_float_and_complete():
    market, selectors, senders, _ = learnt_stats()
    b = block(2, (tx(0, nonce=1), tx(1, nonce=2, tip=GWEI, method="0x12345678")))
    frame = blocks_to_tx_frame([b])
    since = {h: 1000.0 for h in frame["hash"]}
    out = tx_features(frame, market, selectors, senders, {"0x0": 2}, since)
    assert out.columns == ["hash", *TX_FEATURES]
    assert len(TX_FEATURE_MIN_SCALE) == len(TX_FEATURES)
    features = out.select(TX_FEATURES)
    assert all(dtype == pl.Float64 for dtype in features.dtypes)
    assert features.null_count().sum_horizontal().item() == 0
    assert not any(features.select(pl.all().is_nan().any()).row(0))
    assert complete_tx_rows(out).height == 2


def test_tx_features_values_on_a_hand_computed_block():
    market, selectors, senders, _ = learnt_stats()
    b = block(2, (
        tx(0, nonce=1, tip=2 * GWEI),  # 0xaa, last nonce 0: no gap
        tx(1, nonce=5, tip=4 * GWEI),  # 0xaa again, earlier nonce 1 in this block: gap 3
        tx(2, sender="0xNEW", nonce=9, to=None, method=None, value=0),
    ))
    frame = blocks_to_tx_frame([b])
    out = tx_features(frame, market, selectors, senders, {"0x1": 3}, {"0x0": 1000.0})
    row = {c: out[c].to_list() for c in out.columns}
    assert row["priority_fee_percentile"] == [0.375, 0.875, 0.375]  # window 1, 2, 3, 4 gwei
    assert row["nonce_gap"] == [0.0, 3.0, None]  # unknown sender: null
    assert row["log_value"] == pytest.approx([math.log1p(1e9), math.log1p(1e9), 0.0])
    assert row["gas_limit_log"] == pytest.approx([math.log1p(21_000)] * 3)
    assert row["is_contract_creation"] == [0.0, 0.0, 1.0]
    assert row["replacement_count"] == [0.0, 3.0, 0.0]
    assert row["time_pending_seconds"] == [1024.0 - 1000.0, None, None]  # never seen pending
    # the history's selector (4 of 4) is common; a plain transfer was never seen
    assert row["selector_rarity"] == pytest.approx([-math.log(5 / 5)] * 2 + [-math.log(1 / 5)])
    assert row["sender_rate"] == pytest.approx([4 / 5, 4 / 5, 0.0])  # 4 txs in 300 s


def test_pending_txs_are_priced_against_the_latest_base_fee_and_pending_time():
    market, selectors, senders, _ = learnt_stats()
    frame = pending_to_tx_frame([pending("0xp1", at=2000.0)])
    out = tx_features(frame, market, selectors, senders)
    # tip = min(3, 30 - 10) = 3 gwei against 1, 2, 3, 4: mid-rank (2 + 3) / 8
    assert out["priority_fee_percentile"].to_list() == [0.625]
    assert out["time_pending_seconds"].to_list() == [1.0]  # observed 1 s after first seen


def test_scoring_reads_the_stats_without_learning():
    market, selectors, senders, _ = learnt_stats()
    frame = blocks_to_tx_frame([block(2, (tx(0, nonce=1), tx(1, sender="0xdd")))])
    before = (market.size, selectors.total, len(senders), senders.events)
    first = tx_features(frame, market, selectors, senders)
    second = tx_features(frame, market, selectors, senders)
    assert first.equals(second)
    assert (market.size, selectors.total, len(senders), senders.events) == before


def test_empty_frame_gives_empty_features():
    market, selectors, senders, _ = learnt_stats()
    out = tx_features(blocks_to_tx_frame([]), market, selectors, senders)
    assert out.height == 0 and out.columns == ["hash", *TX_FEATURES]


def test_selector_rarity_of_a_big_batch_equals_the_row_by_row_lookup(monkeypatch):
    """Above _ROW_LOOKUP_MAX rows the lookup goes per distinct selector: same numbers."""
    import random

    from detector import tx_features

    rng = random.Random(2)
    selectors = [None, "0xAA", "0xaa", "0xbb", *(f"0x{i:08x}" for i in range(300))]
    stats = SelectorStats(capacity=10_000)
    stats.update(pl.DataFrame({"method_id": rng.choices(selectors, k=8_000)}))
    batch = pl.Series(rng.choices([*selectors, "0xunseen"], k=5_000))
    assert len(batch) > tx_features._ROW_LOOKUP_MAX
    by_value = stats.rarity(batch)
    monkeypatch.setattr(tx_features, "_ROW_LOOKUP_MAX", 10**9)
    assert np.array_equal(by_value, stats.rarity(batch))


def test_sender_stats_remember_each_senders_highest_nonce_and_latest_time():
    import random

    rng = random.Random(4)
    stats = SenderStats()
    expected: dict[str, tuple[int, float]] = {}
    for step in range(6):
        senders = [f"0x{rng.randrange(40):02x}" for _ in range(200)]
        nonces = [rng.randrange(10**6) for _ in senders]
        times = [step * 12.0 + rng.random() for _ in senders]
        stats.update(pl.DataFrame({"from_address": senders, "nonce": nonces,
                                   "observed_at": times}), now=step * 12.0 + 1)
        for s, n, t in zip(senders, nonces, times, strict=True):
            old = expected.get(s, (-1, -1.0))
            expected[s] = (max(old[0], n), max(old[1], t))
    last = stats._last.sort("sender")
    assert dict(zip(last["sender"], zip(last["last_nonce"], last["last_seen"], strict=True),
                    strict=True)) == expected


def _sender_batches(seed: int) -> list[pl.DataFrame]:
    """Batches of txs from a few thousand senders (repeats within a batch, new ones and
    returning ones), one with a null sender, over ~2 minutes."""
    rng = np.random.default_rng(seed)
    batches = []
    for step in range(8):
        n = int(rng.integers(1, 2_000))
        senders: list[str | None] = [f"0x{i:04x}" for i in rng.integers(0, 3_000, n)]
        if step == 5:
            senders[0] = None
        batches.append(pl.DataFrame({
            "from_address": senders, "nonce": rng.integers(0, 500, n).tolist(),
            "observed_at": (step * 15.0 + rng.random(n)).tolist()},
            schema={"from_address": pl.Utf8, "nonce": pl.Int64, "observed_at": pl.Float64}))
    return batches


def _by_sender(stats: SenderStats) -> list[tuple]:
    return sorted(stats._last.iter_rows(), key=lambda row: (row[0] is None, row[0] or ""))


@pytest.mark.parametrize("seed", range(3))
def test_sender_stats_by_their_index_are_the_joins(monkeypatch, seed):
    """Last nonces found through the hash index, and updates made through it, equal what
    the joins give (the index left out), batch after batch, at the bound (evictions)
    and with a batch that has a null sender (that one joins)."""
    from detector import tx_features

    batches = _sender_batches(seed)
    probe = pl.DataFrame({"from_address": ["0x0007", "0xnew", "0x0bb8", "0x0007", None],
                          "observed_at": [200.0] * 5}, schema={"from_address": pl.Utf8,
                                                               "observed_at": pl.Float64})

    def run() -> list[pl.DataFrame | list[tuple]]:
        stats = SenderStats(window_seconds=60.0, max_senders=1_500)
        seen: list[pl.DataFrame | list[tuple]] = []
        for batch in batches:
            seen.append(stats.lookup(batch, rate=False))
            seen.append(stats.lookup(probe))
            stats.update(batch)
            seen.append(_by_sender(stats))
        return seen

    indexed = run()
    monkeypatch.setattr(tx_features.KeyIndex, "of", classmethod(lambda cls, *a: None))
    joined = run()
    assert len(indexed) == len(joined) == 3 * len(batches)
    for a, b in zip(indexed, joined, strict=True):
        if isinstance(a, pl.DataFrame):
            assert isinstance(b, pl.DataFrame) and a.equals(b)
        else:
            assert a == b


def test_a_sender_that_shares_a_hash_with_a_remembered_one_is_not_taken_for_it(monkeypatch):
    """64-bit hashes of two senders can be equal: found by its hash, a sender's string is
    checked, and another sender with the same hash gets its own last nonce."""
    from detector import tx_features

    real = tx_features.string_hashes
    twin = int(real(pl.Series(["0xaa"]))[0])

    def hashes(strings: pl.Series) -> np.ndarray:
        out = real(strings).copy()
        out[(strings == "0xbb").fill_null(False).to_numpy()] = twin
        return out

    monkeypatch.setattr(tx_features, "string_hashes", hashes)
    stats = SenderStats()
    stats.update(pl.DataFrame({"from_address": ["0xaa"], "nonce": [7], "observed_at": [1.0]}))
    probe = pl.DataFrame({"from_address": ["0xbb", "0xaa"], "observed_at": [2.0, 2.0]})
    assert stats.lookup(probe, rate=False)["last_nonce"].to_list() == [None, 7]
    stats.update(pl.DataFrame({"from_address": ["0xbb"], "nonce": [3], "observed_at": [2.0]}))
    assert _by_sender(stats) == [("0xaa", 7, 1.0), ("0xbb", 3, 2.0)]
    assert stats.lookup(probe, rate=False)["last_nonce"].to_list() == [3, 7]


def test_sender_stats_at_their_bound_keep_the_latest_ties_by_address():
    stats = SenderStats(max_senders=3)
    frame = pl.DataFrame({"from_address": ["0xa", "0xe", "0xc", "0xd", "0xb"],
                          "nonce": [1, 2, 3, 4, 5], "observed_at": [10.0] * 5})
    stats.update(frame, now=10.0)
    assert sorted(stats._last["sender"]) == ["0xc", "0xd", "0xe"]
    stats.update(pl.DataFrame({"from_address": ["0xa"], "nonce": [9], "observed_at": [11.0]}),
                 now=11.0)
    assert sorted(stats._last["sender"]) == ["0xa", "0xd", "0xe"]


@pytest.mark.parametrize("seed", range(6))
def test_previous_nonce_in_the_frame_is_polars_window_with_ties_in_frame_order(seed):
    """Few senders and nonces (many ties: a tx in two blocks of a batch), many senders,
    nonces at the int64 edge; frames with a null sender or nonce take polars' own path."""
    rng = np.random.default_rng(seed)
    rows = 400
    senders = rng.integers(0, 6 if seed % 2 else 300, rows)
    top = 2**63 - 1 if seed == 4 else 8
    nonces = top - rng.integers(0, 8, rows) if seed == 4 else rng.integers(0, top, rows)
    frame = pl.DataFrame({"from_address": [f"0x{s:040x}" for s in senders], "nonce": nonces},
                         schema={"from_address": pl.Utf8, "nonce": pl.Int64})
    if seed == 5:
        frame = frame.with_columns(pl.when(pl.int_range(rows) % 7 == 0).then(None)
                                   .otherwise(pl.col("from_address")).alias("from_address"))
    polars_window = pl.col("nonce").shift(1).over("from_address", order_by="nonce")
    wanted = frame.select(polars_window.alias("p"))["p"]
    got = frame.select(_previous_nonce(frame).alias("p"))["p"]
    assert got.dtype == pl.Int64 and got.to_list() == wanted.to_list()
    ids = _ids(frame["from_address"].fill_null(""))  # as SenderStats.rate_as_of gives them
    given = frame.select(_previous_nonce(frame, ids).alias("p"))["p"]
    assert given.to_list() == wanted.to_list()
    assert wanted.is_not_null().sum() > rows // 4  # many rows have an earlier tx


@pytest.mark.parametrize("collide", [False, True])
def test_ids_number_equal_strings_alike_and_different_ones_apart(monkeypatch, collide):
    """Numbered from their hashes, checked against the strings: when two strings share a
    hash (forced here: every string hashes to one of two values), still apart."""
    import detector.tx_features as tx_features

    if collide:
        monkeypatch.setattr(tx_features, "string_hashes",
                            lambda s: (s.str.len_bytes() % 2).cast(pl.UInt64).to_numpy())
    rng = np.random.default_rng(3)
    strings = [f"0x{int(i):x}" for i in rng.zipf(1.3, 5_000) % 3_000] + ["", ""]
    ids = _ids(pl.Series(strings, dtype=pl.Utf8))
    assert ids.dtype == np.int64 and ids.min() == 0
    pairs = set(zip(strings, ids.tolist(), strict=True))
    assert len(pairs) == len(set(strings)) == len(set(ids.tolist()))
    assert ids.max() == len(set(strings)) - 1  # dense: 0 .. distinct - 1


def test_a_categorical_numbers_selectors_densely_and_a_row_of_each_names_its_number():
    """SelectorStats reads each number's selector at one of its rows: that needs the
    numbers 0 .. distinct - 1, every one used, and the row to hold that number."""
    rng = np.random.default_rng(5)
    strings = pl.Series([f"0x{int(i):08x}" for i in rng.zipf(1.5, 20_000) % 700] + [""])
    ids = _category_ids(strings)
    assert sorted(set(ids.tolist())) == list(range(strings.n_unique()))
    rows = _a_row_of_each(ids)
    assert np.array_equal(ids[rows], np.arange(len(rows)))
    named = dict(zip(ids.tolist(), strings.to_list(), strict=True))
    assert strings.gather(rows).to_list() == [named[i] for i in range(len(rows))]


@pytest.mark.parametrize("seed", range(5))
def test_the_latest_senders_are_the_two_key_top_k(seed):
    """Many senders per block time (the cut falls inside a block's senders), a cut at the
    oldest time, and a NaN time (polars' own top-k then)."""
    rng = np.random.default_rng(seed)
    rows = 2_000
    last = pl.DataFrame({
        "sender": [f"0x{int(i):040x}" for i in rng.permutation(10**6)[:rows]],
        "last_nonce": rng.integers(0, 100, rows),
        "last_seen": np.round(rng.uniform(0, 600, rows) / 12) * 12.0,
    })
    if seed == 4:
        last = last.with_columns(pl.when(pl.int_range(rows) == 5).then(float("nan"))
                                 .otherwise(pl.col("last_seen")).alias("last_seen"))
    for keep in (1, 999, 1_500, rows - 1):
        wanted = last.top_k(keep, by=["last_seen", "sender"]).sort("sender")
        got = _latest_senders(last, keep).sort("sender")
        assert got.height == keep and got.equals(wanted), keep
