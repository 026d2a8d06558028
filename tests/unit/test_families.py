"""Transaction, miner and fork-risk detection wired into the detector engine."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import pytest

from bench.synthetic import generate
from chainwatch.metrics import Metrics
from chainwatch.schema import (
    AnyRecord,
    Block,
    Finding,
    MempoolSnapshot,
    PendingTx,
    Reorg,
    TxLifecycle,
    TxSummary,
)
from detector.engine import Detector, DetectorConfig
from detector.families import Episodes, MinerFamily
from detector.rules import RuleHit

VICTIM = "0x" + "ee" * 20
SPAMMER = "0x" + "5a" * 20


class Run:
    """A detector on a clock that follows the records (as a replay does)."""

    def __init__(self, **config: Any) -> None:
        self.now = 0.0
        self.detector = Detector(DetectorConfig(**config), Metrics(), clock=lambda: self.now)
        self.findings: list[Finding] = []

    def feed(self, records: Sequence[AnyRecord]) -> list[Finding]:
        out: list[Finding] = []
        for r in records:
            self.now = max(self.now, r.observed_at)
            out.extend(self.detector.process([r]))
        self.findings.extend(out)
        return out

    def metric(self, name: str, **labels: str) -> float:
        value = self.detector.metrics.registry.get_sample_value(name, labels)
        assert value is not None, f"no sample {name}{labels}"
        return value


@pytest.fixture(scope="module")
def normal() -> list[Block]:
    return generate(140, 150, seed=3)


def by(findings: list[Finding], detector: str) -> list[Finding]:
    return [f for f in findings if f.detector == detector]


def with_txs(block: Block, txs: list[TxSummary]) -> Block:
    merged = tuple(block.transactions) + tuple(
        t.model_copy(update={"transaction_index": len(block.transactions) + i})
        for i, t in enumerate(txs)
    )
    return block.model_copy(update={"transactions": merged, "tx_count": len(merged)})


def test_normal_mainnet_shaped_traffic_gives_no_transaction_or_miner_findings(normal):
    run = Run()
    run.feed(normal)
    families = {f.family for f in run.findings}
    assert "tx" not in families and "miner" not in families
    assert run.metric("chainwatch_transactions_scored_total", chain_id="1") > 10_000
    assert 0 < run.metric("chainwatch_anomaly_threshold", chain_id="1", family="tx") <= 1


def test_a_fat_finger_tip_is_flagged_with_its_explanation(normal):
    run = Run()
    run.feed(normal[:-1])
    last = normal[-1]
    template = next(t for t in last.transactions if t.max_priority_fee_per_gas)
    tip = 500 * 10**9  # 1,000 x the synthetic market's median tip (~0.5 gwei)
    outlier = template.model_copy(update={
        "hash": "0x" + "f0" * 32, "max_priority_fee_per_gas": tip,
        "max_fee_per_gas": tip + 10 * (last.base_fee_per_gas or 0),
    })
    found = by(run.feed([with_txs(last, [outlier])]), "tx_iforest")
    assert [f.subject for f in found] == [outlier.hash]
    assert found[0].family == "tx" and found[0].explanation[0].feature == "priority_fee_log_z"
    assert found[0].score >= found[0].threshold


def test_a_tip_in_a_wide_markets_own_tail_is_not_flagged(normal):
    """300x the median tip is ~5.6 spreads out in log on a lognormal market (sigma 1.2):
    1 tx in ~10^5 does that by itself. Linear z-scores put it at ~220 sigma, past the cut."""
    run = Run()
    run.feed(normal[:-1])
    last = normal[-1]
    template = next(t for t in last.transactions if t.max_priority_fee_per_gas)
    tip = 150 * 10**9
    tail = template.model_copy(update={
        "hash": "0x" + "f1" * 32, "max_priority_fee_per_gas": tip,
        "max_fee_per_gas": tip + 10 * (last.base_fee_per_gas or 0),
    })
    assert by(run.feed([with_txs(last, [tail])]), "tx_iforest") == []


def test_one_sender_filling_a_block_is_a_spam_burst(normal):
    run = Run()
    run.feed(normal[:20])
    base = normal[20].transactions[0]
    spam = [base.model_copy(update={"hash": f"0x{i:064x}", "from_address": SPAMMER, "nonce": i})
            for i in range(60)]
    found = by(run.feed([with_txs(normal[20], spam)]), "sender_burst_rule")
    assert len(found) == 1 and found[0].subject == spam[0].hash
    assert "60 of the" in found[0].summary


def test_a_dominant_miner_is_reported_once_per_episode(normal):
    run = Run()
    blocks = [b.model_copy(update={"miner": VICTIM}) if 30 <= b.number < 80 else b
              for b in normal]
    run.feed(blocks)
    found = by(run.findings, "miner_share_rule")
    assert len(found) == 1 and found[0].subject == VICTIM
    assert run.metric("chainwatch_miner_top_share", chain_id="1", node="bench") < 0.5


def test_a_timestamp_jump_names_the_producer_when_arrival_times_are_unknown(normal):
    """Imported history (ethereum-etl) has observed_at = timestamp: only the jump shows."""
    run = Run()
    jumped = [b.model_copy(update={"timestamp": b.timestamp + 900,
                                   "observed_at": b.timestamp + 900.0})
              if b.number >= 40 else b.model_copy(update={"observed_at": float(b.timestamp)})
              for b in normal[:60]]
    found = run.feed(jumped)
    assert [f.detector for f in found if f.family == "miner"] == ["timestamp_jump_rule"]
    assert found[0].block_number == 40 and found[0].subject == normal[40].miner.lower()


def test_a_block_stamped_in_the_future_names_its_producer_not_its_successors(normal):
    """Ahead by 60 s: the producer is named; honest successors at parent + 1 s are not."""
    run = Run()
    blocks = [b.model_copy(update={"observed_at": b.timestamp + 0.5}) for b in normal[:60]]
    clocked = [*blocks[:40], blocks[40].model_copy(update={"timestamp": blocks[40].timestamp + 60})]
    for b in blocks[41:]:  # honest producers: their slot, or parent + 1 while it is behind
        clocked.append(b.model_copy(update={"timestamp": max(b.timestamp,
                                                             clocked[-1].timestamp + 1)}))
    found = by(run.feed(clocked), "timestamp_drift_rule")
    assert [(f.block_number, f.subject) for f in found] == [(40, normal[40].miner.lower())]
    assert "ahead of" in found[0].summary


def test_a_backdated_run_is_flagged_but_a_lagging_node_is_not(normal):
    blocks = [b.model_copy(update={"observed_at": b.timestamp + 0.5}) for b in normal[:60]]
    backdated = [
        *blocks[:40],
        *(b.model_copy(update={"timestamp": blocks[39].timestamp + i + 1})
          for i, b in enumerate(blocks[40:43])),
        *blocks[43:],
    ]
    found = by(Run().feed(backdated), "timestamp_drift_rule")
    assert [f.block_number for f in found] == [40, 41, 42]
    assert all("behind" in f.summary for f in found)
    # the node falls 40 s behind for 10 blocks, then catches up: usual intervals, no blame
    lagging = [b.model_copy(update={"observed_at": b.observed_at + 40})
               if 40 <= b.number < 50 else b for b in blocks]
    found = Run().feed(lagging)
    assert by(found, "timestamp_drift_rule") == [] and by(found, "timestamp_jump_rule") == []


def test_a_sudden_takeover_is_flagged_within_six_blocks_once(normal):
    taker = "0x" + "7a" * 20
    run = Run()
    run.feed(normal[:60])
    taken = [b.model_copy(update={"miner": taker}) if i % 8 != 3 else b
             for i, b in enumerate(normal[60:100])]
    found = by(run.feed(taken), "miner_surge_rule")
    assert [f.subject for f in found] == [taker]  # one episode despite the honest blocks
    assert found[0].block_number is not None
    assert found[0].block_number <= 65  # 5 of the 6 blocks 60-65 (63 is honest)


def _pending(tx: TxSummary, at: float, node: str = "bench") -> PendingTx:
    return PendingTx(
        chain_id=1, node=node, event_id=PendingTx.id_for(1, node, tx.hash), observed_at=at,
        first_seen_at=at, hash=tx.hash, from_address=tx.from_address, to_address=tx.to_address,
        nonce=tx.nonce, value=tx.value, gas=tx.gas, gas_price=tx.gas_price,
        max_fee_per_gas=tx.max_fee_per_gas,
        max_priority_fee_per_gas=tx.max_priority_fee_per_gas, tx_type=tx.tx_type,
        input_size=tx.input_size, method_id=tx.method_id,
        is_contract_creation=tx.is_contract_creation,
    )


def test_a_high_fee_tx_left_out_of_several_blocks_is_a_censorship_hint(normal):
    run = Run()
    run.feed(normal[:60])
    template = next(t for t in normal[60].transactions if t.max_priority_fee_per_gas)
    rich = template.model_copy(update={
        "hash": "0x" + "c1" * 32, "max_priority_fee_per_gas": 50 * 10**9,
        "max_fee_per_gas": 500 * 10**9, "from_address": "0x" + "c1" * 20, "nonce": 0})
    served = rich.model_copy(update={"hash": "0x" + "c2" * 32, "from_address": "0x" + "c2" * 20})
    at = normal[59].observed_at + 1
    run.feed([_pending(rich, at), _pending(served, at)])
    run.feed([with_txs(normal[60], [served])])  # one is mined, the other never is
    run.feed(normal[61:70])
    found = by(run.findings, "censorship_rule")
    assert [f.subject for f in found] == [rich.hash]
    assert found[0].family == "miner"


def test_a_high_fee_tx_outbid_in_full_blocks_is_no_censorship_hint(normal):
    """Congestion is not censorship: full blocks that took only better-paying txs."""
    run = Run()
    run.feed(normal[:60])
    template = next(t for t in normal[60].transactions if t.max_priority_fee_per_gas)
    cheap_tip = 10**6  # above the base fee cap, below every tip the blocks took
    waiting = template.model_copy(update={
        "hash": "0x" + "c3" * 32, "max_priority_fee_per_gas": cheap_tip,
        "max_fee_per_gas": 500 * 10**9, "from_address": "0x" + "c3" * 20, "nonce": 0})
    at = normal[59].observed_at + 1
    run.feed([_pending(waiting, at)])
    tx_family = run.detector.tx_family(1)
    assert waiting.hash not in tx_family.offers  # a low tip is not watched at all
    rich = waiting.model_copy(update={"hash": "0x" + "c4" * 32,
                                      "max_priority_fee_per_gas": 50 * 10**9})
    run.feed([_pending(rich, at)])
    assert rich.hash in tx_family.offers
    # ten full blocks, every tx in them paying more than `rich` offers
    outbid = [b.model_copy(update={"gas_used": b.gas_limit, "transactions": tuple(
        t.model_copy(update={"max_priority_fee_per_gas": 60 * 10**9,
                             "max_fee_per_gas": 900 * 10**9}) for t in b.transactions)})
        for b in normal[60:70]]
    run.feed(outbid)
    assert by(run.findings, "censorship_rule") == []


def test_nonce_replacement_spam_is_flagged(normal):
    run = Run()
    run.feed(normal[:5])
    t0 = normal[4].observed_at
    lifecycles = [
        TxLifecycle(chain_id=1, node="bench", event_id=f"r{i}", observed_at=t0 + i,
                    hash=f"0x{i:064x}", fate="replaced", from_address=SPAMMER, nonce=7,
                    replaced_by=f"0x{i + 1:064x}", fee_bump_ratio=1.1)
        for i in range(12)
    ]
    found = by(run.feed(lifecycles), "nonce_replacement_spam_rule")
    assert found and found[0].family == "tx" and SPAMMER in found[0].subject


def test_fork_risk_score_rises_with_a_deep_reorg_and_reports_one_episode(normal):
    run = Run()
    run.feed(normal[:30])
    assert run.metric("chainwatch_fork_risk_score", chain_id="1", node="bench") < 0.1
    head = normal[29]
    deep = Reorg(
        chain_id=1, node="bench", event_id="deep", observed_at=head.observed_at + 1,
        old_head_number=29, old_head_hash=head.hash, new_head_number=29,
        new_head_hash="0x" + "ab" * 32, common_ancestor_number=23,
        common_ancestor_hash=normal[23].hash, depth=6,
    )
    run.feed([deep])
    run.feed(normal[30:33])
    found = by(run.findings, "fork_risk_score")
    assert len(found) == 1
    assert found[0].explanation[0].feature == "max_reorg_depth"
    assert run.metric("chainwatch_fork_risk_score", chain_id="1", node="bench") >= 0.7


def test_episodes_restart_after_a_condition_clears():
    e = Episodes()
    assert e.update("s", {"a": "1"}) == {"a": "1"}
    assert e.update("s", {"a": "2"}) == {}
    assert e.update("s", {}) == {}
    assert e.update("s", {"a": "3"}) == {"a": "3"}


def test_a_held_episode_survives_short_pauses_only():
    e = Episodes(hold=2)
    assert e.update("s", {"a": "1"}) == {"a": "1"}
    assert e.update("s", {}) == {} and e.update("s", {}) == {}  # paused twice: held
    assert e.update("s", {"a": "2"}) == {}  # the same episode goes on
    for _ in range(3):
        e.update("s", {})
    assert e.update("s", {"a": "3"}) == {"a": "3"}  # paused longer than the hold: new


def test_transactions_are_counted_once_even_when_later_batches_bring_no_blocks(normal):
    run = Run()
    run.feed(normal[:40])
    scored = run.metric("chainwatch_transactions_scored_total", chain_id="1")
    observed = run.metric("chainwatch_anomaly_score_count", chain_id="1", family="tx")
    assert scored == observed > 0
    run.feed([r.model_copy(update={"event_id": f"again-{i}"}) for i, r in enumerate(normal[:3])])
    run.feed([_pending(normal[41].transactions[0], normal[39].observed_at + 1)])
    assert run.metric("chainwatch_transactions_scored_total", chain_id="1") == scored
    assert run.metric("chainwatch_anomaly_score_count", chain_id="1", family="tx") == observed


def test_a_pending_record_arriving_after_its_block_is_no_censorship_hint(normal):
    run = Run()
    run.feed(normal[:60])
    template = next(t for t in normal[60].transactions if t.max_priority_fee_per_gas)
    rich = template.model_copy(update={
        "hash": "0x" + "c3" * 32, "max_priority_fee_per_gas": 50 * 10**9,
        "max_fee_per_gas": 500 * 10**9})
    mined = with_txs(normal[60], [rich])
    run.feed([mined])
    run.feed([_pending(rich, mined.observed_at - 2).model_copy(
        update={"observed_at": mined.observed_at + 0.5})])  # the mempool saw it late
    run.feed(normal[61:70])
    assert by(run.findings, "censorship_rule") == []


def test_a_family_that_raises_costs_its_findings_for_the_batch_not_the_detector(
    normal, monkeypatch
):
    run = Run()
    run.feed(normal[:30])

    def broken(*args: object, **kwargs: object) -> list[Finding]:
        raise RuntimeError("bug in the miner family")

    monkeypatch.setattr(MinerFamily, "on_blocks", broken)
    run.feed([normal[30]])
    assert run.detector.step_errors == ["miner: RuntimeError: bug in the miner family"]
    assert run.metric("chainwatch_detector_step_errors_total", step="miner") == 1
    assert run.metric("chainwatch_detector_step_errors_total", step="tx") == 0
    assert run.metric("chainwatch_head_block_number", chain_id="1", node="bench") == 30
    monkeypatch.undo()
    run.feed([normal[31]])
    assert run.detector.step_errors == []
    assert run.metric("chainwatch_head_block_number", chain_id="1", node="bench") == 31


def test_a_fee_outlier_is_flagged_when_the_pool_announces_it_and_once_only(normal):
    run = Run()
    run.feed(normal[:60])
    template = next(t for t in normal[60].transactions if t.max_priority_fee_per_gas)
    outlier = template.model_copy(update={
        "hash": "0x" + "f0" * 32, "from_address": "0x" + "f0" * 20, "nonce": 0,
        "max_priority_fee_per_gas": 5_000 * 10**9, "max_fee_per_gas": 6_000 * 10**9})
    found = by(run.feed([_pending(outlier, normal[59].observed_at + 1)]), "tx_iforest")
    assert [(f.subject, f.block_number) for f in found] == [(outlier.hash, None)]
    assert "pending" in found[0].summary and found[0].explanation
    # mined a block later: the same verdict is the same finding, not a second one
    again = run.feed([with_txs(normal[60], [outlier])])
    assert by(again, "tx_iforest") == []
    assert run.metric("chainwatch_findings_total", chain_id="1", detector="tx_iforest",
                      severity=found[0].severity) == 1


def test_two_nodes_seeing_one_takeover_report_it_once(normal):
    """A producer's share is a fact about the chain: one finding, whichever node saw it."""
    taker = "0x" + "7b" * 20
    run = Run()
    blocks = [*normal[:60], *(b.model_copy(update={"miner": taker}) for b in normal[60:80])]
    for b in blocks:  # both nodes deliver every block
        twin = b.model_copy(update={"node": "bench-2",
                                    "event_id": Block.id_for(1, "bench-2", b.hash)})
        run.feed([b, twin])
    assert [f.subject for f in by(run.findings, "miner_surge_rule")] == [taker]
    assert run.metric("chainwatch_findings_total", chain_id="1", detector="miner_surge_rule",
                      severity="critical") == 1


