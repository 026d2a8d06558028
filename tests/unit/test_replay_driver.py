"""Replay drives the live detector deterministically: byte-identical findings for the same
input, --from/--to on block numbers and block times, ticks through quiet gaps on the
replayed clock, --speed pacing, labels scored as `chainwatch evaluate` scores them, and
one-line CLI errors."""

from __future__ import annotations

import itertools
import json
from collections.abc import Sequence
from pathlib import Path

import polars as pl
import pytest
from typer.testing import CliRunner

from bench.synthetic import generate
from chainwatch.cli import app
from chainwatch.exceptions import ChainwatchError
from chainwatch.labels import Label
from chainwatch.schema import AnyRecord, Finding, PeerSnapshot, Reorg, decode, encode
from chainwatch.settings import load_settings
from detector.evaluation import evaluate, replay
from detector.tx_features import TxColumns
from replay.app import ReplayOptions, make_detector, run_replay
from replay.driver import ReplayClock, ReplayConfig, Replayer
from tests.models import train_models


class FakeDetector:
    def __init__(self, clock: ReplayClock) -> None:
        self.clock = clock
        self.batches: list[tuple[float, list[str]]] = []
        self.ticks: list[float] = []

    def process(
        self, records: Sequence[AnyRecord], txs: pl.DataFrame | TxColumns | None = None
    ) -> list[Finding]:
        self.batches.append((self.clock(), [r.event_id for r in records]))
        return []

    def tick(self) -> list[Finding]:
        self.ticks.append(self.clock())
        return []

    def flush(self) -> list[Finding]:
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
    """320 blocks with a reorg at 250, a chain that stalls for 5 minutes before block 300
    (for the models to flag), and an invalid line."""
    blocks = [b if b.number < 300 else b.model_copy(update={
        "timestamp": b.timestamp + 300, "observed_at": b.observed_at + 300})
        for b in generate(320, 20, seed=7)]
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
    detectors = {json.loads(line)["detector"] for line in lines}
    assert {"reorg_depth", "block_iforest"} <= detectors
    for png in ("fork_risk", "tx_scores", "miner_share", "findings_per_detector"):
        assert (outs[0] / f"{png}.png").read_bytes()[:4] == b"\x89PNG"


def test_batch_sets_the_records_per_batch(tmp_path: Path) -> None:
    """`--batch N`: batches of at most N records (and the gap cut); the same reorg found."""
    source = _history(tmp_path / "history.jsonl")
    summaries, findings = [], []
    for batch in ("500", "1"):
        out = tmp_path / batch
        result = CliRunner().invoke(app, ["replay", str(source), "--out", str(out), "--batch",
                                          batch, "--warmup-blocks", "50", "--no-progress"])
        assert result.exit_code == 0, result.output
        summaries.append(json.loads((out / "summary.json").read_text()))
        findings.append([json.loads(line) for line in
                         (out / "findings.jsonl").read_text().splitlines()])
    # 500: cut only where the stream is quiet for 20 s (the stall, slow blocks); 1: each
    # record alone
    assert 1 < summaries[0]["batches"] < 20 and summaries[1]["batches"] == 321
    assert summaries[0]["records"] == summaries[1]["records"] == 321
    reorgs = [[f["event_id"] for f in run if f["detector"] == "reorg_depth"] for run in findings]
    assert reorgs[0] == reorgs[1] != []


def test_from_to_on_block_times_keep_what_happened_between_them() -> None:
    blocks = generate(10, 2, seed=1)
    records: list[AnyRecord] = []
    for b in blocks:
        records += [b, _peers(b.observed_at + 0.1)]
    clock = ReplayClock()
    fake = FakeDetector(clock)
    config = ReplayConfig(from_time=blocks[3].timestamp, to_time=blocks[6].timestamp)
    stats = Replayer(fake, clock, config, lambda f: None).run(records)
    kept = [e for _, batch in fake.batches for e in batch]
    assert kept == [x for b in blocks[3:7] for x in (b.event_id, f"p{b.observed_at + 0.1}")]
    assert (stats.first_block, stats.last_block) == (3, 6)


def test_per_block_batches_end_with_each_block() -> None:
    blocks = generate(4, 1, seed=1)
    records: list[AnyRecord] = []
    for b in blocks:
        records += [_peers(b.observed_at - 0.5), b]
    clock = ReplayClock()
    fake = FakeDetector(clock)
    Replayer(fake, clock, ReplayConfig(per_block=True), lambda f: None).run(records)
    assert [ids for _, ids in fake.batches] == [
        [f"p{b.observed_at - 0.5}", b.event_id] for b in blocks]


