"""Replay scores blocks and transactions in runs of many batches (`Detector.run_blocks`)
and finds exactly what scoring them batch by batch finds, with the same stamps: on a
history with anomalies, a second node delivering the same blocks, a block replaced at a
known height, and pending transactions that make the tx family score batch by batch
for a while."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pytest

from bench.synthetic import generate
from chainwatch.schema import AnyRecord, Block, Finding, PendingTx, encode
from chainwatch.settings import load_settings
from detector.engine import RUN_MAX_TXS, Detector
from detector.families import TxFamily
from detector.tx_features import TxColumns
from replay.app import ReplayOptions, make_detector
from replay.archive import ArchiveSource, ArchiveWriter, archive_row
from replay.driver import ReplayClock, ReplayConfig, Replayer
from replay.rows import InvalidRows
from tests.models import train_models


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Block and tx models trained as `chainwatch train` saves them: frozen in replay."""
    return train_models(tmp_path_factory.mktemp("models"), 800, contamination=0.01)


def _pending(block: Block, i: int, lead: float) -> PendingTx:
    """The block's tx i as the pool announced it `lead` seconds before the block."""
    tx = block.transactions[i]
    return PendingTx(
        chain_id=block.chain_id, node=block.node,
        event_id=PendingTx.id_for(block.chain_id, block.node, tx.hash),
        observed_at=block.observed_at - lead, first_seen_at=block.observed_at - lead,
        hash=tx.hash, from_address=tx.from_address, to_address=tx.to_address,
        nonce=tx.nonce, value=tx.value, gas=tx.gas, gas_price=tx.gas_price,
        max_fee_per_gas=tx.max_fee_per_gas,
        max_priority_fee_per_gas=tx.max_priority_fee_per_gas, tx_type=tx.tx_type,
        input_size=tx.input_size, method_id=tx.method_id,
        is_contract_creation=tx.is_contract_creation)


SIBLING = "0x" + "ab" * 32  # the hash of a block that replaces one at a known height


def _whale(block: Block, hash_: str | None = None) -> Block:
    """The block with its first tx a whale's: a value and a fee far beyond the usual."""
    txs = list(block.transactions)
    txs[0] = txs[0].model_copy(update={
        "value": 10**24, "gas": 9_000_000, "gas_price": 10**13, "max_fee_per_gas": None,
        "max_priority_fee_per_gas": None, "tx_type": 0, "hash": hash_ or txs[0].hash})
    return block.model_copy(update={"transactions": tuple(txs)})


def _history() -> list[AnyRecord]:
    blocks = generate(700, 10, seed=8)
    for i, b in enumerate(blocks):
        if i % 97 == 50 or 401 <= i <= 404:
            blocks[i] = _whale(b)
        if i % 131 == 70:  # a block stamped a minute before it came, 48 s before its parent
            blocks[i] = b.model_copy(update={"timestamp": b.timestamp - 60})
    records: list[AnyRecord] = list(blocks)
    # the pool announces the whales' txs of 4 blocks before their block: their fee is
    # flagged then, and they are watched (censorship) until a block takes them, some
    # batches later (a batch is ~20 blocks, 240 s)
    records += [_pending(blocks[i], 0, lead)
                for i, lead in zip(range(401, 405), (25.0, 90.0, 160.0, 230.0), strict=True)]
    # another block at a height seen already (a short reorg), 3 blocks later, with a whale
    # of its own: its finding is stamped with this block's time, not the first one's
    records.append(_whale(blocks[300], "0x" + "cd" * 32).model_copy(update={
        "hash": SIBLING, "event_id": Block.id_for(1, "bench", SIBLING),
        "observed_at": blocks[303].observed_at + 0.1}))
    # a second node delivering every block 0.4 s after the first
    records += [b.model_copy(update={"node": "twin", "observed_at": b.observed_at + 0.4,
                                     "event_id": Block.id_for(1, "twin", b.hash)})
                for b in blocks]
    return sorted(records, key=lambda r: r.observed_at)


def _replay(models: Path, records: Sequence[AnyRecord], run_blocks: int,
            source: ArchiveSource | None = None) -> tuple[list[Finding], int]:
    """The findings, and how many times the tx family scored blocks."""
    clock = ReplayClock()
    detector = make_detector(load_settings(models=models), clock)
    detector.run_blocks = run_blocks
    calls = 0
    scoring = detector.tx_family(1).on_blocks

    def counted(*args: Any, **kwargs: Any) -> list[Finding]:
        nonlocal calls
        calls += 1
        return scoring(*args, **kwargs)

    detector.tx_family(1).on_blocks = counted  # type: ignore[method-assign]
    findings: list[Finding] = []
    Replayer(detector, clock, ReplayConfig(batch_records=40), findings.extend,
             columns=source).run(source.records() if source is not None else records)
    assert not detector.step_errors
    return findings, calls


def _canonical(findings: list[Finding]) -> list[str]:
    return sorted(f.model_dump_json() for f in findings)


