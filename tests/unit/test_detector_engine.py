"""The detector core: records in, metrics and findings out."""

import random

import pytest

from chainwatch.metrics import Metrics
from chainwatch.schema import Block, Finding, Reorg
from detector.engine import Detector, DetectorConfig
from detector.state import ChainState
from tests.fakes import make_block

GENESIS_PARENT = "0x" + "00" * 32
CLOCK = 1_800_000_000.0


def detector(**config) -> Detector:
    return Detector(DetectorConfig(**config), Metrics(), clock=lambda: CLOCK)


def value(d: Detector, name: str, **labels: str) -> float | None:
    return d.metrics.registry.get_sample_value(name, labels)


def chain(n: int, *, node: str = "a", chain_id: int = 1, branch: str = "a") -> list[Block]:
    blocks: list[Block] = []
    parent = GENESIS_PARENT
    for number in range(n):
        b = make_block(number, parent, branch, chain_id=chain_id, node=node)
        blocks.append(b)
        parent = b.hash
    return blocks


def reorg(depth: int, *, old_head: int = 100, node: str = "a", chain_id: int = 1) -> Reorg:
    old_hash, new_hash = "0x" + "0a" * 32, "0x" + f"{depth:064x}"
    return Reorg(
        chain_id=chain_id,
        node=node,
        event_id=Reorg.id_for(chain_id, node, old_hash, new_hash),
        observed_at=CLOCK,
        old_head_number=old_head,
        old_head_hash=old_hash,
        new_head_number=old_head,
        new_head_hash=new_hash,
        common_ancestor_number=old_head - depth,
        common_ancestor_hash="0x" + "0c" * 32,
        depth=depth,
    )


# --- blocks and node health -----------------------------------------------------------


def test_blocks_update_head_count_timestamp_and_intervals():
    d = detector()
    blocks = chain(5)
    d.process(blocks)
    node = {"chain_id": "1", "node": "a"}
    assert value(d, "chainwatch_head_block_number", **node) == 4
    assert value(d, "chainwatch_blocks_observed_total", **node) == 5
    assert value(d, "chainwatch_last_block_timestamp_seconds", **node) == blocks[-1].timestamp
    # the first block has no known parent: 4 intervals, all 12 s
    assert value(d, "chainwatch_block_interval_seconds_count", **node) == 4
    assert value(d, "chainwatch_block_interval_seconds_sum", **node) == 48
    assert value(d, "chainwatch_events_processed_total", type="block") == 5


def test_block_whose_parent_is_unknown_observes_no_interval():
    d = detector()
    blocks = chain(4)
    d.process([blocks[0], blocks[2], blocks[3]])  # gap at 1
    assert value(d, "chainwatch_block_interval_seconds_count", chain_id="1", node="a") == 1


def test_duplicates_are_counted_and_not_double_counted():
    d = detector()
    blocks = chain(3)
    d.process(blocks)
    d.process([blocks[1], blocks[2]])  # redelivery after a restart
    d.process([blocks[2], blocks[2]])  # and twice within one batch
    node = {"chain_id": "1", "node": "a"}
    assert value(d, "chainwatch_duplicate_events_total", type="block") == 4
    assert value(d, "chainwatch_blocks_observed_total", **node) == 3
    assert value(d, "chainwatch_block_interval_seconds_count", **node) == 2
    assert value(d, "chainwatch_events_processed_total", type="block") == 3

BLOCK_SERIES = (
    "chainwatch_blocks_observed_total", "chainwatch_head_block_number",
    "chainwatch_last_block_timestamp_seconds", "chainwatch_last_head_seen_timestamp_seconds",
    "chainwatch_block_interval_seconds", "chainwatch_events_processed_total",
)


def block_samples(d: Detector) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for metric in d.metrics.registry.collect()
        for s in metric.samples
        if s.name.startswith(BLOCK_SERIES) and not s.name.endswith("_created")
    }


def test_a_batch_exports_the_block_series_of_its_blocks_one_at_a_time():
    # two nodes interleaved, a side block (not a new head) and a gap, last values differ
    main, side = chain(6, node="a"), chain(3, node="a", branch="b")
    other = chain(4, node="b")
    records = [main[0], other[0], main[1], main[2], other[1], side[2], main[3], other[3],
               main[5], side[1], other[2]]
    rng = random.Random(7)
    for _ in range(5):
        batched, one_by_one = detector(), detector()
        batched.process(records)
        for b in records:
            one_by_one.process([b])
        samples = block_samples(batched)
        assert samples == block_samples(one_by_one)
        assert samples[("chainwatch_blocks_observed_total",
                        (("chain_id", "1"), ("node", "a")))] == 7
        assert value(batched, "chainwatch_last_head_seen_timestamp_seconds",
                     chain_id="1", node="b") is not None
        rng.shuffle(records)


