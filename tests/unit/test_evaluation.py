"""Scoring of findings against labels: what `chainwatch evaluate` reports must be exact."""

from __future__ import annotations

from typing import Any

import pytest

from chainwatch.schema import Finding
from detector.evaluation import (
    Evaluation,
    Label,
    Observed,
    Replay,
    evaluate,
    matches,
    render_markdown,
    targets,
)

NODE = "n1"
MINER = "0x" + "ab" * 20
SENDER = "0x" + "cd" * 20
TX1, TX2 = "0x" + "11" * 32, "0x" + "22" * 32


def label(id_: str, kind: str, family: str, first: int | None, last: int | None,
          **extra: Any) -> Label:
    raw = {"id": id_, "scenario": kind, "family": family, "kind": kind, "chain_id": 1,
           "node": NODE, "first_block": first, "last_block": last, "injected_at": 1000.0,
           **extra}
    return Label.from_dict(raw)


def finding(detector: str, family: str, subject: str, block: int | None, *,
            kind: str = "node", at: float = 1100.0, node: str = NODE) -> Finding:
    return Finding(
        chain_id=1, node=node, event_id=f"{detector}-{subject}-{block}-{at}", observed_at=at,
        detector=detector, family=family, severity="warning", score=0.9, threshold=0.5,
        subject_kind=kind, subject=subject, block_number=block,
    )


REORG = label("r", "reorg", "fork_risk", 100, 102)
FEE = label("f", "fee_outlier", "tx", 120, 120, tx_hashes=[TX1.upper()])
SPAM = label("s", "spam_burst", "tx", 130, 131, tx_hashes=[TX2], sender=SENDER.upper())
DOM = label("d", "miner_dominance", "miner", 140, 179, miner=MINER)
LABELS = [REORG, FEE, SPAM, DOM]


@pytest.mark.parametrize(
    ("f", "lab", "expected"),
    [
        (finding("reorg_depth", "fork_risk", NODE, 103), REORG, True),
        (finding("reorg_depth", "fork_risk", NODE, 105), REORG, True),  # last + 3
        (finding("reorg_depth", "fork_risk", NODE, 106), REORG, False),
        (finding("reorg_depth", "fork_risk", NODE, 99), REORG, True),  # rewind to ancestor
        (finding("reorg_depth", "fork_risk", NODE, 98), REORG, False),
        (finding("fork_risk_score", "fork_risk", NODE, 119), FEE, False),
        (finding("reorg_depth", "fork_risk", NODE, 101, node="n2"), REORG, False),
        (finding("tx_model", "tx", TX1, 120, kind="tx"), FEE, True),  # case-insensitive
        (finding("tx_model", "tx", TX1, 120, kind="tx"), SPAM, False),
        (finding("nonce_spam", "tx", f"{SENDER}#7", None, kind="tx"), SPAM, True),
        (finding("miner_share", "miner", MINER.upper(), None, kind="miner"), DOM, True),
        (finding("miner_share", "tx", MINER, None, kind="miner"), DOM, False),  # family
        (finding("tx_model", "tx", "0xother", 120, kind="tx"), FEE, False),  # no range rule
        (finding("block_iforest", "block", "0xhash", 120, kind="block"), FEE, False),
    ],
)
def test_matching_rules(f: Finding, lab: Label, expected: bool) -> None:
    assert matches(f, lab) is expected


def run_with(findings: list[Observed]) -> Replay:
    run = Replay(findings=findings)
    run.heights[(1, NODE)] = set(range(0, 1000))
    run.first_seen[TX1] = 1050.0
    run.block_seen[(1, NODE, 103)] = 1090.0
    return run


def scored() -> Evaluation:
    findings = [
        Observed(finding("reorg_depth", "fork_risk", NODE, 103, at=1100.0), head=103),
        Observed(finding("reorg_depth", "fork_risk", NODE, 104, at=1112.0), head=104),
        Observed(finding("node_state", "fork_risk", NODE, 500, at=1200.0), head=500),  # false
        Observed(finding("tx_model", "tx", TX1, 120, kind="tx", at=1060.0), head=121),
        Observed(finding("tx_model", "tx", "0x" + "99" * 32, 300, kind="tx"), head=300),
        Observed(finding("block_iforest", "block", "0xb1", 141, kind="block"), head=141),
        Observed(finding("block_iforest", "block", "0xb2", 700, kind="block"), head=700),
        Observed(finding("miner_share", "miner", MINER, None, kind="miner", at=1300.0),
                 head=143),
    ]
    return evaluate(run_with(findings), LABELS)


