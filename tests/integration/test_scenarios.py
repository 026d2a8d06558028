"""The quick labelled session on a real anvil: every injected kind is recorded and labelled,
the recording decodes, and replaying it catches every reorg (the floors for the other
families come with their detectors)."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest

from chainwatch.scenarios import (
    LABELS_FILE,
    RECORDS_FILE,
    ScenarioConfig,
    SessionResult,
    evaluate_recording,
    run_session,
)
from chainwatch.schema import Block, Reorg, decode
from detector.evaluation import KIND_FAMILY, Evaluation

pytestmark = pytest.mark.integration

LABEL_KEYS = {"id", "scenario", "family", "kind", "chain_id", "node", "first_block",
              "last_block", "tx_hashes", "miner", "sender", "injected_at"}


@pytest.fixture(scope="module")
def session(tmp_path_factory: pytest.TempPathFactory) -> tuple[SessionResult, Path]:
    out = tmp_path_factory.mktemp("scenarios")
    return run_session(ScenarioConfig.quick(), out), out


@pytest.fixture(scope="module")
def recording(session: tuple[SessionResult, Path]):
    _, out = session
    records = [decode(line) for line in (out / RECORDS_FILE).read_bytes().splitlines()]
    labels = [json.loads(line) for line in (out / LABELS_FILE).read_text().splitlines()]
    blocks: dict[int, Block] = {}
    for r in records:
        if isinstance(r, Block):
            blocks[r.number] = r  # the last delivered block per height is the canonical one
    return records, labels, blocks


def test_every_kind_is_injected_and_labelled(recording) -> None:
    _, labels, _ = recording
    assert set(Counter(lb["kind"] for lb in labels)) == set(KIND_FAMILY)
    for lb in labels:
        assert set(lb) >= LABEL_KEYS, lb["id"]
        assert lb["family"] == KIND_FAMILY[lb["kind"]]
        assert lb["node"] == "anvil-scenarios" and lb["chain_id"] == 31337
        assert isinstance(lb["first_block"], int) and lb["last_block"] >= lb["first_block"]
        assert isinstance(lb["injected_at"], float)


def test_the_recording_holds_what_the_labels_say(recording) -> None:
    records, labels, blocks = recording
    types = Counter(r.type for r in records)
    assert types["block"] >= 300 and types["pending_tx"] > 3000
    assert types["mempool_snapshot"] > 100 and types["tx_lifecycle"] > 3000
    reorgs = [r for r in records if isinstance(r, Reorg)]
    included = {tx.hash: n for n, b in blocks.items() for tx in b.transactions}
    pending = {r.hash for r in records if r.type == "pending_tx"}
    for lb in labels:
        span = range(lb["first_block"], lb["last_block"] + 1)
        kind = lb["kind"]
        if kind == "reorg":
            depth = lb["last_block"] - lb["first_block"] + 1
            assert any(r.depth == depth and r.common_ancestor_number == lb["first_block"] - 1
                       for r in reorgs), lb["id"]
        elif kind in ("fee_outlier", "spam_burst", "sandwich"):
            assert lb["tx_hashes"] and lb["sender"]
            assert set(lb["tx_hashes"]) <= pending, "every labelled tx was seen pending"
            assert included[lb["tx_hashes"][-1]] in span
        if kind == "sandwich":
            block = blocks[lb["first_block"]]
            where = {tx.hash: tx for tx in block.transactions}
            front, victim, back = (where[h] for h in lb["tx_hashes"])
            assert back.transaction_index == victim.transaction_index + 1
            assert front.transaction_index == victim.transaction_index - 1
            assert front.from_address == back.from_address == lb["sender"]
            assert front.to_address == victim.to_address == back.to_address
        elif kind == "empty_blocks":
            assert all(blocks[n].tx_count == 0 and blocks[n].miner == lb["miner"] for n in span)
        elif kind == "miner_dominance":
            own = sum(blocks[n].miner == lb["miner"] for n in span)
            assert own / len(span) >= 0.75
        elif kind == "timestamp_manipulation":
            # ahead: the producer's block, then honest ones until the slots catch up
            assert blocks[lb["first_block"]].miner == lb["miner"]
            assert sum(blocks[n].miner == lb["miner"] for n in span) == lb["details"]["blocks"]
            drift = [blocks[n].timestamp - blocks[n].observed_at for n in span]
            assert max(abs(d) for d in drift) >= 20  # far from the observed clock
        elif kind == "censorship":
            assert all(blocks[n].miner == lb["miner"] for n in span)
            assert all(h not in {tx.hash for n in span for tx in blocks[n].transactions}
                       for h in lb["tx_hashes"]), "censored txs stay out of its blocks"
            assert all(included.get(h, -1) > lb["last_block"] for h in lb["tx_hashes"])
    # normal traffic is busy and block intervals look like a 12 s chain
    numbers = sorted(blocks)
    busy = [blocks[n].tx_count for n in numbers[10:]]
    assert sorted(busy)[len(busy) // 2] >= 10
    observed = [blocks[n].observed_at - blocks[n].timestamp for n in numbers[10:]]
    assert sorted(observed)[len(observed) // 2] < 5


def test_replay_meets_the_quality_floors(session: tuple[SessionResult, Path]) -> None:
    """Floors on the quick session's fixed seed: a detector change that loses a family, or
    floods normal traffic, fails here; docs/quality.md has the measured figures."""
    _, out = session
    evaluation, _ = evaluate_recording(out)
    assert isinstance(evaluation, Evaluation)
    assert evaluation.failed_records == 0
    reorg = evaluation.kind("reorg")
    assert reorg is not None and reorg.labels == 2 and reorg.recall == 1.0
    assert (reorg.latency.max_blocks() or 0) <= 1  # the target: within one block
    for name in ("fork_risk", "tx", "miner"):
        family = evaluation.family(name)
        assert family is not None and family.labels > 0
        assert (family.recall or 0.0) >= 0.8, (name, family.recall)
    # empty blocks are left out here: their detection needs a pool snapshot taken in the
    # 0.25 s before the block, which a loaded CI machine sometimes misses (the miner
    # family's floor above still covers it)
    for kind in ("timestamp_manipulation", "censorship", "miner_dominance"):
        score = evaluation.kind(kind)
        assert score is not None and score.recall == 1.0, kind
        if kind != "miner_dominance":  # a newcomer needs 4 blocks of evidence, others more
            assert (score.latency.max_blocks() or 0) <= 3, kind  # miner behaviour within three
    # measured: 1 false finding in ~300 normal blocks (a fork-risk score); a floor, not
    # the target of one per 1,000
    assert evaluation.overall.false_findings <= 3
