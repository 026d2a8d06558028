"""The archive's crash safety and read order, without a broker: a flush interrupted before
its checkpoint is discarded (its offsets are read again), one interrupted after it is
completed; reading keeps each partition's order and merges partitions by time."""

from __future__ import annotations

import errno
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import polars as pl
import pytest

from bench.synthetic import generate
from chainwatch.schema import AnyRecord, Block, Finding, Reorg, encode
from detector.tx_features import TxColumns
from replay.archive import ArchiveSource, ArchiveWriter, archive_row
from replay.driver import ReplayConfig
from replay.exceptions import ReplayError
from replay.rows import InvalidRows
from tests.fakes import only_blocks


def _rows(partition: int, start: int, blocks: list[Block]) -> list[dict[str, Any]]:
    return [archive_row("cw.blocks", partition, start + i, "1:n", encode(b), 0)
            for i, b in enumerate(blocks)]


def test_interrupted_flushes_roll_back_or_forward(tmp_path: Path) -> None:
    blocks = generate(6, 1, seed=2)
    writer = ArchiveWriter(tmp_path)
    for row in _rows(0, 0, blocks[:3]):
        writer.add(row)
    writer.flush()
    # killed after writing the data files but before the checkpoint: rolled back
    orphan = next(tmp_path.glob("chain_id=1/day=*")) / "cw.blocks-0-00000000000000000003-" \
        "00000000000000000005.parquet.tmp"
    orphan.write_bytes(b"partial")
    resumed = ArchiveWriter(tmp_path)
    assert not orphan.exists()
    assert resumed.next_offsets == {"cw.blocks:0": 3}
    # killed after the checkpoint but before the renames: rolled forward
    for row in _rows(0, 3, blocks[3:]):
        resumed.add(row)
    resumed.flush()
    final = next(tmp_path.glob("chain_id=1/day=*/cw.blocks-0-*3-*5.parquet"))
    os.replace(final, final.with_name(final.name + ".tmp"))
    again = ArchiveWriter(tmp_path)
    assert final.exists()
    assert again.next_offsets == {"cw.blocks:0": 6}
    records = list(ArchiveSource(tmp_path, InvalidRows()).records())
    assert [r.event_id for r in records] == [b.event_id for b in blocks]


def test_reading_keeps_partition_order_and_merges_by_time(tmp_path: Path) -> None:
    blocks = generate(4, 1, seed=3)
    # the collector sends a reorg before the new branch's blocks, even if stamped later
    reorg = Reorg(chain_id=1, node="n", event_id="r", observed_at=blocks[3].observed_at + 5,
                  old_head_number=2, old_head_hash="0xa", new_head_number=3,
                  new_head_hash="0xb", common_ancestor_number=1, depth=1)
    other = [b.model_copy(update={"node": "m", "event_id": f"m{b.number}"}) for b in blocks]
    writer = ArchiveWriter(tmp_path)
    partition0 = [archive_row("cw.blocks", 0, 0, "1:n", encode(reorg), 0), *_rows(0, 1, blocks)]
    for row in partition0 + _rows(1, 0, other):
        writer.add(row)
    writer.add(archive_row("cw.blocks", 2, 0, None, b"garbage", 1_700_000_000_000))
    writer.flush()
    invalid = InvalidRows()
    order = [r.event_id for r in ArchiveSource(tmp_path, invalid).records()]
    assert order.index("r") < order.index(blocks[0].event_id)
    assert [e for e in order if e.startswith("m")] == ["m0", "m1", "m2", "m3"]
    assert invalid.count == 1 and invalid.samples[0][0].startswith("chain_id=unknown/")


