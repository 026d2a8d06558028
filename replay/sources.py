"""Replay sources on disk: JSONL of chainwatch records, and tables (replay format or an
ethereum-etl export) as CSV or Parquet. I/O adapters around the pure row mappers.

Every source streams: CSV through the csv module, Parquet in polars batches, so memory
stays bounded by a chunk, not by the file. Invalid rows go to an `InvalidRows` with
their file, line and reason, and are skipped.
"""

from __future__ import annotations

import csv
import heapq
import sys
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import polars as pl

from chainwatch.exceptions import InvalidRecord
from chainwatch.schema import AnyRecord, TxSummary, decode
from detector.tx_features import TxColumns
from replay.exceptions import UNREADABLE, ReplayError, RowError, one_line
from replay.rows import (
    Defaults,
    InvalidRows,
    get_hex,
    get_int,
    map_block,
    map_peers,
    map_reorg,
    map_tx,
)

TABLES = ("blocks", "transactions", "reorgs", "peers")
PARQUET_CHUNK_ROWS = 20_000
# reading stops this far past --to (other nodes' copies of a block may come a bit later)
STOP_MARGIN_BLOCKS = 1000
STOP_MARGIN_SECONDS = 3 * 3600  # about as far as 1,000 blocks on a 12 s chain
TX_GROUP_CACHE = 128  # recent blocks' transactions kept for other nodes' copies of a block

csv.field_size_limit(sys.maxsize)  # calldata of contract creations is long


Screen = Callable[[str, int | None, Callable[[], float | None]], bool]


class Source:
    """A stream of records in replay order, with a progress fraction for the bar.

    A source that can read a record's type and height before decoding it may ask
    `screen` (set by the replay, `Replayer.screen`) and skip decoding what it rejects.
    `block_window` (first, last), when set, says more: `screen` rejects every block row
    whose height is outside it from the height alone, so its payload need not be read.
    With `columnar` set (by the replay), a source that holds transactions in columns may
    send blocks without their `transactions` and give them per batch from `tx_columns`.
    """

    description: str = ""
    screen: Screen | None = None
    block_window: tuple[int | None, int | None] | None = None
    columnar: bool = False

    def records(self) -> Iterator[AnyRecord]:
        raise NotImplementedError

    def tx_columns(self, batch: list[AnyRecord]) -> TxColumns | None:
        """The transactions of the batch's blocks sent without them (see `columnar`)."""
        return None

    def discard(self, record: AnyRecord) -> None:
        """The replay left `record` out (--from/--to): forget what it holds for it."""

    def progress(self) -> float | None:
        """Fraction done in [0, 1], or None when unknown."""
        return None


def _count_lines(path: Path) -> int:
    count = 0
    with path.open("rb") as handle:
        while chunk := handle.read(1 << 20):
            count += chunk.count(b"\n")
    return count


def read_rows(path: Path) -> Iterator[tuple[str, dict[str, Any]]]:
    """(where, row) for each data row of a CSV or Parquet table; where = `file:line`."""
    if path.suffix == ".csv":
        try:
            handle = path.open(newline="", encoding="utf-8")
        except OSError as exc:
            raise ReplayError(f"cannot read {path}: {exc.strerror}") from None
        with handle:
            reader = csv.reader(handle)
            try:
                header = next(reader, None)
                if header is None:
                    return
                width = len(header)
                line = reader.line_num
                for values in reader:
                    where = f"{path.name}:{line + 1}"
                    line = reader.line_num
                    if not values:
                        continue
                    if len(values) != width:
                        yield where, {"__error__": f"{len(values)} fields, the header has {width}"}
                        continue
                    yield where, dict(zip(header, values, strict=True))
            except UnicodeDecodeError:  # a binary file, or text in another encoding
                raise ReplayError(
                    f"cannot read {path}: line {_first_non_utf8_line(path)} is not UTF-8 text"
                ) from None
        return
    try:
        batches = pl.scan_parquet(path).collect_batches(chunk_size=PARQUET_CHUNK_ROWS)
        index = 0
        for chunk in batches:
            for row in chunk.iter_rows(named=True):
                index += 1
                yield f"{path.name} row {index}", row
    except UNREADABLE as exc:
        raise _cannot_read(path, exc) from None


