"""Blocks whose transactions the archive stores in columns: read back whole and exact, and
replayed as headers plus one tx frame per batch with the findings whole blocks give."""

from __future__ import annotations

import random
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import polars as pl
import pytest

from bench.synthetic import generate
from chainwatch.schema import AnyRecord, Block, Finding, PendingTx, TxSummary, encode
from chainwatch.settings import load_settings
from detector.tx_features import TxColumns
from replay.app import make_detector
from replay.archive import ARCHIVE_SCHEMA, ArchiveSource, ArchiveWriter, archive_row
from replay.driver import ReplayClock, ReplayConfig, Replayer
from replay.rows import InvalidRows

BOT, VICTIM, ROUTER = "0x" + "b0" * 20, "0x" + "71" * 20, "0x" + "7a" * 20


def _write(root: Path, records: Sequence[AnyRecord]) -> list[dict[str, Any]]:
    writer = ArchiveWriter(root)
    rows = [archive_row("cw.blocks", 0, i, "1:n", encode(r), 0) for i, r in enumerate(records)]
    for row in rows:
        writer.add(row)
    writer.flush()
    return rows


def _tx(index: int, sender: str, **fields: object) -> TxSummary:
    base: dict[str, object] = dict(
        hash=f"0x{random.Random(f'{sender}{index}{fields}').getrandbits(256):064x}",
        transaction_index=index, from_address=sender, to_address=ROUTER, value=0,
        gas=100_000, gas_price=None, max_fee_per_gas=30 * 10**9,
        max_priority_fee_per_gas=10**9, nonce=index, tx_type=2, input_size=68,
        method_id="0xa9059cbb", is_contract_creation=False,
    )
    return TxSummary.model_validate({**base, **fields})


def _awkward(block: Block) -> Block:
    """Values a column could get wrong: wei beyond 2^64 and 2^53, nulls, mixed case."""
    txs = (
        _tx(0, "0xAbCd" + "ef" * 18, value=2**256 - 1, to_address=None, method_id=None,
            is_contract_creation=True),
        _tx(1, VICTIM, value=2**53 + 1, gas_price=7, max_fee_per_gas=None,
            max_priority_fee_per_gas=None, tx_type=0),
        _tx(2, VICTIM, value=10**30 + 7, nonce=2**63 - 1),
    )
    return block.model_copy(update={"transactions": txs, "tx_count": len(txs)})


def test_the_archive_gives_back_every_block_written(tmp_path: Path) -> None:
    blocks = generate(6, 20, seed=7)
    blocks[1] = _awkward(blocks[1])
    blocks[2] = blocks[2].model_copy(update={"transactions": (), "tx_count": 0})
    # a gas price beyond Int64: this block keeps its transactions in the payload
    too_big = _tx(0, VICTIM, gas_price=2**70, max_fee_per_gas=None,
                  max_priority_fee_per_gas=None, tx_type=0)
    blocks[3] = blocks[3].model_copy(update={"transactions": (too_big,), "tx_count": 1})
    rows = _write(tmp_path, blocks)
    assert [r["transactions"] is None for r in rows] == [False, False, True, True, False, False]
    assert '"transactions":[]' in rows[0]["payload"] and str(2**70) in rows[3]["payload"]
    assert list(ArchiveSource(tmp_path, InvalidRows()).records()) == blocks


def _tx_frame_of_all(root: Path) -> pl.DataFrame | None:
    source = ArchiveSource(root, InvalidRows())
    source.columnar = True
    columns = source.tx_columns(list(source.records()))
    return columns.frame() if columns is not None else None


