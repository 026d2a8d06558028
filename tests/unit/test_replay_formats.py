"""Replay inputs: the ethereum-etl export analysts have, the replay table format (CSV and
Parquet), JSONL; invalid rows are reported with file, line and reason, and skipped; time
bounds cut an export on its block timestamps."""

from __future__ import annotations

import errno
from pathlib import Path

import polars as pl
import pytest

from chainwatch.exceptions import ConfigError
from chainwatch.schema import Block, PeerSnapshot, Reorg, encode
from chainwatch.settings import load_settings
from replay.app import ReplayOptions, run_replay
from replay.exceptions import ReplayError
from replay.positions import parse_range
from replay.rows import Defaults, InvalidRows
from replay.sources import STOP_MARGIN_SECONDS, JsonlSource, TableSource, find_tables
from tests.fakes import only_blocks

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"  # a copy of ../shared/fixtures
FIXTURE = FIXTURES / "ethereum-etl-mainnet-17173049"

H = "0x" + "ab" * 32


def _hash(n: int) -> str:
    return f"0x{n:064x}"


def test_ethereum_etl_export_becomes_blocks_with_their_transactions() -> None:
    invalid = InvalidRows()
    source = TableSource(find_tables(FIXTURE), invalid, Defaults(chain_id=1, node="etl"))
    blocks = only_blocks(source.records())
    assert invalid.count == 0
    assert [b.number for b in blocks] == [17173049, 17173050]
    first = blocks[0]
    assert isinstance(first, Block)
    assert first.tx_count == len(first.transactions) == 116
    assert len(blocks[1].transactions) == 182
    assert not first.transactions_truncated
    assert first.miner == "0x1f9090aae28b8a3dceadf281b0f12828e676c326"
    assert first.base_fee_per_gas == 80869370967
    assert first.observed_at == float(first.timestamp) == 1683029999.0
    assert first.event_id == Block.id_for(1, "etl", first.hash)
    assert [t.transaction_index for t in first.transactions] == list(range(116))
    swap = first.transactions[1]
    assert (swap.tx_type, swap.method_id, swap.input_size) == (2, "0x3593564c", 644)
    assert swap.value == 7_400_000_000_000_000_000
    assert source.progress() == 1.0


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


BLOCK_HEADER = "number,hash,parent_hash,timestamp,miner,gas_used,gas_limit,transaction_count\n"
TX_HEADER = (
    "hash,block_number,block_hash,transaction_index,from_address,to_address,value,gas,"
    "gas_price,nonce,input,transaction_type\n"
)


def _block_line(n: int, txs: int = 1) -> str:
    return f"{n},{_hash(n)},{_hash(n - 1)},{1700000000 + 12 * n},0x{'11' * 20},100,200,{txs}\n"


def _tx_line(n: int, i: int, *, value: str = "5", block_hash: str | None = None) -> str:
    bh = block_hash or _hash(n)
    return (f"{_hash(1000 * n + i)},{n},{bh},{i},0x{'22' * 20},0x{'33' * 20},{value},21000,"
            f"7,{i},0x,2\n")


def test_invalid_rows_are_reported_with_line_and_reason_and_skipped(tmp_path: Path) -> None:
    _write(tmp_path / "blocks.csv", BLOCK_HEADER + _block_line(1) + "2,nothex,0x1,5\n"
           + _block_line(3) + "4,0x04,0x03,1700000048,0xminer,abc,200,0\n" + _block_line(5, 2))
    _write(tmp_path / "transactions.csv", TX_HEADER + _tx_line(1, 0) + _tx_line(2, 0)
           + _tx_line(3, 0, value="-1") + _tx_line(5, 0) + _tx_line(5, 1) + _tx_line(9, 0))
    invalid = InvalidRows()
    blocks = only_blocks(TableSource(find_tables(tmp_path), invalid, Defaults()).records())
    assert [b.number for b in blocks] == [1, 3, 5]
    assert len(blocks[2].transactions) == 2
    # block 3 lost its only transaction row: it says so instead of pretending it had none
    assert blocks[1].tx_count == 1 and blocks[1].transactions == ()
    assert blocks[1].transactions_truncated
    reasons = dict(invalid.samples)
    assert reasons["blocks.csv:3"] == "4 fields, the header has 8"
    assert reasons["blocks.csv:5"].startswith("miner: not hexadecimal")
    assert reasons["transactions.csv:4"] == "value: negative value -1"
    assert reasons["transactions.csv:3"] == "no block row for this transaction's block"
    assert reasons["transactions.csv:7"] == "no block row for block 9"
    assert invalid.count == 5