def test_runs_find_what_batch_by_batch_scoring_finds(models: Path) -> None:
    records = _history()
    each, each_calls = _replay(models, records, run_blocks=0)
    runs, run_calls = _replay(models, records, run_blocks=150)
    assert _canonical(runs) == _canonical(each)
    detectors = {f.detector for f in each}
    assert {"tx_iforest", "block_iforest"} <= detectors  # both models' findings compared
    # the runs really held blocks back: far fewer calls (the pending txs' stretch and the
    # replaced height still scored batch by batch)
    assert run_calls < each_calls / 3


def test_runs_of_an_archives_columns_find_the_same(models: Path, tmp_path: Path) -> None:
    """From an archive, the batches' transactions come as columns (`TxColumns`) and a run
    builds its frame once: the same findings as batch by batch. Two chains share the
    batches (each chain's run reads its own blocks' rows out of the shared columns)."""
    other = [_whale(b) if b.number % 40 == 7 else b
             for b in generate(300, 10, seed=9, chain_id=5, node="other")]
    records = sorted([*(r for r in _history() if isinstance(r, Block)), *other],
                     key=lambda r: r.observed_at)
    writer = ArchiveWriter(tmp_path)
    for i, r in enumerate(records):
        writer.add(archive_row("cw.blocks", 0, i, f"{r.chain_id}:{r.node}", encode(r), 0))
    writer.flush()

    def source() -> ArchiveSource:
        s = ArchiveSource(tmp_path, InvalidRows())
        s.columnar = True
        return s

    built: list[int] = []
    frame_of: Callable[..., Any] = TxColumns.frame_of

    def counting(items: Any) -> Any:
        built.append(len(items))
        return frame_of(items)

    each, _ = _replay(models, records, run_blocks=0, source=source())
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(TxColumns, "frame_of", staticmethod(counting))
        runs, _ = _replay(models, records, run_blocks=150, source=source())
    assert _canonical(runs) == _canonical(each)
    assert {f.chain_id for f in each if f.detector == "tx_iforest"} == {1, 5}
    assert max(built) > 1  # several batches' columns made into one frame


def test_what_waits_at_the_end_comes_out(models: Path) -> None:
    """A history shorter than a run: every finding comes from the replay's final flush."""
    records = [r for r in _history() if isinstance(r, Block) and r.node == "bench"
               and r.hash != SIBLING]
    each, _ = _replay(models, records, run_blocks=0)
    runs, calls = _replay(models, records, run_blocks=10_000)
    assert _canonical(runs) == _canonical(each)
    assert any(f.family == "tx" for f in each) and any(f.family == "block" for f in each)
    assert calls == 1


def test_live_models_are_scored_batch_by_batch() -> None:
    """A model that learns from the stream refits between batches: never held back."""
    clock = ReplayClock()
    detector = make_detector(load_settings(), clock)
    detector.run_blocks = 1_000
    blocks = generate(30, 2, seed=3)
    detector.process(blocks)
    assert not detector._tx_runs and not detector._block_run.blocks
    assert isinstance(detector.tx_family(1), TxFamily)


@pytest.mark.parametrize(("options", "watched"), [
    (ReplayOptions(), False),
    (ReplayOptions(speed=10.0), True),
    (ReplayOptions(emit="127.0.0.1:9092"), True),
    (ReplayOptions(metrics_port=9100), True),
    (ReplayOptions(labels=Path("labels.csv")), True),
    (ReplayOptions(per_block=True), True),
])
def test_runs_only_where_nothing_watches_when_findings_come_out(
        options: ReplayOptions, watched: bool) -> None:
    assert options.watched() is watched


def test_a_plain_replay_scores_in_runs(models: Path, tmp_path: Path,
                                       monkeypatch: pytest.MonkeyPatch) -> None:
    from replay import app

    made: list[Detector] = []
    make = app.make_detector

    def remember(*args: Any) -> Detector:
        made.append(make(*args))
        return made[-1]

    monkeypatch.setattr(app, "make_detector", remember)
    history = tmp_path / "history.jsonl"
    history.write_bytes(b"".join(encode(b) + b"\n" for b in generate(50, 3, seed=4)))
    app.run_replay(load_settings(models=models), str(history),
                   ReplayOptions(progress=False), echo=lambda _: None)
    app.run_replay(load_settings(models=models), str(history),
                   ReplayOptions(progress=False, speed=1e9), echo=lambda _: None)
    assert [d.run_blocks for d in made] == [app.RUN_BLOCKS, 0]


def test_runs_hold_a_bounded_number_of_transactions(models: Path) -> None:
    """Blocks that carry their transactions (JSONL, Kafka) keep them in memory while they
    wait: a run is scored once it holds RUN_MAX_TXS of them (~100 mainnet blocks)."""
    clock = ReplayClock()
    detector = make_detector(load_settings(models=models), clock)
    detector.run_blocks = 10_000
    blocks = generate(300, 150, seed=2)
    most = 0
    for start in range(0, len(blocks), 20):
        batch = blocks[start:start + 20]
        clock.now = batch[-1].observed_at
        detector.process(batch)
        held = sum(len(b.transactions) for b in detector._block_run.blocks) + sum(
            len(b.transactions) for run in detector._tx_runs.values() for b in run.blocks)
        most = max(most, held)
    assert 0 < most < 2 * (RUN_MAX_TXS + 20 * 150)  # both kinds of run, each bounded
    assert detector.tx_family(1).scored_rows > 0