def test_lowercase_files_say_so_and_their_txs_are_not_lowercased_again(
    tmp_path: Path, monkeypatch
) -> None:
    """The collectors' lower-case addresses and selectors are marked in the file's
    metadata and read as they are; a file with a mixed-case one is lower-cased on read."""
    import detector.tx_features as tx_features
    from replay.archive import LOWERCASE, LOWERCASE_KEY

    lower, mixed = tmp_path / "lower", tmp_path / "mixed"
    blocks = generate(3, 20, seed=9)
    _write(lower, blocks)
    _write(mixed, [blocks[0], _awkward(blocks[1])])
    marks = {root.name: [pl.read_parquet_metadata(f).get(LOWERCASE_KEY)
                         for f in root.rglob("*.parquet")] for root in (lower, mixed)}
    assert marks == {"lower": [LOWERCASE], "mixed": [None]}
    def not_again(column: pl.Expr) -> pl.Expr:
        raise AssertionError("lower-cased again")

    monkeypatch.setattr(tx_features, "_lowercase", not_again)
    read = _tx_frame_of_all(lower)
    assert read is not None and read.height == sum(b.tx_count for b in blocks)
    lowered = read.with_columns(pl.col(k).str.to_lowercase()
                                for k in ("from_address", "to_address", "method_id"))
    assert read.equals(lowered)  # what lower-casing would have given
    with pytest.raises(AssertionError, match="lower-cased again"):
        _tx_frame_of_all(mixed)
    monkeypatch.undo()
    frame = _tx_frame_of_all(mixed)
    assert frame is not None and "0xabcd" + "ef" * 18 in frame["from_address"].to_list()


def test_archives_written_before_the_columns_still_read(tmp_path: Path) -> None:
    blocks = generate(4, 10, seed=8)
    old_schema = {k: v for k, v in ARCHIVE_SCHEMA.items() if k != "transactions"}
    rows = [{**archive_row("cw.blocks", 0, i, "1:n", encode(b), 0), "payload": encode(b).decode()}
            for i, b in enumerate(blocks)]
    directory = tmp_path / "chain_id=1" / "day=2023-11-14"
    directory.mkdir(parents=True)
    pl.DataFrame([{k: r[k] for k in old_schema} for r in rows], schema=old_schema).write_parquet(
        directory / f"cw.blocks-0-{0:020d}-{3:020d}.parquet")
    for columnar in (False, True):
        source = ArchiveSource(tmp_path, InvalidRows())
        source.columnar = columnar
        records = list(source.records())
        assert records == blocks
        assert source.tx_columns(records) is None  # whole blocks: nothing in columns


def test_wei_amounts_read_from_decimal_strings_are_the_floats_of_the_ints() -> None:
    rng = random.Random(3)
    values = [0, 1, 2**53 + 1, 2**64 + 3, 10**30 + 7, 2**256 - 1] + [
        rng.getrandbits(rng.randint(1, 256)) for _ in range(20_000)]
    parsed = pl.Series([str(v) for v in values]).cast(pl.Float64).to_list()
    assert parsed == [float(v) for v in values]


def _history() -> list[AnyRecord]:
    """Two nodes' blocks with a sandwich, a spam burst, a fee outlier and pending txs a
    producer leaves out (so the censorship rule reads each block's txs and tips)."""
    blocks = generate(80, 80, seed=11, node="n")
    sandwich = (_tx(0, BOT), _tx(1, VICTIM), _tx(2, BOT, nonce=1))
    blocks[30] = blocks[30].model_copy(update={
        "transactions": sandwich + tuple(t.model_copy(update={"transaction_index": i + 3})
                                         for i, t in enumerate(blocks[30].transactions))})
    burst = tuple(_tx(i, BOT, nonce=100 + i) for i in range(60))
    blocks[35] = blocks[35].model_copy(update={"transactions": burst, "tx_count": 60})
    outlier = blocks[70].transactions[5].model_copy(update={
        "max_fee_per_gas": 10**15, "max_priority_fee_per_gas": 10**15 - 10**9})
    blocks[70] = blocks[70].model_copy(update={"transactions": (
        *blocks[70].transactions[:5], outlier, *blocks[70].transactions[6:])})
    records: list[AnyRecord] = []
    for b in blocks:
        if b.number == 20:
            records += [PendingTx(
                chain_id=1, node="n", event_id=f"p{i}", observed_at=b.observed_at - 30,
                first_seen_at=b.observed_at - 30, hash=f"0x{i:064x}", from_address=VICTIM,
                to_address=ROUTER, nonce=0, value=0, gas=21_000, max_fee_per_gas=10**12,
                max_priority_fee_per_gas=10**11, tx_type=2, input_size=0, method_id=None,
                is_contract_creation=False) for i in range(3)]
        records.append(b)
        # the same block from a second node, a little later
        records.append(b.model_copy(update={
            "node": "m", "event_id": Block.id_for(1, "m", b.hash),
            "observed_at": b.observed_at + 0.5}))
    return records