def test_replay_labels_score_as_evaluate_does(tmp_path: Path) -> None:
    """The same labels and records give `replay --labels --per-block` the figures of
    `chainwatch evaluate`'s scoring; a bad label line is skipped and reported."""
    source = _history(tmp_path / "history.jsonl")
    labels = tmp_path / "labels.jsonl"
    labels.write_text(
        '{"family": "fork_risk", "kind": "reorg", "node": "bench", "first_block": 248, '
        '"last_block": 250}\n'
        '{"family": "fork_risk", "kind": "reorg", "first_block": 100}\n'
        '{"family": "fork_risk", "first_block": "x"}\n'
    )
    settings = load_settings(warmup_blocks=50)
    out = tmp_path / "out"
    run_replay(settings, str(source), ReplayOptions(out=out, progress=False, labels=labels,
                                                    per_block=True), echo=lambda _: None)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["invalid_by_reason"]["label"] == 1
    [fork] = summary["labels"]["families"]
    assert (fork["labels"], fork["detected"]) == (2, 1)
    by_id = {o["id"]: o for o in summary["labels"]["outcomes"]}
    assert "reorg_depth" in by_id["labels.jsonl:1"]["detected_by"]
    assert by_id["labels.jsonl:2"]["detected_by"] == []
    report = (out / "report.html").read_text()
    assert "<h3>Labels: 1 of 2 missed</h3>" in report
    assert '<td class="long">labels.jsonl:2</td><td>fork_risk</td><td>reorg</td><td>100</td>' \
           "<td>missed</td>" in report
    assert "One batch per block" in report

    records = [decode(line) for line in source.read_bytes().splitlines()[:-1]]

    ev = evaluate(replay(records, make_detector=lambda c: make_detector(settings, c)),
                  [Label(family="fork_risk", kind="reorg", node="bench", first_block=248,
                         last_block=250),
                   Label(family="fork_risk", kind="reorg", first_block=100)])
    score = ev.family("fork_risk")
    assert score is not None
    assert (fork["findings"], fork["true_findings"], fork["false_findings"]) == (
        score.findings, score.true_findings, score.false_findings)
    assert fork["latency_blocks_p50"] == score.latency.p50_blocks()
    assert fork["latency_seconds_p50"] == score.latency.p50_seconds()


def test_cli_errors_are_one_line(tmp_path: Path) -> None:
    runner = CliRunner()
    from chainwatch.cli import main

    for args, expected in (
        (["replay", str(tmp_path / "missing.jsonl")], "replay source not found"),
        (["replay", str(_history(tmp_path / "h.jsonl")), "--speed", "0"], "--speed must be > 0"),
        (["replay", str(tmp_path / "h.jsonl"), "--from", "9", "--to", "3"], "--from 9 is after"),
        (["replay", str(tmp_path / "h.jsonl"), "--from", "monday"], "--from 'monday': expected"),
        (["replay", str(tmp_path / "h.jsonl"), "--to", "2026-11-23T10:00"], "add a zone"),
        (["replay", str(tmp_path / "h.jsonl"), "--from", "offset:5"],
         "Kafka offsets apply to kafka:// sources only"),
        (["archive", "--out", str(tmp_path / "a")], "give --kafka HOST:PORT"),
        (["replay", str(tmp_path / "h.jsonl"), "--batch", "0"], "--batch must be at least 1"),
        (["replay", str(tmp_path / "h.jsonl"), "--batch", "9", "--per-block"],
         "--batch and --per-block exclude each other"),
    ):
        result = runner.invoke(app, args, standalone_mode=False, catch_exceptions=True)
        # a ChainwatchError is what main() prints as one line, without a traceback
        assert isinstance(result.exception, ChainwatchError), (args, result.exception)
        assert expected in str(result.exception), (args, result.exception)
    assert callable(main)



def test_per_block_batches_also_cut_at_max_batch_seconds() -> None:
    """Records between blocks reach the detector within a poll, not with the next block."""
    first, second = generate(2, 1, seed=1)
    t0 = first.observed_at
    records: list[AnyRecord] = [first, _peers(t0 + 0.2), _peers(t0 + 1.0), _peers(t0 + 2.9),
                                second.model_copy(update={"observed_at": t0 + 3.0})]

    def sizes(config: ReplayConfig) -> list[int]:
        clock = ReplayClock()
        fake = FakeDetector(clock)
        Replayer(fake, clock, config, lambda f: None).run(records)
        return [len(ids) for _, ids in fake.batches]

    assert sizes(ReplayConfig(per_block=True)) == [1, 4]
    # block | 0.2 s and 1.0 s (0.8 s apart) | 2.9 s and the next block
    assert sizes(ReplayConfig(per_block=True, max_batch_seconds=1.0)) == [1, 2, 2]


