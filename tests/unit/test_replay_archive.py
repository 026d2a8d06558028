"""The archive's crash safety and read order, without a broker: a flush interrupted before
its checkpoint is discarded (its offsets are read again), one interrupted after it is
completed; reading keeps each partition's order and merges partitions by time."""

from __future__ import annotations

import os
from pathlib import Path

from bench.synthetic import generate
from chainwatch.schema import Reorg, encode
from replay.archive import ArchiveSource, ArchiveWriter, archive_row
from replay.rows import InvalidRows


def _rows(partition: int, start: int, blocks: list) -> list[dict]:
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