def _replay(root: Path, config: ReplayConfig, columnar: bool) -> tuple[list[Finding], int]:
    """The findings, and how many txs reached the detector as frames."""
    clock = ReplayClock()
    detector = make_detector(load_settings(warmup_blocks=20), clock)
    findings: list[Finding] = []
    source = ArchiveSource(root, InvalidRows())
    source.columnar = columnar
    framed = 0

    class Counted:
        def tx_columns(self, batch: list[AnyRecord]) -> TxColumns | None:
            nonlocal framed
            columns = source.tx_columns(batch)
            frame = columns.frame() if columns is not None else None
            framed += frame.height if frame is not None else 0
            if frame is not None:  # blocks read in columns come without their txs
                framed_blocks = set(frame.select("node", "block_hash").unique().iter_rows())
                assert not any(r.transactions for r in batch if isinstance(r, Block)
                               and (r.node, r.hash) in framed_blocks)
            return columns

        def discard(self, record: AnyRecord) -> None:
            source.discard(record)

    Replayer(detector, clock, config, findings.extend, columns=Counted()).run(source.records())
    assert not detector.step_errors
    assert not source._columns  # nothing left behind (blocks outside --from/--to dropped)
    return findings, framed


@pytest.mark.parametrize("config", [
    ReplayConfig(batch_records=40),
    ReplayConfig(batch_records=7),
    ReplayConfig(from_block=12, to_block=74, batch_records=13),
], ids=["batches of 40", "batches of 7", "from 12 to 74"])
def test_a_columnar_replay_finds_what_whole_blocks_find(tmp_path: Path, config) -> None:
    _write(tmp_path, _history())
    whole, none = _replay(tmp_path, config, columnar=False)
    columnar, framed = _replay(tmp_path, config, columnar=True)
    assert none == 0 and framed > 5_000
    assert [f.model_dump_json() for f in columnar] == [f.model_dump_json() for f in whole]
    found = {f.detector for f in whole}
    assert {"sandwich_rule", "sender_burst_rule", "tx_iforest"} <= found, found


def test_scoring_on_the_scoring_thread_changes_no_finding(tmp_path: Path, monkeypatch) -> None:
    """A big batch's txs are scored on another thread while the bookkeeping runs."""
    from detector import families, pools

    _write(tmp_path, _history())
    config = ReplayConfig(batch_records=40)
    inline, _ = _replay(tmp_path, config, columnar=True)
    submitted = []
    real_pool = pools.ThreadPoolExecutor

    class CountingPool(real_pool):  # type: ignore[misc, valid-type]
        def submit(self, fn, *args, **kwargs):
            if self._thread_name_prefix == "tx-score":
                submitted.append(len(args[0]))
            return super().submit(fn, *args, **kwargs)

    monkeypatch.setattr(families, "ASYNC_MIN_ROWS", 1)
    monkeypatch.setattr(pools, "ThreadPoolExecutor", CountingPool)
    pools.shut_down_pools()  # the pools are made anew, counting
    threaded, _ = _replay(tmp_path, config, columnar=True)
    pools.shut_down_pools()
    assert len(submitted) >= 3 and sum(submitted) > 4_000
    assert [f.model_dump_json() for f in threaded] == [f.model_dump_json() for f in inline]
    assert any(f.detector == "tx_iforest" for f in threaded)