def test_counts_per_family_are_exact() -> None:
    ev = scored()
    fork, tx, miner, block = (ev.family(n) for n in ("fork_risk", "tx", "miner", "block"))
    assert fork and tx and miner and block
    assert (fork.labels, fork.detected, fork.true_findings, fork.false_findings) == (1, 1, 2, 1)
    assert (tx.labels, tx.detected, tx.true_findings, tx.false_findings) == (2, 1, 1, 1)
    assert tx.recall == 0.5 and tx.precision == 0.5 and tx.f1 == 0.5
    assert (miner.labels, miner.detected, miner.false_findings) == (1, 1, 0)
    # block-model findings never detect; inside a labelled range they are excused
    assert (block.findings, block.true_findings, block.excused, block.false_findings) == (
        2, 0, 1, 1)
    # normal blocks: 1000 heights minus the 3 + 1 + 2 + 40 labelled ones
    assert ev.normal_blocks == 954
    assert ev.overall.false_findings == 3
    assert ev.overall.false_per_1000 == pytest.approx(3000 / 954)


def test_latency_in_blocks_and_seconds() -> None:
    ev = scored()
    by_id = {o.label.id: o for o in ev.outcomes}
    # a reorg's onset is its last replaced height (102): flagged at head 103
    assert by_id["r"].latency_blocks == 1
    assert by_id["r"].latency_seconds == pytest.approx(10.0)  # from the new tip's record
    assert by_id["f"].latency_blocks == 1
    assert by_id["f"].latency_seconds == pytest.approx(10.0)  # from the tx's first sight
    assert by_id["d"].latency_blocks == 3
    assert by_id["d"].latency_seconds == pytest.approx(300.0)  # no record: injected_at
    assert by_id["s"].detected_by == () and by_id["s"].latency_blocks is None
    assert ev.family("fork_risk").latency.max_blocks() == 1  # type: ignore[union-attr]


def test_per_detector_and_per_kind() -> None:
    ev = scored()
    det = {s.name: s for s in ev.detectors}
    assert det["reorg_depth"].detected == 1 and det["reorg_depth"].precision == 1.0
    assert det["node_state"].precision == 0.0
    kinds = {s.name: s for s in ev.kinds}
    assert (kinds["spam_burst"].labels, kinds["spam_burst"].detected) == (1, 0)
    assert kinds["reorg"].findings == 2


def test_targets_and_report() -> None:
    ev = scored()
    status = {t.name: t.met for t in targets(ev)}
    assert status["reorgs flagged within one block"] is True
    assert status["miner behaviour within three blocks"] is True
    assert status["recall >= 0.9 (tx)"] is False
    assert status["<= 1 false finding per 1,000 normal blocks"] is False
    text = render_markdown(ev, command="chainwatch evaluate --out x.md", session={})
    assert "chainwatch evaluate --out x.md" in text
    assert "| spam_burst | spam_burst | tx | 1 | 0 | - |" in text
    assert text == render_markdown(ev, command="chainwatch evaluate --out x.md", session={})


def test_a_finding_about_a_labelled_actor_in_another_family_is_excused_not_false() -> None:
    attacker = label("a", "reorg", "fork_risk", 200, 205, miner=MINER)
    surge = finding("miner_surge_rule", "miner", MINER, 206, kind="miner")
    later = finding("miner_surge_rule", "miner", MINER, 260, kind="miner")  # out of range
    stranger = finding("miner_surge_rule", "miner", "0x" + "ef" * 20, 206, kind="miner")
    run = Replay(findings=[Observed(f, 206) for f in (surge, later, stranger)],
                 heights={(1, NODE): set(range(150, 300))})
    miner = evaluate(run, [attacker]).family("miner")
    assert miner is not None
    assert (miner.findings, miner.true_findings, miner.excused, miner.false_findings) == (
        3, 0, 1, 2)


def test_a_recording_with_lines_that_are_not_records_says_how_many_were_skipped(tmp_path):
    """`chainwatch evaluate --from-recording`: a damaged line is skipped, printed with its
    number, and counted in the summary and the report (it was dropped silently)."""
    from bench.synthetic import generate
    from chainwatch.scenarios import run_evaluate
    from chainwatch.schema import encode

    blocks = generate(3, 1, seed=1)
    lines = [encode(b) for b in blocks]
    lines.insert(1, b"\xffnot a record")
    (tmp_path / "records.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    (tmp_path / "labels.jsonl").write_text(
        '{"family": "fork_risk", "kind": "reorg", "first_block": 1}\n')
    said: list[str] = []
    summary = run_evaluate(out=tmp_path / "quality.md", record=None, quick=False,
                           from_recording=tmp_path, progress=said.append)
    assert "evaluated 3 blocks" in summary and "1 invalid record lines skipped" in summary
    skipped = [line for line in said if line.startswith("skipped ")]
    assert len(skipped) == 1 and skipped[0].startswith("skipped records.jsonl:2: "), said
    assert "invalid record lines skipped: 1" in (tmp_path / "quality.md").read_text()
