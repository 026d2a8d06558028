"""The bench archive cycles a few generated chunks to reach 10M txs cheaply; its later
cycles must still look like new history to the detectors: no tx hash seen before and
every sender's nonces going on, never back."""

from __future__ import annotations

from itertools import pairwise
from pathlib import Path

import pytest

import bench.replay
from bench.synthetic import generate
from chainwatch.schema import Block
from replay.archive import ArchiveSource
from replay.rows import InvalidRows


def _read(root: Path) -> list[Block]:
    records = list(ArchiveSource(root, InvalidRows()).records())
    assert all(isinstance(r, Block) for r in records)
    return records  # type: ignore[return-value]


def test_cycles_repeat_no_tx_and_continue_every_senders_nonces(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(bench.replay, "CHUNK_BLOCKS", 4)
    monkeypatch.setattr(bench.replay, "DISTINCT_CHUNKS", 2)
    # 3 txs per block, 20 blocks: chunks 0, 1, 0, 1, 0 (cycles 0, 0, 1, 1, 2)
    bench.replay.make(tmp_path, 59, 3)
    blocks = _read(tmp_path)

    assert [b.number for b in blocks] == list(range(20))
    assert all(b.parent_hash == a.hash for a, b in pairwise(blocks))
    txs = [tx for b in blocks for tx in b.transactions or ()]
    assert len(txs) == sum(b.tx_count for b in blocks) > 40
    assert len({tx.hash for tx in txs}) == len(txs)
    # the same chunk in a later cycle: the same traffic, its own hashes and later nonces
    first, again = blocks[0].transactions or (), blocks[8].transactions or ()
    assert [t.from_address for t in first] == [t.from_address for t in again]
    assert all(a.hash != b.hash and a.hash[6:] == b.hash[6:]
               for a, b in zip(first, again, strict=True))
    by_sender: dict[str, list[int]] = {}
    for tx in txs:
        by_sender.setdefault(tx.from_address, []).append(tx.nonce)
    repeated = [n for n in by_sender.values() if len(n) > 1]
    assert repeated
    for nonces in repeated:  # consecutive, in the order the archive delivers them
        assert nonces == list(range(nonces[0], nonces[0] + len(nonces)))


def test_the_chunks_share_their_producers(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each generated chunk draws producers of its own; without the renaming every
    switch between chunks was a turnover of all producers (a surge for the miner rules)."""
    monkeypatch.setattr(bench.replay, "CHUNK_BLOCKS", 60)
    monkeypatch.setattr(bench.replay, "DISTINCT_CHUNKS", 3)
    bench.replay.make(tmp_path, 180, 1)
    blocks = _read(tmp_path)
    chunks = [blocks[i:i + 60] for i in range(0, 180, 60)]
    first = {b.miner for b in chunks[0]}
    for chunk in chunks[1:]:
        own = {b.miner for b in chunk}
        # only a chunk with more producers than the first keeps some of its own
        assert len(own - first) == max(0, len(own) - len(first))
        busiest = bench.replay.producers_by_rank(chunk)[0]
        assert busiest in bench.replay.producers_by_rank(chunks[0])[:2]
    # the first chunk is left as generated
    assert [b.miner for b in chunks[0]] == [b.miner for b in generate(60, 1, seed=100)]
