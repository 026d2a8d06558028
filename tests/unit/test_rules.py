"""Known-bad pattern rules: dominant miners, empty blocks, sandwiches, spam.

Deep reorgs are the engine's `reorg_depth` detector (tests/unit/test_detector_engine.py).
"""

import pytest

from chainwatch.schema import Block, TxLifecycle, TxSummary
from detector.miner_features import miner_window_features
from detector.rules import (
    RULE_THRESHOLD,
    Offer,
    beta_binomial_tail,
    empty_blocks_rule,
    miner_share_rule,
    miner_surge_rule,
    nonce_replacement_spam_rule,
    sandwich_rule,
    skipped_by,
)
from detector.tx_features import included_tx_frame
from tests.fakes import make_block

T0 = 1000.0
POOL = "0x" + "77" * 20


def chain(miners: str, tx_count: int = 0) -> list[Block]:
    out: list[Block] = []
    parent = "0x" + "00" * 32
    for i, m in enumerate(miners):
        b = make_block(i, parent, timestamp=int(T0) + 12 * i, observed_at=T0 + 12 * i + 0.5)
        b = b.model_copy(update={"miner": f"0x{m}", "tx_count": tx_count})
        out.append(b)
        parent = b.hash
    return out


def tx(index: int, sender: str, to: str | None = POOL) -> TxSummary:
    return TxSummary(
        hash=f"0xt{index}", transaction_index=index, from_address=sender, to_address=to,
        value=0, gas=200_000, gas_price=10**10, nonce=index, input_size=196,
        method_id="0x38ed1739", is_contract_creation=to is None,
    )


def block_of(*txs: TxSummary) -> Block:
    b = make_block(7, "0x" + "00" * 32)
    return b.model_copy(update={"transactions": txs, "tx_count": len(txs)})


def replaced(i: int, at: float, sender: str = "0xspam", nonce: int = 3) -> TxLifecycle:
    return TxLifecycle(
        chain_id=1, node="n1", event_id=f"l{sender}{nonce}-{i}", observed_at=at, hash=f"0xh{i}",
        fate="replaced", from_address=sender, nonce=nonce, replaced_by=f"0xh{i + 1}",
        fee_bump_ratio=1.1,
    )


# miner share


def test_miner_above_the_share_limit_is_reported_with_its_share():
    frame = miner_window_features(chain("a" * 12 + "b" * 8))
    [hit] = miner_share_rule(frame, limit=0.5, min_blocks=20)
    assert (hit.subject_kind, hit.subject) == ("miner", "0xa")
    assert hit.score == pytest.approx(0.6)
    assert hit.severity == "critical"  # a majority
    assert hit.details["blocks"] == 12 and hit.details["window_blocks"] == 20


def test_miner_share_needs_enough_blocks_and_a_share_strictly_above_the_limit():
    assert miner_share_rule(miner_window_features(chain("a" * 12 + "b" * 7)), min_blocks=20) == []
    assert miner_share_rule(miner_window_features(chain("a" * 10 + "b" * 10))) == []
    hits = miner_share_rule(miner_window_features(chain("a" * 8 + "b" * 12)), limit=0.3)
    # 60% is a majority: critical; 40% is above 30% but no majority: warning
    assert [(h.subject, h.severity) for h in hits] == [("0xb", "critical"), ("0xa", "warning")]


# empty blocks


def test_empty_blocks_while_the_pool_is_full_are_reported_per_miner():
    blocks = chain("aaba")
    full = [(T0, 100)]  # one snapshot before every block
    [hit] = empty_blocks_rule(blocks, full, pending_threshold=50, min_count=2)
    assert (hit.subject_kind, hit.subject) == ("miner", "0xa")
    assert hit.details["block_numbers"] == [0, 1, 3]
    assert hit.block_number == 3 and hit.score == 0.75  # 3 / (2 x 2)


def test_empty_blocks_with_a_quiet_pool_or_too_few_are_not_reported():
    blocks = chain("aaba")
    assert empty_blocks_rule(blocks, [(T0, 50)], pending_threshold=50) == []  # not above
    assert empty_blocks_rule(blocks, [], pending_threshold=50) == []
    assert empty_blocks_rule(chain("ab"), [(T0, 100)], min_count=2) == []
    assert empty_blocks_rule(chain("aa", tx_count=5), [(T0, 100)]) == []  # not empty
    assert empty_blocks_rule([], [(T0, 100)]) == []


# sandwich


