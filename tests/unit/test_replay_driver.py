"""Replay drives the live detector deterministically: byte-identical findings for the same
input, --from/--to on block numbers, ticks through quiet gaps on the replayed clock,
--speed pacing, labels, and one-line CLI errors."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from bench.synthetic import generate
from chainwatch.cli import app
from chainwatch.exceptions import ChainwatchError
from chainwatch.schema import AnyRecord, Finding, PeerSnapshot, Reorg, encode
from chainwatch.settings import load_settings
from replay.app import ReplayOptions, run_replay
from replay.driver import ReplayClock, ReplayConfig, Replayer
from replay.labels import Label, evaluate


class FakeDetector:
    def __init__(self, clock: ReplayClock) -> None:
        self.clock = clock
        self.batches: list[tuple[float, list[str]]] = []
        self.ticks: list[float] = []

    def process(self, records: list[AnyRecord]) -> list[Finding]:
        self.batches.append((self.clock(), [r.event_id for r in records]))
        return []

    def tick(self) -> list[Finding]:
        self.ticks.append(self.clock())
        return []


def _peers(t: float, node: str = "bench") -> PeerSnapshot:
    return PeerSnapshot(chain_id=1, node=node, event_id=f"p{t}", observed_at=t, peer_count=3,
                        detailed=False)


def test_from_to_keeps_blocks_in_range_and_what_happened_between_them() -> None:
    blocks = generate(10, 2, seed=1)
    records: list[AnyRecord] = []
    for b in blocks:
        records += [b, _peers(b.observed_at + 0.1)]
    clock = ReplayClock()
    fake = FakeDetector(clock)
    stats = Replayer(fake, clock, ReplayConfig(from_block=3, to_block=6), lambda f: None).run(
        records
    )
    kept = [e for _, batch in fake.batches for e in batch]
    # the snapshot after block 6 came before block 7: still inside the range
    assert kept == [x for b in blocks[3:7] for x in (b.event_id, f"p{b.observed_at + 0.1}")]
    assert (stats.first_block, stats.last_block, stats.blocks) == (3, 6, 4)
    assert stats.filtered_out == len(records) - len(kept)


def test_quiet_gaps_cut_batches_and_are_ticked_through_on_recorded_time() -> None:
    blocks = generate(6, 1, seed=1)
    late = [b.model_copy(update={"observed_at": b.observed_at + 100}) for b in blocks[3:]]
    clock = ReplayClock()
    fake = FakeDetector(clock)
    Replayer(fake, clock, ReplayConfig(gap_seconds=20, tick_seconds=10), lambda f: None).run(
        [*blocks[:3], *late]
    )
    assert len(fake.batches) == 2
    first_end = fake.batches[0][0]
    assert first_end == blocks[2].observed_at  # the clock is the last record's time
    gap_ticks = [t for t in fake.ticks if first_end < t < late[0].observed_at]
    assert len(gap_ticks) >= 10 and all(b - a == pytest.approx(10) for a, b in
                                        itertools.pairwise(gap_ticks))
    assert fake.batches[1][0] == late[-1].observed_at


def test_speed_paces_on_recorded_time() -> None:
    blocks = generate(4, 1, seed=1)
    spaced = [b.model_copy(update={"observed_at": 1000.0 + 30 * i}) for i, b in enumerate(blocks)]
    wall = [0.0]
    slept: list[float] = []

    def sleep(s: float) -> None:
        slept.append(s)
        wall[0] += s

    clock = ReplayClock()
    Replayer(FakeDetector(clock), clock,
             ReplayConfig(speed=10, gap_seconds=20, tick_seconds=1000), lambda f: None,
             sleep=sleep, monotonic=lambda: wall[0]).run(spaced)
    assert sum(slept) == pytest.approx(9.0)  # 90 recorded seconds at 10x


def _history(path: Path) -> Path:
    blocks = generate(320, 20, seed=7)
    with path.open("wb") as handle:
        for b in blocks:
            handle.write(encode(b) + b"\n")
            if b.number == 250:
                reorg = Reorg(chain_id=1, node="bench", event_id="r250", observed_at=b.observed_at,
                              old_head_number=250, old_head_hash="0xold", new_head_number=250,
                              new_head_hash=b.hash, common_ancestor_number=247, depth=3)
                handle.write(encode(reorg) + b"\n")
        handle.write(b'{"type": "block", "chain_id": -1}\n')
    return path


def test_same_input_gives_byte_identical_findings(tmp_path: Path) -> None:
    source = _history(tmp_path / "history.jsonl")
    settings = load_settings(warmup_blocks=50)
    outs = []
    for name in ("a", "b"):
        out = tmp_path / name
        stats = run_replay(settings, str(source), ReplayOptions(out=out, progress=False),
                           echo=lambda _: None)
        outs.append(out)
    assert stats.findings > 1
    for name in ("findings.jsonl", "findings.csv", "findings.parquet", "summary.json",
                 "report.html"):
        assert (outs[0] / name).read_bytes() == (outs[1] / name).read_bytes(), name
    summary = json.loads((outs[0] / "summary.json").read_text())
    assert summary["invalid_rows"] == 1
    assert summary["records_by_type"] == {"block": 320, "reorg": 1}
    lines = (outs[0] / "findings.jsonl").read_text().splitlines()
    assert any(json.loads(line)["detector"] == "reorg_depth" for line in lines)
    for png in ("fork_risk", "tx_scores", "miner_share", "findings_per_detector"):
        assert (outs[0] / f"{png}.png").read_bytes()[:4] == b"\x89PNG"


def _finding(family: str, block: int, subject: str, kind: str = "node", t: float = 0.0) -> Finding:
    return Finding(chain_id=1, node="n1", event_id=f"{family}{block}{subject}", observed_at=t,
                   detector="d", family=family, severity="warning", score=0.9, threshold=0.5,
                   subject_kind=kind, subject=subject, block_number=block)


def test_labels_give_precision_recall_and_latency() -> None:
    labels = [
        Label(family="fork_risk", first_block=100, last_block=105, node="n1"),
        Label(family="fork_risk", first_block=300, last_block=300),
        Label(family="tx", first_block=10, last_block=10, tx_hashes=frozenset({"0xaa"})),
    ]
    findings = [
        _finding("fork_risk", 102, "n1", t=130.0),
        _finding("fork_risk", 101, "n1|n2", t=140.0),
        _finding("fork_risk", 200, "n1"),
        _finding("tx", 10, "0xAA", kind="tx"),
        _finding("tx", 10, "0xbb", kind="tx"),
        _finding("block", 10, "0xbb", kind="block"),
    ]
    scores = {s.family: s for s in evaluate(findings, labels, {100: 100.0})}
    fork = scores["fork_risk"]
    assert (fork.findings, fork.true_positives, fork.labels, fork.detected) == (3, 2, 2, 1)
    assert fork.precision == pytest.approx(2 / 3) and fork.recall == 0.5
    assert fork.latency_blocks_median == 2 and fork.latency_seconds_median == 30.0
    tx = scores["tx"]
    assert (tx.precision, tx.recall) == (0.5, 1.0)
    assert "block" not in scores


def test_cli_errors_are_one_line(tmp_path: Path) -> None:
    runner = CliRunner()
    from chainwatch.cli import main

    for args, expected in (
        (["replay", str(tmp_path / "missing.jsonl")], "replay source not found"),
        (["replay", str(_history(tmp_path / "h.jsonl")), "--speed", "0"], "--speed must be > 0"),
        (["replay", str(tmp_path / "h.jsonl"), "--from", "9", "--to", "3"], "--from 9 is after"),
        (["archive", "--out", str(tmp_path / "a")], "give --kafka HOST:PORT"),
    ):
        result = runner.invoke(app, args, standalone_mode=False, catch_exceptions=True)
        # a ChainwatchError is what main() prints as one line, without a traceback
        assert isinstance(result.exception, ChainwatchError), (args, result.exception)
        assert expected in str(result.exception), (args, result.exception)
    assert callable(main)