def test_the_first_live_block_after_a_backfill_is_not_stamped_ahead(normal):
    """Backfilled blocks carry the time they were fetched: late, not a clock problem."""
    blocks = [b.model_copy(update={"observed_at": b.timestamp + 0.5}) for b in normal[:120]]
    caught_up = blocks[99].timestamp + 0.5  # 80 blocks fetched at once after an outage
    backfilled = [*blocks[:20],
                  *(b.model_copy(update={"observed_at": caught_up + 0.01 * i})
                    for i, b in enumerate(blocks[20:100])),
                  *blocks[100:]]
    found = Run().feed(backfilled)
    assert by(found, "timestamp_drift_rule") == []


def test_a_pending_sighting_after_its_block_does_not_reopen_the_tx(normal):
    """Every mined tx is remembered as included (only the last tx of a block was, and
    only while the nonce map overflowed): a late pending record must not make a mined tx
    pending again (offered for censorship, scored as pending)."""
    run = Run()
    run.feed(normal[:30])
    mined = normal[10].transactions[0]
    run.feed([_pending(mined, normal[29].observed_at + 1)])
    family = run.detector.tx[1]
    assert mined.hash not in family.pending_since
    assert mined.hash not in family.offers


def _snapshot(at: float, pending: int) -> MempoolSnapshot:
    return MempoolSnapshot(chain_id=1, node="bench",
                           event_id=MempoolSnapshot.id_for(1, "bench", at), observed_at=at,
                           pending_count=pending, tracked_count=0, sender_count=0)


@pytest.mark.parametrize("pending", [5_000, 10])
def test_empty_blocks_are_flagged_only_after_a_full_pool_and_checked_only_then(
        pending, monkeypatch):
    """A miner's empty blocks count while the pool was full; with only quiet snapshots the
    rule cannot fire and is not even run."""
    from detector import families

    calls: list[int] = []
    rule = families.empty_blocks_rule

    def counting_rule(*args: Any, **kwargs: Any) -> list[RuleHit]:
        calls.append(1)
        return rule(*args, **kwargs)

    monkeypatch.setattr(families, "empty_blocks_rule", counting_rule)
    blocks = generate(30, 20, seed=4)
    blocks = [b.model_copy(update={"transactions": (), "tx_count": 0}) if b.number % 3 == 0
              else b for b in blocks]
    run = Run()
    run.feed([_snapshot(blocks[0].observed_at - 1, pending), *blocks])
    hits = by(run.findings, "empty_blocks_rule")
    assert bool(hits) == bool(calls) == (pending > 1_000)