def _cannot_read(path: Path, exc: BaseException) -> ReplayError:
    return ReplayError(f"cannot read {path}: {one_line(exc)}")


def _first_non_utf8_line(path: Path) -> int:
    """The number of the first line that is not UTF-8 (the text reader decodes ahead, in
    chunks, so its position does not say)."""
    with path.open("rb") as handle:
        for number, raw in enumerate(handle, start=1):
            try:
                raw.decode("utf-8")
            except UnicodeDecodeError:
                return number
    return 0


def table_rows(path: Path) -> int:
    """Data rows in a table, for the progress bar (fast: metadata or a newline count)."""
    if path.suffix == ".csv":
        return max(_count_lines(path) - 1, 0)
    try:
        return int(pl.scan_parquet(path).select(pl.len()).collect().item())
    except UNREADABLE as exc:  # cut short, or not Parquet
        raise _cannot_read(path, exc) from None


def find_tables(source: Path) -> dict[str, Path]:
    """blocks/transactions/reorgs/peers tables of a directory (or beside a blocks file)."""
    directory = source if source.is_dir() else source.parent
    found: dict[str, Path] = {}
    for name in TABLES:
        for suffix in (".parquet", ".csv"):
            candidate = directory / f"{name}{suffix}"
            if candidate.is_file():
                found[name] = candidate
                break
    return found


class JsonlSource(Source):
    """One chainwatch record per line, as the topics carry them (and `chainwatch train` reads)."""

    def __init__(self, path: Path, invalid: InvalidRows) -> None:
        self.path = path
        self.invalid = invalid
        self.description = f"JSONL {path.name}"
        try:
            self.size = path.stat().st_size
        except OSError as exc:
            raise ReplayError(f"cannot read {path}: {exc.strerror}") from None
        self.read = 0

    def records(self) -> Iterator[AnyRecord]:
        with self.path.open("rb") as handle:
            for number, line in enumerate(handle, start=1):
                self.read += len(line)
                if not line.strip():
                    continue
                try:
                    yield decode(line)
                except InvalidRecord as exc:
                    self.invalid.add(f"{self.path.name}:{number}", str(exc))

    def progress(self) -> float | None:
        return self.read / self.size if self.size else None


@dataclass
class _TxGroup:
    txs: list[TxSummary] = field(default_factory=list)
    wheres: list[str] = field(default_factory=list)
    claimed: bool = False