def test_transactions_with_a_hash_of_another_block_are_not_attached(tmp_path: Path) -> None:
    _write(tmp_path / "blocks.csv", BLOCK_HEADER + _block_line(1, 1))
    _write(tmp_path / "transactions.csv", TX_HEADER + _tx_line(1, 0, block_hash=H))
    invalid = InvalidRows()
    (block,) = only_blocks(TableSource(find_tables(tmp_path), invalid, Defaults()).records())
    assert block.transactions == ()
    assert invalid.samples == [("transactions.csv:2", "no block row for this transaction's block")]


def test_parquet_tables_with_reorgs_and_peers_merge_in_time_order(tmp_path: Path) -> None:
    rows = [
        {"chain_id": 5, "node": "n1", "number": n, "hash": _hash(n), "parent_hash": _hash(n - 1),
         "timestamp": 1700000000 + 12 * n, "miner": "0x" + "11" * 20, "gas_used": 1,
         "gas_limit": 2, "tx_count": 0, "observed_at": 1700000000.5 + 12 * n}
        for n in range(1, 6)
    ]
    pl.DataFrame(rows).write_parquet(tmp_path / "blocks.parquet")
    pl.DataFrame([{
        "chain_id": 5, "node": "n1", "observed_at": 1700000000.5 + 36,  # tie with block 3
        "old_head_number": 3, "old_head_hash": "0x" + "ff" * 32, "new_head_number": 3,
        "new_head_hash": _hash(3), "common_ancestor_number": 1,
        "common_ancestor_hash": _hash(1), "dropped_block_hashes": "0xaa;0xbb",
    }]).write_parquet(tmp_path / "reorgs.parquet")
    _write(tmp_path / "peers.csv",
           "chain_id,node,observed_at,peer_count,inbound,outbound,clients,connected\n"
           "5,n1,1700000030,12,4,8,Geth=10;Nethermind=2,abc;def\n"
           "5,n1,1700000031,x,4,8,,\n")
    invalid = InvalidRows()
    records = list(TableSource(find_tables(tmp_path), invalid, Defaults()).records())
    kinds = [(r.type, getattr(r, "number", None)) for r in records]
    assert kinds == [("block", 1), ("block", 2), ("peer_snapshot", None), ("reorg", None),
                     ("block", 3), ("block", 4), ("block", 5)]
    reorg = records[3]
    assert isinstance(reorg, Reorg)
    assert reorg.depth == 2 and reorg.dropped_block_hashes == ("0xaa", "0xbb")
    assert reorg.chain_id == 5 and reorg.ancestor_found
    peers = records[2]
    assert isinstance(peers, PeerSnapshot)
    assert peers.clients == {"Geth": 10, "Nethermind": 2} and peers.detailed
    assert peers.connected == ("abc", "def")
    assert invalid.samples == [("peers.csv:3", "peer_count: expected an integer, got 'x'")]


def test_jsonl_invalid_lines_are_reported_with_their_number(tmp_path: Path) -> None:
    block = Block(chain_id=1, node="n", event_id="e1", observed_at=1.0, number=1, hash=H,
                  parent_hash=H, timestamp=1, miner="0x1", gas_used=1, gas_limit=2, tx_count=0)
    path = tmp_path / "records.jsonl"
    path.write_bytes(encode(block) + b"\n\n{\"type\": \"block\"}\n" + b"\xff\xfe\n"
                     + encode(block.model_copy(update={"event_id": "e2"})) + b"\n")
    invalid = InvalidRows()
    source = JsonlSource(path, invalid)
    records = list(source.records())
    assert [r.event_id for r in records] == ["e1", "e2"]
    assert [where for where, _ in invalid.samples] == ["records.jsonl:3", "records.jsonl:4"]
    assert invalid.samples[0][1].startswith("invalid record at block.")
    assert source.progress() == 1.0