def _replay(
    root: Path, config: ReplayConfig, *, screen: bool
) -> tuple[list[str], int, int, int]:
    """(kept event ids, filtered out, invalid rows, payloads not read) of a replay of the
    archive at root."""
    from replay.driver import ReplayClock, Replayer

    kept: list[str] = []

    class Recorder:
        def process(
            self, records: Sequence[AnyRecord], txs: pl.DataFrame | TxColumns | None = None
        ) -> list[Finding]:
            kept.extend(r.event_id for r in records)
            return []

        def tick(self) -> list[Finding]:
            return []

        def flush(self) -> list[Finding]:
            return []

    invalid = InvalidRows()
    source = ArchiveSource(root, invalid)
    replayer = Replayer(Recorder(), ReplayClock(), config, lambda f: None)
    if screen:
        source.screen = replayer.screen
        source.block_window = replayer.range.block_window()
    stats = replayer.run(source.records())
    return kept, stats.filtered_out, invalid.count, source.payloads_skipped


def test_from_to_skips_decoding_rows_outside_and_keeps_the_same_records(
    tmp_path: Path, monkeypatch
) -> None:
    from chainwatch.schema import PeerSnapshot
    from replay import archive

    blocks = generate(30, 3, seed=4)
    rows: list[dict[str, Any]] = []
    for b in blocks:
        rows.append(archive_row("cw.blocks", 0, len(rows), "1:n", encode(b), 0))
        peers = PeerSnapshot(chain_id=1, node="n", event_id=f"p{b.number}",
                             observed_at=b.observed_at + 0.1, peer_count=5, detailed=False)
        rows.append(archive_row("cw.peers", 0, len(rows), "1:n", encode(peers), 0))
    # a reorg to height 12 recorded after block 20, and a corrupt block row at height 25
    reorg = Reorg(chain_id=1, node="n", event_id="r", observed_at=blocks[20].observed_at + 0.2,
                  old_head_number=12, old_head_hash="0xa", new_head_number=12,
                  new_head_hash="0xb", common_ancestor_number=11, depth=1)
    rows.append(archive_row("cw.blocks", 0, len(rows), "1:n", encode(reorg), 0))
    broken = archive_row("cw.blocks", 0, len(rows), "1:n", encode(blocks[25]), 0)
    rows.append({**broken, "payload": broken["payload"][:-40]})
    writer = ArchiveWriter(tmp_path)
    for row in rows:
        writer.add(row)
    writer.flush()
    decoded: list[int] = []
    real_decode = archive.decode

    def counting_decode(payload: bytes | str) -> AnyRecord:
        decoded.append(1)
        return real_decode(payload)

    monkeypatch.setattr(archive, "decode", counting_decode)
    configs = [
        ReplayConfig(from_block=10, to_block=15),
        ReplayConfig(to_block=22),
        ReplayConfig(from_time=blocks[8].timestamp, to_time=blocks[14].timestamp),
        ReplayConfig(from_block=5, to_time=blocks[27].timestamp),
    ]
    for config in configs:
        decoded.clear()
        plain = _replay(tmp_path, config, screen=False)
        decoded_plain = len(decoded)
        decoded.clear()
        screened = _replay(tmp_path, config, screen=True)
        assert screened[0] == plain[0], config  # the same records kept, in the same order
        # each row is kept, outside the range, or invalid; rows outside are not decoded, so
        # the corrupt one counts as outside when the range leaves it out
        assert screened[1] + screened[2] == plain[1] + plain[2], config
        assert screened[1] > 0 and len(decoded) == decoded_plain - screened[1], config
        assert screened[2] == (1 if config.to_time == blocks[27].timestamp else 0), config
        # under height bounds alone, the block rows outside them are not even read
        outside = [r for r in rows if r["type"] == "block" and not (config.from_block or 0)
                   <= r["block_number"] <= (config.to_block if config.to_block is not None
                                            else 10**9)]
        timed = config.from_time is not None or config.to_time is not None
        assert screened[3] == (0 if timed else len(outside)), config
        assert plain[3] == 0