def test_duplicate_reorg_gives_one_finding_and_one_count():
    d = detector()
    r = reorg(3)
    assert len(d.process([r])) == 1
    assert d.process([r]) == []
    assert value(d, "chainwatch_reorgs_total", chain_id="1", node="a") == 1
    assert value(d, "chainwatch_duplicate_events_total", type="reorg") == 1
    assert value(d, "chainwatch_findings_total", chain_id="1", detector="reorg_depth",
                 severity="warning") == 1


# --- reorgs -----------------------------------------------------------------------------


def test_reorg_updates_counter_and_depth_histogram_bucket():
    d = detector()
    d.process([reorg(3)])
    node = {"chain_id": "1", "node": "a"}
    assert value(d, "chainwatch_reorgs_total", **node) == 1
    assert value(d, "chainwatch_reorg_depth_blocks_count", **node) == 1
    assert value(d, "chainwatch_reorg_depth_blocks_sum", **node) == 3
    assert value(d, "chainwatch_reorg_depth_blocks_bucket", **node, le="2.0") == 0
    assert value(d, "chainwatch_reorg_depth_blocks_bucket", **node, le="3.0") == 1
    assert value(d, "chainwatch_reorg_depth_blocks_bucket", **node, le="+Inf") == 1


@pytest.mark.parametrize(
    ("depth", "severity"),
    [(1, "info"), (2, "warning"), (5, "warning"), (6, "critical"), (40, "critical")],
)
def test_reorg_finding_severity_follows_depth(depth, severity):
    d = detector()
    findings = [f for f in d.process([reorg(depth, old_head=100)]) if f.detector == "reorg_depth"]
    assert len(findings) == 1
    f = findings[0]
    assert (f.detector, f.family, f.severity) == ("reorg_depth", "fork_risk", severity)
    assert f.subject_kind == "node" and f.subject == "a"
    assert 0 <= f.score <= 1
    assert f"depth {depth}" in f.summary
    counted = {
        s: value(d, "chainwatch_findings_total", chain_id="1", detector="reorg_depth", severity=s)
        for s in ("info", "warning", "critical")
    }
    assert counted == {s: (1.0 if s == severity else 0.0) for s in counted}


def test_reorg_severity_thresholds_are_configurable():
    d = detector(reorg_warning_depth=3, reorg_critical_depth=4)
    severities = [d.process([reorg(k)])[0].severity for k in (2, 3, 4)]
    assert severities == ["info", "warning", "critical"]


# --- several nodes ----------------------------------------------------------------------


def test_head_lag_across_two_nodes_of_one_chain():
    d = detector()
    d.process(chain(11, node="a") + chain(8, node="b"))
    assert value(d, "chainwatch_head_lag_blocks", chain_id="1", node="a") == 0
    assert value(d, "chainwatch_head_lag_blocks", chain_id="1", node="b") == 3
    # b catches up in a later batch: its lag goes back to 0
    d.process(chain(11, node="b")[8:])
    assert value(d, "chainwatch_head_lag_blocks", chain_id="1", node="b") == 0


def test_head_lag_is_per_chain():
    d = detector()
    d.process(chain(20, node="a", chain_id=1) + chain(5, node="p", chain_id=137))
    assert value(d, "chainwatch_head_lag_blocks", chain_id="137", node="p") == 0
    assert value(d, "chainwatch_head_lag_blocks", chain_id="1", node="a") == 0


# --- block model ------------------------------------------------------------------------


def normal_chain(n: int, *, seed: int = 7, node: str = "a") -> list[Block]:
    """Post-merge-like blocks: 12 s apart, gas around 50%, seen ~1 s after their timestamp."""
    rng = random.Random(seed)
    blocks: list[Block] = []
    parent, base_fee, ts = GENESIS_PARENT, 20 * 10**9, 1_700_000_000
    for number in range(n):
        ratio = rng.uniform(0.4, 0.6)
        blocks.append(block_at(number, parent, ts, ratio, rng.randint(120, 220),
                               base_fee, ts + rng.uniform(0.3, 2.0), node=node))
        parent = blocks[-1].hash
        base_fee = int(base_fee * (1 + (ratio - 0.5) / 4))
        ts += 12
    return blocks