@pytest.fixture(scope="module")
def trained_models(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Block and tx models trained on mainnet-shaped blocks of 10 txs, as `chainwatch
    train` saves them."""
    return train_models(tmp_path_factory.mktemp("models"), 2_000, contamination=0.001)


def _jsonl(path: Path, blocks: list) -> Path:
    path.write_bytes(b"".join(encode(b) + b"\n" for b in blocks))
    return path


@pytest.mark.parametrize(("txs_per_block", "warned"), [(10, False), (1, True)])
def test_trained_models_flagging_far_more_than_they_were_fitted_to_are_warned_of(
        tmp_path: Path, trained_models: Path, txs_per_block: int, warned: bool) -> None:
    """History like the training data: each model flags about its contamination, no
    warning. Near-empty blocks (another kind of chain): the block model flags most of
    them, and the summary, the terminal and the report say so."""
    source = _jsonl(tmp_path / "h.jsonl", generate(1_500, txs_per_block, seed=22))
    lines: list[str] = []
    run_replay(load_settings(models=trained_models), str(source),
               ReplayOptions(out=tmp_path / "out", progress=False), echo=lines.append)
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    block = summary["models"]["block"]
    assert block["trained"] and block["fitted_share"] == 0.001
    assert block["scored"] >= 1_400 and block["flagged"] == round(
        block["flagged_share"] * block["scored"])
    warnings = [line for line in lines if line.startswith("warning: ")]
    report = (tmp_path / "out" / "report.html").read_text()
    if warned:
        assert block["flagged_share"] > 5 * 0.001
        assert [w.removeprefix("warning: ") for w in warnings] == summary["warnings"]
        assert any("trained block model" in w and "x the 0.10%" in w for w in warnings)
        assert 'class="warning"' in report
    else:
        assert block["flagged_share"] < 5 * 0.001
        assert summary["models"]["tx"]["flagged_share"] < 5 * 0.001
        assert warnings == [] and summary["warnings"] == [] and 'class="warning"' not in report


def test_a_takeover_inside_one_batch_is_found_as_one_block_at_a_time_finds_it() -> None:
    """Six blocks by a newcomer, then back to normal, all inside one 500-record batch:
    the default batches report the surge, at the same block and time as --per-block."""
    blocks = generate(400, 2, seed=4)
    newcomer = "0x" + "7e" * 20
    blocks = [b.model_copy(update={"miner": newcomer}) if 300 <= b.number < 306 else b
              for b in blocks]

    def window_findings(config: ReplayConfig) -> list[tuple[str, str, int | None, float]]:
        clock = ReplayClock()
        found: list[Finding] = []
        stats = Replayer(make_detector(load_settings(), clock), clock, config,
                         found.extend).run(blocks)
        assert stats.batches == len(blocks) if config.per_block else stats.batches <= 5
        return [(f.detector, f.subject, f.block_number, f.observed_at) for f in found
                if f.detector in ("miner_surge_rule", "miner_share_rule", "empty_blocks_rule")]

    batched = window_findings(ReplayConfig())
    assert batched == window_findings(ReplayConfig(per_block=True))
    [(_, subject, number, at)] = [f for f in batched if f[1] == newcomer]
    assert number is not None
    assert (subject, at) == (newcomer, blocks[number - blocks[0].number].observed_at)


def test_objects_from_before_a_replay_are_frozen_while_it_runs_and_given_back_after():
    """Their place in the collector only: the oldest generation's collections during the
    replay skip them (they walked ~280k library objects each time)."""
    import gc

    from replay.driver import fewer_collections

    frozen_before, threshold_before = gc.get_freeze_count(), gc.get_threshold()
    # tracked objects that exist before the replay
    held: list[list[object]] = [[] for _ in range(1_000)]
    with fewer_collections():
        assert gc.get_freeze_count() >= frozen_before + len(held)
        assert gc.get_threshold()[0] >= 100_000
    assert gc.get_freeze_count() == 0
    assert gc.get_threshold() == threshold_before