def test_sandwich_reports_attacker_victim_and_indices():
    block = block_of(tx(0, "0xother"), tx(1, "0xBot"), tx(2, "0xvictim"), tx(3, "0xbot"),
                     tx(4, "0xother"))
    [hit] = sandwich_rule(included_tx_frame([block])[0])
    assert (hit.subject_kind, hit.subject, hit.block_number) == ("tx", "0xt2", 7)
    assert hit.details["attacker"] == "0xbot"  # addresses compared lower-cased
    assert hit.details["victim"] == "0xt2" and hit.details["victim_sender"] == "0xvictim"
    assert hit.details["indices"] == [1, 2, 3]
    assert hit.details["contract"] == POOL
    assert (hit.details["front_hash"], hit.details["back_hash"]) == ("0xt1", "0xt3")


def test_sandwich_near_misses_do_not_match():
    different_contract = block_of(tx(0, "0xbot"), tx(1, "0xvictim", to="0xrouter"),
                                  tx(2, "0xbot"))
    own_victim = block_of(tx(0, "0xbot"), tx(1, "0xbot"), tx(2, "0xbot"))
    not_adjacent = block_of(tx(0, "0xbot"), tx(1, "0xvictim"), tx(2, "0xsomeone"),
                            tx(3, "0xbot"))
    # summaries cut short: a tx we do not see may sit in between
    gap_after = block_of(tx(0, "0xbot"), tx(1, "0xvictim"), tx(3, "0xbot"))
    gap_before = block_of(tx(0, "0xbot"), tx(2, "0xvictim"), tx(3, "0xbot"))
    creations = block_of(tx(0, "0xbot", to=None), tx(1, "0xvictim", to=None),
                         tx(2, "0xbot", to=None))
    for block in (different_contract, own_victim, not_adjacent, gap_after, gap_before,
                  creations, block_of()):
        assert sandwich_rule(included_tx_frame([block])[0]) == []


def test_two_sandwiches_in_one_block_are_both_reported():
    block = block_of(tx(0, "0xbot"), tx(1, "0xv1"), tx(2, "0xbot"), tx(3, "0xv2"),
                     tx(4, "0xbot"))
    hits = sandwich_rule(included_tx_frame([block])[0])
    assert [h.details["indices"] for h in hits] == [[0, 1, 2], [2, 3, 4]]


# nonce replacement spam


def test_more_than_limit_replacements_of_one_nonce_in_the_window_are_spam():
    events = [replaced(i, T0 + 5 * i) for i in range(6)]
    [hit] = nonce_replacement_spam_rule(events, window_seconds=60, limit=5)
    assert (hit.subject_kind, hit.subject) == ("tx", "0xspam#3")
    assert hit.details["replacements"] == 6 and hit.score == 0.6  # 6 / (2 x 5)
    assert hit.details["first_at"] == T0 and hit.details["last_at"] == T0 + 25
    hashes = hit.details["hashes"]
    assert isinstance(hashes, list) and len(hashes) == 6


def test_replacements_at_the_limit_spread_out_or_duplicated_are_not_spam():
    at_limit = [replaced(i, T0 + i) for i in range(5)]
    spread = [replaced(i, T0 + 15 * i) for i in range(6)]  # 75 s from first to last
    duplicated = [*at_limit, at_limit[0]]
    other_nonces = [replaced(i, T0 + i, nonce=i % 2) for i in range(8)]  # 4 each
    other_fates = [replaced(i, T0 + i).model_copy(update={"fate": "dropped"}) for i in range(6)]
    for events in (at_limit, spread, duplicated, other_nonces, other_fates, []):
        assert nonce_replacement_spam_rule(events, window_seconds=60, limit=5) == []


def test_hits_become_findings_with_stable_ids():
    [hit] = miner_share_rule(miner_window_features(chain("a" * 15 + "b" * 5)), limit=0.5)
    finding = hit.to_finding(now=T0 + 1)
    assert (finding.detector, finding.family, finding.threshold) == (
        "miner_share_rule", "miner", RULE_THRESHOLD,
    )
    assert finding.score == hit.score and finding.subject == hit.subject
    assert hit.to_finding(now=T0 + 99).event_id == finding.event_id
    assert hit.to_finding(now=T0, episode="w2").event_id != finding.event_id


def test_beta_binomial_tail_is_exact():
    assert beta_binomial_tail(0, 5, 2.0, 3.0) == pytest.approx(1.0)
    # Beta(1, 1) is uniform: every count of n draws is equally likely, 1 / (n + 1)
    assert beta_binomial_tail(3, 3, 1.0, 1.0) == pytest.approx(0.25)
    assert beta_binomial_tail(2, 3, 1.0, 1.0) == pytest.approx(0.5)
    # a well-known share behaves like the binomial at that share
    assert beta_binomial_tail(3, 3, 5e4, 5e4) == pytest.approx(0.125, rel=1e-3)