def test_a_given_frame_of_exactly_the_blocks_is_taken_as_it_is(monkeypatch) -> None:
    """included_tx_frame's shortcut gives what the join gives, and only when it may."""
    from detector import tx_features
    from detector.tx_features import included_tx_frame, tx_frame_of

    blocks = generate(6, 15, seed=12)
    blocks[2] = blocks[2].model_copy(update={"transactions": (), "tx_count": 0})
    headers = [b.model_copy(update={"transactions": ()}) for b in blocks]
    whole = included_tx_frame(blocks)[0]
    given = tx_frame_of(headers, [len(b.transactions) for b in blocks], whole.drop(
        [c for c in whole.columns if c not in (
            "tx_index", "hash", "from_address", "to_address", "nonce", "value", "gas",
            "gas_price", "max_fee_per_gas", "max_priority_fee_per_gas", "tx_type",
            "input_size", "method_id", "is_contract_creation")]))
    cases = {
        "exactly": (headers, True),
        "a subset": (headers[1:4], False),
        "another order": ([headers[3], headers[1]], False),
        "one block twice": ([headers[1], headers[1]], False),
    }
    taken: list[bool] = []
    real = tx_features._counts_if_exactly

    def noting(frame: pl.DataFrame, blocks: Sequence[Block]) -> list[int] | None:
        counts = real(frame, blocks)
        taken.append(counts is not None)
        return counts

    monkeypatch.setattr(tx_features, "_counts_if_exactly", noting)
    for name, (wanted, shortcut) in cases.items():
        taken.clear()
        fast = included_tx_frame(wanted, given)
        with monkeypatch.context() as m:
            m.setattr(tx_features, "_counts_if_exactly", lambda f, b: None)
            slow = included_tx_frame(wanted, given)
        assert taken == [shortcut], name
        assert fast[1] == slow[1] and fast[0].equals(slow[0]), name


def test_an_archive_of_both_formats_replays_as_whole_blocks_do(tmp_path: Path) -> None:
    """Files written before the column (whole blocks in the payload) beside new ones: a
    batch mixes blocks that bring their own transactions with blocks read in columns."""
    history = _history()
    _write(tmp_path, history[: len(history) // 2])
    old_schema = {k: v for k, v in ARCHIVE_SCHEMA.items() if k != "transactions"}
    rows = [{**archive_row("cw.blocks", 1, i, "1:n", encode(r), 0), "payload": encode(r).decode()}
            for i, r in enumerate(history[len(history) // 2:])]
    directory = tmp_path / "chain_id=1" / "day=2023-11-14"
    directory.mkdir(parents=True, exist_ok=True)
    pl.DataFrame([{k: r[k] for k in old_schema} for r in rows], schema=old_schema).write_parquet(
        directory / f"cw.blocks-1-{0:020d}-{len(rows) - 1:020d}.parquet")
    config = ReplayConfig(batch_records=40)
    whole, _ = _replay(tmp_path, config, columnar=False)
    mixed, framed = _replay(tmp_path, config, columnar=True)
    assert 0 < framed < sum(len(r.transactions) for r in history if isinstance(r, Block))
    assert [f.model_dump_json() for f in mixed] == [f.model_dump_json() for f in whole]
    assert {"sandwich_rule", "sender_burst_rule", "tx_iforest"} <= {f.detector for f in whole}


def test_tx_ranges_of_a_batch_are_read_as_runs_of_adjacent_rows():
    """Adjacent ranges of one chunk become one slice; a gap (a block left out) or another
    chunk starts a new one; the rows are those of the ranges one by one, in order."""
    from replay.archive import _tx_runs, _TxRange

    one = pl.DataFrame({"i": list(range(10))})
    two = pl.DataFrame({"i": list(range(100, 106))})
    ranges = [_TxRange(one, 0, 2), _TxRange(one, 2, 0), _TxRange(one, 2, 3),  # adjacent
              _TxRange(one, 7, 2),  # rows 5-6 belong to a block not in the batch
              _TxRange(two, 0, 4), _TxRange(two, 4, 2)]
    runs = _tx_runs(ranges)
    assert [r.height for r in runs] == [5, 2, 6]
    assert pl.concat(runs)["i"].to_list() == pl.concat([r.frame() for r in ranges])["i"].to_list()
    assert _tx_runs([]) == []