def test_time_bounds_filter_an_export_on_block_timestamps(tmp_path: Path) -> None:
    """`replay export/ --from @T --to ISO`: blocks by header time (block n is at
    1700000000 + 12 n); the export is read only a margin past --to, and the transactions
    left unread there are not reported as orphans."""
    export = tmp_path / "export"
    export.mkdir()
    _write(export / "blocks.csv", BLOCK_HEADER + "".join(_block_line(n) for n in range(1, 1200)))
    _write(export / "transactions.csv", TX_HEADER + "".join(_tx_line(n, 0) for n in range(1, 1200)))
    start, stop = parse_range("@1700000060", "2023-11-14T22:15:08Z")
    stats = run_replay(load_settings(warmup_blocks=50), str(export),
                       ReplayOptions(start=start, stop=stop, progress=False),
                       echo=lambda _: None)
    assert (stats.first_block, stats.last_block, stats.blocks, stats.transactions) == (
        5, 9, 5, 5)

    invalid = InvalidRows()
    source = TableSource(find_tables(export), invalid, Defaults(), to_time=1700000108)
    read = [r.number for r in source.records() if isinstance(r, Block)]
    assert read[-1] == 9 + STOP_MARGIN_SECONDS // 12 and invalid.count == 0


def test_a_report_that_cannot_be_written_is_one_error_naming_the_file(
    tmp_path: Path, monkeypatch
) -> None:
    """A full disk while the report is written: a ConfigError (one line in the CLI) that
    names the file, not a traceback after the whole replay."""
    export = tmp_path / "export"
    export.mkdir()
    _write(export / "blocks.csv", BLOCK_HEADER + "".join(_block_line(n) for n in range(1, 30)))
    _write(export / "transactions.csv", TX_HEADER + "".join(_tx_line(n, 0) for n in range(1, 30)))

    def disk_full(out: Path, **_: object) -> None:
        raise OSError(errno.ENOSPC, "No space left on device", str(out / "report.html"))

    monkeypatch.setattr("replay.report.write_report", disk_full)
    with pytest.raises(ConfigError) as raised:
        run_replay(load_settings(warmup_blocks=50), str(export),
                   ReplayOptions(out=tmp_path / "report", progress=False), echo=lambda _: None)
    assert str(raised.value) == (
        f"cannot write {tmp_path / 'report' / 'report.html'}: No space left on device")


def test_an_export_that_is_not_text_or_not_parquet_is_one_error_naming_it(
    tmp_path: Path,
) -> None:
    """Latin-1 bytes on line 3 of blocks.csv; a blocks.parquet cut short."""
    latin = tmp_path / "latin"
    latin.mkdir()
    (latin / "blocks.csv").write_bytes(
        (BLOCK_HEADER + _block_line(1)).encode() + _block_line(2).replace(",", ",\xe9", 1)
        .encode("latin-1"))
    with pytest.raises(ReplayError, match=r"blocks\.csv: line 3 is not UTF-8 text$"):
        run_replay(load_settings(), str(latin), ReplayOptions(progress=False),
                   echo=lambda _: None)
    cut = tmp_path / "cut"
    cut.mkdir()
    pl.DataFrame({"number": list(range(50))}).write_parquet(cut / "blocks.parquet")
    (cut / "blocks.parquet").write_bytes((cut / "blocks.parquet").read_bytes()[:100])
    with pytest.raises(ReplayError, match=r"cannot read .*blocks\.parquet: "):
        run_replay(load_settings(), str(cut), ReplayOptions(progress=False),
                   echo=lambda _: None)