def _rotation(n: int, producers: int = 12) -> list[str]:
    return [f"0x{i % producers:040x}" for i in range(n)]


def test_a_takeover_is_a_surge_but_a_big_regular_producer_is_not():
    taker = "0x" + "ab" * 20
    history = _rotation(60)
    found = miner_surge_rule([*history, *[taker] * 8], chain_id=1, node="n1", head=68)
    assert [h.subject for h in found] == [taker]
    assert found[0].score >= RULE_THRESHOLD and found[0].severity == "critical"
    # a producer that always made 40% of the blocks keeps doing so: no surge
    big = "0x" + "bb" * 20
    steady = [big if i % 5 in (0, 2) else f"0x{i % 7:040x}" for i in range(100)]
    assert miner_surge_rule(steady, chain_id=1, node="n1", head=100) == []
    # a newcomer with a couple of blocks is luck; four in a row out of nowhere is not
    assert miner_surge_rule([*history, taker, history[0], taker], chain_id=1, node="n1",
                            head=63) == []
    assert [h.subject for h in miner_surge_rule([*history, *[taker] * 4], chain_id=1,
                                                node="n1", head=64)] == [taker]
    # a producer unseen in a short past is uncertain: 5 of the last 24 is not a takeover
    spread = [taker if i % 5 == 0 else b for i, b in enumerate(_rotation(24))]
    assert miner_surge_rule([*_rotation(76), *spread], chain_id=1, node="n1",
                            head=100) == []
    # a small regular producer (1 block in 60) making three in a row is not enough
    small = [big, *history[1:]]
    assert miner_surge_rule([*small, big, big, big], chain_id=1, node="n1", head=63) == []


def test_a_newcomers_takeover_with_an_honest_block_in_it_is_flagged_by_its_fourth_block():
    """3 of 4 by a producer absent from the 96 blocks before: chance ~8e-6 under the rule's
    belief, under newcomer_alpha (1e-5), not under alpha (1e-6)."""
    taker = "0x" + "ab" * 20
    history = _rotation(96)
    blocks = [*history, taker, taker, history[0], taker]
    found = miner_surge_rule(blocks, chain_id=1, node="n1", head=100)
    assert [(h.subject, h.details["blocks"], h.details["window_blocks"]) for h in found] == [
        (taker, 3, 4)
    ]
    assert found[0].score >= 0.5  # at its own limit the score is 0.5
    assert miner_surge_rule(blocks, chain_id=1, node="n1", head=100, newcomer_alpha=1e-6) == []
    # the same 3 of 4 by a producer seen once in those 96 blocks is judged under alpha
    seen_once = [taker, *history[1:]]
    assert miner_surge_rule([*seen_once, taker, taker, history[0], taker], chain_id=1,
                            node="n1", head=100) == []


def test_too_little_history_gives_no_surge():
    taker = "0x" + "ab" * 20
    assert miner_surge_rule([*_rotation(10), *[taker] * 8], chain_id=1, node="n1",
                            head=18) == []


def test_a_tx_counts_as_skipped_only_when_the_producer_could_and_should_have_taken_it():
    block = make_block(10, "0x" + "00" * 32).model_copy(update={
        "base_fee_per_gas": 10, "gas_limit": 1_000_000, "gas_used": 900_000})
    offer = Offer(fee_cap=100, tip_cap=5, gas=21_000, first_seen_at=block.timestamp - 30,
                  sender="0xs", nonce=7)
    assert skipped_by(offer, block, block.timestamp - 12.0, None, next_nonce=7)  # room left
    assert skipped_by(offer, block, block.timestamp - 12.0, None, next_nonce=None)
    # waits for an earlier nonce of its sender, whatever it pays
    assert not skipped_by(offer, block, block.timestamp - 12.0, None, next_nonce=6)
    # arrived after the parent: the producer may not have had it in time
    late = Offer(100, 5, 21_000, block.timestamp - 5, "0xs", 7)
    assert not skipped_by(late, block, block.timestamp - 12.0, None, next_nonce=7)
    # fee cap below the base fee: not includable
    poor = Offer(9, 5, 21_000, block.timestamp - 30, "0xs", 7)
    assert not skipped_by(poor, block, block.timestamp - 12.0, None, next_nonce=7)
    # a full block: skipped only if it took txs paying less than this one would
    full = block.model_copy(update={"gas_used": 1_000_000})
    assert not skipped_by(offer, full, full.timestamp - 12.0, min_tip=8.0, next_nonce=7)
    assert skipped_by(offer, full, full.timestamp - 12.0, min_tip=2.0, next_nonce=7)