def block_at(number, parent, ts, ratio, txs, base_fee, seen, *, node="a") -> Block:
    b = make_block(number, parent, node=node, timestamp=ts, tx_count=txs, observed_at=seen)
    return b.model_copy(update={"gas_used": int(30_000_000 * ratio), "base_fee_per_gas": base_fee})


def abnormal_after(blocks: list[Block]) -> Block:
    last = blocks[-1]
    ts = last.timestamp + 300
    return block_at(last.number + 1, last.hash, ts, 1.0, 170, last.base_fee_per_gas, ts + 200.0)


def scores(d: Detector, blocks: list[Block]) -> list[float | None]:
    out = []
    for b in blocks:
        d.process([b])
        out.append(value(d, "chainwatch_block_anomaly_score", chain_id="1", node="a"))
    return out


def test_model_warms_up_before_scoring():
    warmup = 30
    d = detector(warmup_blocks=warmup)
    blocks = normal_chain(warmup + 5)
    # block 0 has no parent, so blocks 0..warmup give exactly `warmup` complete rows
    got = scores(d, blocks[: warmup + 1])
    assert got == [None] * (warmup + 1)
    assert value(d, "chainwatch_model_fits_total", chain_id="1") == 1
    after = scores(d, blocks[warmup + 1 :])
    assert all(s is not None and 0.0 <= s <= 1.0 for s in after), after
    threshold = value(d, "chainwatch_block_anomaly_threshold", chain_id="1")
    assert threshold is not None and 0.0 <= threshold <= 1.0


def test_not_fitted_one_row_short_of_warmup():
    warmup = 30
    d = detector(warmup_blocks=warmup)
    d.process(normal_chain(warmup))  # warmup - 1 complete rows
    assert value(d, "chainwatch_model_fits_total", chain_id="1") == 0
    assert not d.model_for(1).fitted


def test_clearly_abnormal_block_is_flagged_and_explained():
    d = detector(warmup_blocks=200, seed=42)
    normal = normal_chain(300)
    d.process(normal[:150])
    d.process(normal[150:])
    findings = d.process([abnormal_after(normal)])
    flagged = [f for f in findings if f.detector == "block_iforest"]
    assert len(flagged) == 1, findings
    f = flagged[0]
    assert f.block_number == 300 and f.subject_kind == "block"
    assert f.score >= f.threshold
    top = [e.feature for e in f.explanation]
    assert {"interval_seconds", "propagation_delay_seconds"} & set(top), top
    assert f.model_version and f.model_version.startswith("block-iforest-")
    assert value(d, "chainwatch_findings_total", chain_id="1", detector="block_iforest",
                 severity=f.severity) == 1
    assert value(d, "chainwatch_block_anomaly_score", chain_id="1", node="a") == f.score
    # flagged rows are counted next to the scored ones (the model's flag share)
    scored = value(d, "chainwatch_anomaly_score_count", chain_id="1", family="block")
    flagged_rows = value(d, "chainwatch_anomalous_rows_total", chain_id="1", family="block")
    # fitted after the second batch: only the abnormal block was scored, and flagged
    assert d.scored_rows["block"] == scored == 1 and d.flagged_rows["block"] == flagged_rows == 1


def test_normal_blocks_after_warmup_are_mostly_not_flagged():
    d = detector(warmup_blocks=200, contamination=0.01)
    blocks = normal_chain(400)
    d.process(blocks[:250])
    later = d.process(blocks[250:])
    assert len([f for f in later if f.detector == "block_iforest"]) <= 10


def test_same_seed_gives_the_same_scores():
    blocks = normal_chain(60, seed=3)
    first = scores(detector(warmup_blocks=40, seed=11), blocks)
    second = scores(detector(warmup_blocks=40, seed=11), blocks)
    assert first[-15:] == second[-15:]
    assert all(s is not None for s in first[-15:])


# --- canonical window (detector/state.py) -----------------------------------------------


def test_canonical_window_after_a_reorg():
    state = ChainState()
    old = chain(11)  # 0..10 on branch a
    for b in old:
        state.apply_block(b)
    state.apply_reorg(reorg(3, old_head=10))  # ancestor 7
    node = state.node(1, "a")
    assert max(node.canonical) == 7
    assert all(node.canonical[n].hash == old[n].hash for n in range(8))

    parent = old[7].hash
    new = []
    for number in (8, 9, 10, 11):
        b = make_block(number, parent, "b", node="a")
        new.append(b)
        update = state.apply_block(b)
        # the new branch links to the kept ancestor: intervals still known
        assert update.parent_timestamp == b.timestamp - 12
        parent = b.hash
    assert sorted(node.canonical) == list(range(12))
    assert [node.canonical[n].hash for n in (8, 9, 10, 11)] == [b.hash for b in new]
    assert node.head_number == 11
    assert node.reorgs == 1


