"""A batch of many blocks reads each block's state as it was when that block came.

Each test runs the same blocks twice: one block at a time (score, then learn: the live
path's order), and as one batch with `AsOf`; the numbers must be equal, bit for bit.
"""

import numpy as np
import polars as pl
import pytest

from detector.tx_features import AsOf, FeeMarket, SelectorStats, SenderStats, _BatchWindow


def _blocks(rng: np.random.Generator, count: int, most: int) -> list[np.ndarray]:
    """Blocks of fee-like values: empty blocks, NaN (no fee known), ties, spread."""
    out = []
    for _ in range(count):
        values = np.round(rng.lognormal(0.0, 1.0, int(rng.integers(0, most + 1))), 1)
        values[rng.random(len(values)) < 0.1] = np.nan
        out.append(values)
    return out


@pytest.mark.parametrize("prior_blocks", [0, 2, 5, 9])
@pytest.mark.parametrize("capacity", [1, 5, 50])
def test_fee_windows_as_of_each_block_are_pushing_block_by_block(prior_blocks, capacity):
    rng = np.random.default_rng(prior_blocks * 100 + capacity)
    prior, batch = _blocks(rng, prior_blocks, 6), _blocks(rng, 30, 8)
    one_by_one, batched = _BatchWindow(capacity), _BatchWindow(capacity)
    for values in prior:
        one_by_one.push(values)
        batched.push(values)
    wanted_percentiles, wanted_quartiles = [], []
    for values in batch:
        wanted_percentiles.append(one_by_one.percentile(values))
        window = one_by_one.values
        wanted_quartiles.append(np.quantile(window, [0.25, 0.5, 0.75]) if len(window)
                                else np.full(3, np.nan))
        one_by_one.push(values)
    as_of = AsOf.of([len(v) for v in batch], [float(i) for i in range(len(batch))])
    percentile, quartiles = batched.as_of(np.concatenate(batch), as_of)
    assert np.array_equal(percentile, np.concatenate(wanted_percentiles), equal_nan=True)
    assert np.array_equal(quartiles, np.array(wanted_quartiles), equal_nan=True)


def test_fee_market_as_of_gives_the_log_z_of_each_blocks_window():
    rng = np.random.default_rng(4)
    market, reference = FeeMarket(window_blocks=4), FeeMarket(window_blocks=4)
    batch = [rng.lognormal(21.0, 1.0, 5) for _ in range(12)]
    tips = np.concatenate(batch)
    caps = tips * 3.0
    wanted = []
    for values in batch:
        wanted.append((reference.percentile_of(values), reference.tip_log_z(values),
                       reference.fee_cap_log_z(values * 3.0)))
        reference._tips.push(values)
        reference._caps.push(values * 3.0)
    got = market.as_of(tips, caps, AsOf.of([5] * 12, [0.0] * 12))
    for i in range(3):
        assert np.array_equal(got[i], np.concatenate([w[i] for w in wanted]), equal_nan=True)
    assert np.isnan(got[1][:5]).all() and not np.isnan(got[1][5:]).any()  # empty at first


def _sender_frame(rng: np.random.Generator, blocks: int, start: float) -> pl.DataFrame:
    rows = []
    for k in range(blocks):
        for _ in range(int(rng.integers(0, 7))):
            rows.append((f"0x{int(rng.zipf(1.6)) % 9:x}", k, start + 12.0 * k))
    return pl.DataFrame(rows, schema={"from_address": pl.Utf8, "block": pl.Int64,
                                      "observed_at": pl.Float64}, orient="row").with_columns(
        nonce=pl.int_range(pl.len()))


@pytest.mark.parametrize(("batch_blocks", "window"), [
    (25, 60.0),  # a big batch; a busy sender (more than 32 events) among others
    (1, 600.0),  # one block: all earlier events in the window, which are filtered
    (40, 900.0),  # a long window: every event counts; a sender seen only before the batch
])
def test_sender_rate_as_of_each_block_is_lookup_then_update_block_by_block(batch_blocks, window):
    rng = np.random.default_rng(7 + batch_blocks)
    one_by_one, batched = SenderStats(window_seconds=window), SenderStats(window_seconds=window)
    before = pl.concat([_sender_frame(rng, 8, 900.0), pl.DataFrame(
        {"from_address": ["0xonly-before"], "block": [3], "observed_at": [936.0],
         "nonce": [0]})]).sort("block", maintain_order=True)
    for stats in (one_by_one, batched):
        for k in range(8):
            part = before.filter(pl.col("block") == k)
            stats.update(part, now=900.0 + 12.0 * k)
    batch = _sender_frame(rng, batch_blocks, 996.0)
    nows = 996.0 + 12.0 * np.arange(batch_blocks) + 0.5
    wanted = []
    for k in range(batch_blocks):
        part = batch.filter(pl.col("block") == k)
        wanted.extend(one_by_one.lookup(part, now=nows[k])["sender_rate"].to_list())
        one_by_one.update(part, now=nows[k])
    as_of = AsOf(batch["block"].to_numpy(), nows)
    got, ids = batched.rate_as_of(batch, as_of)
    assert got.tolist() == wanted
    senders = batch["from_address"].to_list()  # equal senders, equal ids; others differ
    assert len(set(zip(senders, ids.tolist(), strict=True))) == len(set(senders))
    assert len(set(ids.tolist())) == len(set(senders))
    assert max(wanted) * window / 60.0 >= 2  # busy senders were in the window
    if batch_blocks == 1:  # the one-block batch takes the filtered path
        assert batched._events.filter(pl.col("at") > nows[0] - window).height > 4 * batch.height