def test_replay_wiring_leaves_node_clients_and_plotting_unimported() -> None:
    """`chainwatch replay` starts in well under a second: web3 (~0.6 s to import, for the
    collectors) and matplotlib (~0.3 s, for --out only) stay out of its imports."""
    import subprocess
    import sys

    code = ("import sys, replay.app; "
            "print(sorted(m for m in ('web3', 'matplotlib', 'collector.rpc') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, cwd=Path(__file__).resolve().parents[2])
    assert out.stdout.strip() == "[]"


def test_files_wholly_outside_the_heights_are_screened_without_reading_rows(
    tmp_path: Path, monkeypatch
) -> None:
    """Two nodes' partitions written in many small files, snapshots in a third stream:
    files whose blocks all lie above --to (or below --from) are screened in one step, with
    the same records kept, the same counts and the same end of the range (snapshots after
    the first block above --to are left out) as row by row."""
    from chainwatch.schema import PeerSnapshot
    from replay import archive

    blocks = generate(60, 2, seed=6)
    writer = ArchiveWriter(tmp_path)
    for i, b in enumerate(blocks):
        other = b.model_copy(update={"node": "m", "event_id": f"m{b.number}",
                                     "observed_at": b.observed_at + 0.5})
        peers = PeerSnapshot(chain_id=1, node="n", event_id=f"p{b.number}",
                             observed_at=b.observed_at + 0.2, peer_count=5, detailed=False)
        writer.add(archive_row("cw.blocks", 0, i, "1:n", encode(b), 0))
        writer.add(archive_row("cw.blocks", 1, i, "1:m", encode(other), 0))
        writer.add(archive_row("cw.peers", 0, i, "1:n", encode(peers), 0))
        if i % 7 == 6:
            writer.flush()  # a file per partition every 7 blocks
    writer.flush()
    skipped: list[bool] = []
    real = archive.ArchiveSource._outside

    def counting(
        self: archive.ArchiveSource, small: pl.DataFrame
    ) -> tuple[float, list[int]] | None:
        found = real(self, small)
        skipped.append(found is not None)
        return found

    monkeypatch.setattr(archive.ArchiveSource, "_outside", counting)
    for config in (ReplayConfig(from_block=20, to_block=33), ReplayConfig(to_block=9),
                   ReplayConfig(from_block=50)):
        skipped.clear()
        plain = _replay(tmp_path, config, screen=False)
        screened = _replay(tmp_path, config, screen=True)
        assert screened[0] == plain[0] and screened[1] == plain[1], config
        assert screened[0] and sum(skipped) >= 4, config  # whole files were skipped
        kept_peers = [e for e in plain[0] if e.startswith("p")]
        assert kept_peers and all(
            (config.from_block or 0) <= int(e[1:]) <= (config.to_block or 10**9)
            for e in kept_peers), config


def _three_files(root: Path) -> tuple[list[Block], list[Path]]:
    """An archive of one stream in three files of 40 blocks each."""
    blocks = generate(120, 1, seed=8)
    writer = ArchiveWriter(root)
    for start in (0, 40, 80):
        for row in _rows(0, start, blocks[start:start + 40]):
            writer.add(row)
        writer.flush()
    return blocks, sorted(root.glob("chain_id=1/day=*/*.parquet"))


def test_a_file_without_its_footer_is_reported_and_the_others_replayed(tmp_path: Path) -> None:
    blocks, files = _three_files(tmp_path)
    files[1].write_bytes(files[1].read_bytes()[:300])  # a copy cut short
    invalid = InvalidRows()
    source = ArchiveSource(tmp_path, invalid)
    numbers = [b.number for b in only_blocks(source.records())]
    assert numbers == [b.number for b in blocks[:40] + blocks[80:]]
    assert (invalid.count, invalid.files) == (0, 1)  # its rows are not known: not one row
    where, reason = invalid.samples[0]
    assert where.endswith(files[1].name) and reason.startswith("unreadable Parquet file, skipped: ")
    assert source.total == 80


def test_a_file_damaged_inside_keeps_the_rows_before_and_reports_the_rest(
    tmp_path: Path,
) -> None:
    blocks, files = _three_files(tmp_path)
    data = bytearray(files[1].read_bytes())
    data[4:len(data) // 2] = bytes(len(data) // 2 - 4)  # the pages zeroed, the footer intact
    files[1].write_bytes(bytes(data))
    invalid = InvalidRows()
    numbers = [b.number for b in only_blocks(ArchiveSource(tmp_path, invalid).records())]
    assert numbers[:40] == [b.number for b in blocks[:40]]
    assert numbers[-40:] == [b.number for b in blocks[80:]]
    assert (invalid.count, invalid.files) == (0, 1)
    where, reason = invalid.samples[0]
    assert where.endswith(files[1].name)
    assert reason.startswith("unreadable Parquet file, the rest skipped: ")
    assert reason.endswith(f"(after {len(numbers) - 80} rows)")


def test_a_flush_that_cannot_write_is_one_error_and_a_restart_reads_those_rows_again(
    tmp_path: Path, monkeypatch
) -> None:
    blocks = generate(6, 1, seed=9)
    writer = ArchiveWriter(tmp_path)
    for row in _rows(0, 0, blocks[:3]):
        writer.add(row)
    writer.flush()
    for row in _rows(0, 3, blocks[3:]):
        writer.add(row)

    def disk_full(self, file, **_):
        Path(file).write_bytes(b"PAR1 half")  # part of a file, then the disk is full
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(pl.DataFrame, "write_parquet", disk_full)
    with pytest.raises(ReplayError, match=r"^cannot write the archive under .*: .*No space left"):
        writer.flush()
    monkeypatch.undo()
    resumed = ArchiveWriter(tmp_path)
    assert resumed.next_offsets == {"cw.blocks:0": 3}  # the lost flush is read again
    assert not list(tmp_path.rglob("*.tmp"))
    records = list(ArchiveSource(tmp_path, InvalidRows()).records())
    assert [r.event_id for r in records] == [b.event_id for b in blocks[:3]]


def test_a_row_failing_without_a_message_is_counted_not_a_crash(
    tmp_path: Path, monkeypatch
) -> None:
    """An error with an empty message (a bare ValueError) is reported by its type: the
    reader took its message's first line, which an empty message does not have."""
    import replay.archive as archive

    blocks = generate(3, 1, seed=5)
    writer = ArchiveWriter(tmp_path)
    for row in _rows(0, 0, blocks):
        writer.add(row)
    writer.flush()
    decode = archive.decode

    def failing_on_the_second(payload: str):
        record = decode(payload)
        if record.event_id == blocks[1].event_id:
            raise ValueError()
        return record

    monkeypatch.setattr(archive, "decode", failing_on_the_second)
    invalid = InvalidRows()
    records = list(ArchiveSource(tmp_path, invalid).records())
    assert [r.event_id for r in records] == [blocks[0].event_id, blocks[2].event_id]
    assert invalid.count == 1 and invalid.samples[0][1] == "ValueError"


def test_first_line_of_an_error() -> None:
    from chainwatch.exceptions import first_line

    assert first_line(OSError("cannot read\n  hint: check the path")) == "cannot read"
    assert first_line(ValueError()) == "ValueError"
    assert first_line(RuntimeError("  \n")) == "RuntimeError"


def test_the_summary_counts_an_unreadable_file_apart_from_invalid_rows(tmp_path: Path) -> None:
    """What the user reads: the file is listed with its reason, and counted as a file
    whose rows are unknown, not as one invalid row."""
    import json

    from chainwatch.settings import load_settings
    from replay.app import ReplayOptions, run_replay

    _, files = _three_files(tmp_path / "archive")
    files[1].write_bytes(files[1].read_bytes()[:300])
    lines: list[str] = []
    out = tmp_path / "out"
    run_replay(load_settings(warmup_blocks=50), str(tmp_path / "archive"),
               ReplayOptions(out=out, progress=False), echo=lines.append)
    assert any(line.startswith("skipped ") and files[1].name in line for line in lines)
    (done,) = [line for line in lines if line.startswith("replayed ")]
    assert "0 invalid rows skipped, 1 unreadable archive files skipped (rows unknown)" in done
    summary = json.loads((out / "summary.json").read_text())
    assert (summary["invalid_rows"], summary["unreadable_files"]) == (0, 1)
    assert "1 unreadable archive files" in (out / "report.html").read_text()