class TableSource(Source):
    """The replay table format: blocks (+ transactions), reorgs, peers; CSV or Parquet.

    An ethereum-etl export (`blocks.csv`, `transactions.csv`) is this format with its own
    column names. Transactions join their block by `block_hash` (or `block_number` when
    the table has no hash) and must come in block order, as ethereum-etl writes them.
    Blocks, reorgs and peers are merged by `observed_at` (reorgs first on ties).
    """

    def __init__(
        self,
        tables: dict[str, Path],
        invalid: InvalidRows,
        defaults: Defaults,
        *,
        to_block: int | None = None,
        to_time: float | None = None,
    ) -> None:
        if "blocks" not in tables:
            raise ReplayError("no blocks table (blocks.csv or blocks.parquet) in the source")
        self.tables = tables
        self.invalid = invalid
        self.defaults = defaults
        self.to_block = to_block
        self.to_time = to_time
        kinds = ", ".join(p.name for p in tables.values())
        self.description = f"tables {kinds}"
        self.total_blocks = table_rows(tables["blocks"])
        self.blocks_read = 0

    def progress(self) -> float | None:
        return self.blocks_read / self.total_blocks if self.total_blocks else None

    def records(self) -> Iterator[AnyRecord]:
        streams: list[Iterable[tuple[tuple[float, int], AnyRecord]]] = [
            self._keyed(self._blocks(), 1)
        ]
        if "reorgs" in self.tables:
            streams.append(self._keyed(self._simple("reorgs"), 0))
        if "peers" in self.tables:
            streams.append(self._keyed(self._simple("peers"), 2))
        for _, record in heapq.merge(*streams, key=lambda item: item[0]):
            yield record

    @staticmethod
    def _keyed(
        records: Iterator[AnyRecord], rank: int
    ) -> Iterator[tuple[tuple[float, int], AnyRecord]]:
        for record in records:
            yield (record.observed_at, rank), record

    def _simple(self, table: str) -> Iterator[AnyRecord]:
        mapper = map_reorg if table == "reorgs" else map_peers
        for where, row in read_rows(self.tables[table]):
            try:
                if "__error__" in row:
                    raise RowError(row["__error__"])
                yield mapper(row, self.defaults)
            except RowError as exc:
                self.invalid.add(where, str(exc))

    def _tx_rows(self) -> Iterator[tuple[int, str, str, TxSummary]]:
        """(block_number, join key, where, tx) of valid transaction rows, in file order."""
        path = self.tables.get("transactions")
        if path is None:
            return
        for where, row in read_rows(path):
            try:
                if "__error__" in row:
                    raise RowError(row["__error__"])
                number = get_int(row, "block_number")
                block_hash = get_hex(row, "block_hash", required=False)
                tx = map_tx(row)
            except RowError as exc:
                self.invalid.add(where, str(exc))
                continue
            assert number is not None
            yield number, block_hash or str(number), where, tx

    def _blocks(self) -> Iterator[AnyRecord]:
        txs = self._tx_rows()
        pending: tuple[int, str, str, TxSummary] | None = next(txs, None)
        past_time = False
        groups: OrderedDict[str, _TxGroup] = OrderedDict()
        for where, row in read_rows(self.tables["blocks"]):
            self.blocks_read += 1
            try:
                if "__error__" in row:
                    raise RowError(row["__error__"])
                number = get_int(row, "number", "block_number")
                block_hash = get_hex(row, "hash")
            except RowError as exc:
                self.invalid.add(where, str(exc))
                continue
            assert number is not None and block_hash is not None
            if self.to_block is not None and number > self.to_block + STOP_MARGIN_BLOCKS:
                break  # blocks come in (near) height order: nothing after this is in range
            if self._past_time(row):
                past_time = True
                break
            # take every transaction row up to this height into its block's group
            while pending is not None and pending[0] <= number:
                _, key, tx_where, tx = pending
                group = groups.get(key)
                if group is None:
                    group = groups[key] = _TxGroup()
                    self._evict(groups)
                group.txs.append(tx)
                group.wheres.append(tx_where)
                pending = next(txs, None)
            group = groups.get(block_hash) or groups.get(str(number))
            if group is not None:
                group.claimed = True
            try:
                yield map_block(row, group.txs if group else [], self.defaults)
            except RowError as exc:
                self.invalid.add(where, str(exc))
        # what is left has no block row
        for group in groups.values():
            self._report_orphans(group)
        while pending is not None and not past_time:  # past --to (time): not read, not judged
            if self.to_block is None or pending[0] <= self.to_block:
                self.invalid.add(pending[2], f"no block row for block {pending[0]}")
            pending = next(txs, None)

    def _past_time(self, row: dict[str, Any]) -> bool:
        """Far enough past a --to time to stop (a bad timestamp is map_block's to report)."""
        if self.to_time is None:
            return False
        try:
            timestamp = get_int(row, "timestamp")
        except RowError:
            return False
        return timestamp is not None and timestamp > self.to_time + STOP_MARGIN_SECONDS

    def _evict(self, groups: OrderedDict[str, _TxGroup]) -> None:
        while len(groups) > TX_GROUP_CACHE:
            _, group = groups.popitem(last=False)
            self._report_orphans(group)

    def _report_orphans(self, group: _TxGroup) -> None:
        if group.claimed:
            return
        for where in group.wheres:
            self.invalid.add(where, "no block row for this transaction's block")