def test_canonical_window_when_ancestor_was_not_found_uses_depth():
    state = ChainState()
    for b in chain(11):
        state.apply_block(b)
    r = reorg(4, old_head=10).model_copy(
        update={"common_ancestor_number": None, "common_ancestor_hash": None,
                "ancestor_found": False}
    )
    state.apply_reorg(r)
    assert max(state.node(1, "a").canonical) == 6


def test_canonical_window_is_bounded():
    state = ChainState(window=16)
    for b in chain(40):
        state.apply_block(b)
    assert sorted(state.node(1, "a").canonical) == list(range(24, 40))


@pytest.mark.parametrize("follows", [True, False])
def test_replay_stamps_block_and_reorg_findings_when_their_record_came_in(follows):
    """On a replayed clock, a batch's findings about a block (or a reorg) carry the time
    that block was in, not the batch's last time; live, they carry the clock's now."""
    normal = normal_chain(300)
    odd = abnormal_after(normal)
    later = [block_at(301 + i, odd.hash if i == 0 else "0x" + f"{i:064x}", odd.timestamp
                      + 12 * (i + 1), 0.5, 170, odd.base_fee_per_gas, odd.observed_at + 12 * i)
             for i in range(1, 30)]
    turn = reorg(3, old_head=330).model_copy(update={"observed_at": later[9].observed_at + 5})
    now = [normal[-1].observed_at]
    d = Detector(DetectorConfig(warmup_blocks=200, seed=42), Metrics(), clock=lambda: now[0],
                 clock_follows_records=follows)
    d.process(normal[:150])
    d.process(normal[150:])
    end = now[0] = later[-1].observed_at + 50
    found = {f.detector: f.observed_at for f in d.process([odd, *later[:10], turn, *later[10:]])}
    if follows:
        assert found["block_iforest"] == odd.observed_at
        assert found["reorg_depth"] == turn.observed_at
    else:
        assert found["block_iforest"] == found["reorg_depth"] == end


def test_a_transaction_finding_in_block_zero_is_stamped_at_that_block():
    """Block 0 is a height like any other (`block_number or -1` once took it for none)."""
    genesis = make_block(0, GENESIS_PARENT, observed_at=CLOCK - 100.0)
    later = make_block(1, genesis.hash, observed_at=CLOCK - 50.0)
    d = Detector(DetectorConfig(), Metrics(), clock=lambda: CLOCK, clock_follows_records=True)
    d.process([genesis, later])
    found = Finding(chain_id=1, node="a", event_id="f0", observed_at=CLOCK, detector="tx_iforest",
                    family="tx", severity="info", score=1.0, threshold=0.5, subject_kind="tx",
                    subject="0x" + "ab" * 32, block_number=0, summary="in block 0")
    d._block_now = {id(genesis): genesis.observed_at, id(later): later.observed_at}
    [stamped] = d._stamped([found], [genesis, later], CLOCK)
    assert stamped.observed_at == genesis.observed_at


def test_a_batch_of_several_chains_and_nodes_feeds_each_its_own_blocks():
    """One batch mixing two chains, and two nodes of one chain: each node's miner family
    gets that node's blocks, each chain's tx family that chain's (`_split_by`)."""
    one, two = [], []
    parent_one, parent_two = GENESIS_PARENT, GENESIS_PARENT
    for n in range(6):
        one.append(make_block(n, parent_one, chain_id=1))
        two.append(make_block(n, parent_two, "b", chain_id=2))
        parent_one, parent_two = one[-1].hash, two[-1].hash
    copies = [make_block(b.number, b.parent_hash, chain_id=1, node="n2") for b in one]
    batch = [b for trio in zip(one, two, copies, strict=True) for b in trio]
    d = Detector(DetectorConfig(), Metrics(), clock=lambda: CLOCK)
    d.process(batch)
    assert [b.event_id for b in d.miners[(1, "n1")].blocks] == [b.event_id for b in one]
    assert [b.event_id for b in d.miners[(1, "n2")].blocks] == [b.event_id for b in copies]
    assert [b.event_id for b in d.miners[(2, "n1")].blocks] == [b.event_id for b in two]
    assert list(d.tx[1]._seen_blocks) == [b.hash for b in one]
    assert list(d.tx[2]._seen_blocks) == [b.hash for b in two]
    d.process([make_block(6, one[-1].hash, chain_id=1)])  # one key: the batch handed on
    assert d.miners[(1, "n1")].blocks[-1].number == 6