@pytest.mark.parametrize("capacity", [12, 40, 1_000])
@pytest.mark.parametrize("batch_blocks", [2, 5, 30])
def test_selector_rarity_as_of_each_block_is_rarity_then_update_block_by_block(
        capacity, batch_blocks):
    """Small batches let only the oldest kept entries leave (thin blocks), big ones all of
    them and then their own first blocks (mainnet blocks), a big capacity none."""
    rng = np.random.default_rng(capacity + batch_blocks)
    names = [None, "0xaa", *(f"0x{i:08x}" for i in range(20))]  # as tx frames hold them

    def frame(blocks: int) -> tuple[pl.DataFrame, list[int]]:
        counts = [int(rng.integers(0, 9)) for _ in range(blocks)]
        picked = [names[int(i)] for i in rng.zipf(1.4, sum(counts)) % len(names)]
        return pl.DataFrame({"method_id": picked}, schema={"method_id": pl.Utf8}), counts

    one_by_one, batched = SelectorStats(capacity), SelectorStats(capacity)
    whole, _ = frame(3)
    earlier, earlier_counts = frame(20)
    for stats in (one_by_one, batched):
        stats.update(whole)  # a batch learnt whole (one entry)
        stats.update(earlier, earlier_counts)  # and one learnt block by block
    batch, counts = frame(batch_blocks)
    wanted, start = [], 0
    for n in counts:
        part = batch.slice(start, n)
        wanted.append(one_by_one.rarity(part["method_id"]))
        one_by_one.update(part)
        start += n
    got = batched.rarity_as_of(batch["method_id"], AsOf.of(counts, [0.0] * len(counts)))
    assert np.array_equal(got, np.concatenate(wanted))
    batched.update(batch, counts)  # and the batch learnt block by block: the same window
    assert batched.total == one_by_one.total and batched._counts == one_by_one._counts
    assert list(batched._sizes) == list(one_by_one._sizes)  # the same entries, to leave later
    assert [dict(zip(*b, strict=True)) for b in batched._batches] == [
        dict(zip(*b, strict=True)) for b in one_by_one._batches]


def test_a_detector_scores_a_batch_of_blocks_as_it_scores_them_one_at_a_time(monkeypatch):
    """The tx model's rows (every feature) for 130 mainnet-shaped blocks handed over in
    batches of 60 are those of the same blocks handed over one by one, as replay with the
    clock following the records does. Before the features read the state as of each
    block, a batch's sender rates were all 0, its fees were measured against the market
    before the batch and its selectors against the selectors before it."""
    from bench.synthetic import generate
    from chainwatch.metrics import Metrics
    from detector.engine import Detector, DetectorConfig
    from detector.families import TxFamily
    from replay.driver import ReplayClock

    history = generate(130, 40, seed=5)
    rows: dict[int, dict[str, np.ndarray]] = {}
    matrix = TxFamily._matrix

    def kept(self, frame, now, as_of=None):
        x, ok = matrix(self, frame, now, as_of)
        store = rows.setdefault(self._run, {})
        for h, row in zip(frame.filter(pl.Series(ok))["hash"].to_list(), x, strict=True):
            store[h] = row
        return x, ok

    monkeypatch.setattr(TxFamily, "_matrix", kept)
    for batch in (60, 1):
        monkeypatch.setattr(TxFamily, "_run", batch, raising=False)
        clock = ReplayClock()
        detector = Detector(DetectorConfig(), Metrics(), clock=clock, clock_follows_records=True)
        for i in range(0, len(history), batch):
            part = history[i:i + batch]
            clock.now = part[-1].observed_at
            detector.process(list(part))
    assert rows[60].keys() == rows[1].keys() and len(rows[1]) > 4_000
    batched = np.array([rows[60][h] for h in rows[1]])
    one_by_one = np.array(list(rows[1].values()))
    assert np.array_equal(batched, one_by_one)
    assert one_by_one[:, 7].max() > 0  # sender_rate: busy senders in the window


def test_a_block_delivered_twice_in_a_batch_is_scored_at_its_first_delivery(monkeypatch):
    """Two nodes deliver the same block in one batch: its txs read the state at the clock
    of the first delivery (the one the family keeps), not the second's."""
    from bench.synthetic import generate
    from detector import families
    from detector.families import FamilyConfig, TxFamily

    block = generate(1, 20, seed=3)[0]
    again = block.model_copy(update={"node": "second"})
    seen: list[np.ndarray] = []
    features = families.tx_features

    def spy(*args, as_of=None, **kwargs):
        seen.append(as_of.nows)
        return features(*args, as_of=as_of, **kwargs)

    monkeypatch.setattr(families, "tx_features", spy)
    family = TxFamily(FamilyConfig(), kind="iforest", seed=1)
    family.on_blocks([block, again], 5_000.0, block_nows=[1_000.0, 4_000.0])
    assert [list(n) for n in seen] == [[1_000.0]]
