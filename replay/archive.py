"""The archive: chainwatch topics as Parquet, partitioned by chain and day, resumable.

Layout: `DIR/chain_id=<id>/day=<YYYY-MM-DD>/<topic>-<partition>-<first>-<last>.parquet`,
one row per Kafka message: where it was (topic, partition, offset), the record's common
fields as columns (type, chain_id, node, event_id, observed_at, block_number) and the
record itself (`payload`, JSON). A block's transactions are stored in columns instead
(`transactions`, a list of structs, wei amounts as decimal strings so they stay exact) and
its payload is the rest of the record: replay reads them straight into the detectors'
frames without building an object per transaction. A file whose transactions' addresses
and selectors are all lower-case already (the collectors write them so) says so in its
metadata (`LOWERCASE_KEY`), and replay does not lower-case them again (~12 ms per 75k
txs); other files are lower-cased as they are read. A block whose transactions the columns
cannot hold exactly (an integer beyond Int64 other than a value) keeps them in its
payload, as do archives written before. Messages that are not valid records are kept
under `chain_id=unknown` with their `error`, never silently dropped.

Resuming without duplicates: the archive, not the consumer group, owns the offsets.
A flush writes its files as `.tmp`, then atomically replaces `_checkpoint.json` (next
offsets + the flush's file list), then renames the files. On start, files named in the
checkpoint are rolled forward and any other `.tmp` is deleted (its offsets were never
checkpointed, so they are consumed again). Whatever the moment of a kill, each offset
ends up in exactly one file.
"""

from __future__ import annotations

import heapq
import json
import logging
import math
import os
import re
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from itertools import repeat
from pathlib import Path
from typing import Any, NamedTuple

import polars as pl

from chainwatch.exceptions import InvalidRecord, first_line
from chainwatch.schema import AnyRecord, Block, TxSummary, decode, encode
from detector.tx_features import TxColumns, tx_frame_of
from replay.driver import block_number_of
from replay.exceptions import UNREADABLE, ReplayError, one_line
from replay.positions import Position
from replay.readahead import read_ahead
from replay.rows import InvalidRows
from replay.sources import Source

log = logging.getLogger("chainwatch.archive")

CHECKPOINT = "_checkpoint.json"
# A block's transactions in the archive: TxSummary's fields, the value as a decimal string.
TX_COLUMNS: dict[str, Any] = {
    "hash": pl.String,
    "transaction_index": pl.Int64,
    "from_address": pl.String,
    "to_address": pl.String,
    "value": pl.String,
    "gas": pl.Int64,
    "gas_price": pl.Int64,
    "max_fee_per_gas": pl.Int64,
    "max_priority_fee_per_gas": pl.Int64,
    "nonce": pl.Int64,
    "tx_type": pl.Int64,
    "input_size": pl.Int64,
    "method_id": pl.String,
    "is_contract_creation": pl.Boolean,
}
_INT64_MAX = 2**63 - 1
ARCHIVE_SCHEMA: dict[str, Any] = {
    "topic": pl.String,
    "partition": pl.Int32,
    "offset": pl.Int64,
    "key": pl.String,
    "type": pl.String,
    "chain_id": pl.Int64,
    "node": pl.String,
    "event_id": pl.String,
    "observed_at": pl.Float64,
    "block_number": pl.Int64,
    "payload": pl.String,
    "error": pl.String,
    "transactions": pl.List(pl.Struct(TX_COLUMNS)),
}
FILE_RE = re.compile(
    r"^(?P<topic>.+)-(?P<partition>\d+)-(?P<first>\d{20})-(?P<last>\d{20})\.parquet$"
)
READ_CHUNK_ROWS = 512
# Parquet metadata of files whose `transactions` hold lower-cased addresses and selectors
LOWERCASE_KEY = "chainwatch.tx_text"
LOWERCASE = "lowercase"
_LOWERCASED = ("from_address", "to_address", "method_id")


def day_of(seconds: float) -> str:
    return datetime.fromtimestamp(seconds, UTC).strftime("%Y-%m-%d")


def archive_row(
    topic: str, partition: int, offset: int, key: str | None, value: bytes, kafka_ts_ms: int
) -> dict[str, Any]:
    """One Kafka message as an archive row (pure): decoded for the columns, kept whole."""
    row: dict[str, Any] = {"topic": topic, "partition": partition, "offset": offset, "key": key}
    try:
        record = decode(value)
    except InvalidRecord as exc:
        return {**row, "type": "invalid", "chain_id": None, "node": None, "event_id": None,
                "observed_at": max(kafka_ts_ms, 0) / 1000, "block_number": None,
                "payload": value.decode("utf-8", "replace"), "error": str(exc),
                "transactions": None}
    payload, txs = value.decode(), None
    if isinstance(record, Block) and record.transactions:
        txs = transaction_rows(record.transactions)
        if txs is not None:
            payload = encode(record.model_copy(update={"transactions": ()})).decode()
    return {**row, "type": record.type, "chain_id": record.chain_id, "node": record.node,
            "event_id": record.event_id, "observed_at": record.observed_at,
            "block_number": block_number_of(record), "payload": payload, "error": None,
            "transactions": txs}


def transaction_rows(txs: tuple[TxSummary, ...]) -> list[dict[str, Any]] | None:
    """A block's transactions as rows of the `transactions` column; None when one of
    them has an integer the Int64 columns cannot hold (it then stays in the payload)."""
    rows = []
    for tx in txs:
        row = tx.model_dump()
        row["value"] = str(tx.value)
        if any(v > _INT64_MAX for k, v in row.items() if type(v) is int):
            return None
        rows.append(row)
    return rows


def with_transactions(header: Block, txs: pl.DataFrame) -> Block:
    """A block read from columns, whole again: its header and its transactions' rows."""
    summaries = tuple(
        TxSummary.model_validate({**row, "value": int(row["value"])}) for row in txs.to_dicts()
    )
    return header.model_copy(update={"transactions": summaries})


def partition_dir(row: dict[str, Any]) -> str:
    chain = "unknown" if row["chain_id"] is None else str(row["chain_id"])
    return f"chain_id={chain}/day={day_of(row['observed_at'])}"


def _fsync_write(path: Path, data: bytes) -> None:
    with path.open("wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())


@dataclass
class Checkpoint:
    next_offsets: dict[str, int] = field(default_factory=dict)  # "topic:partition" -> offset
    pending: list[str] = field(default_factory=list)  # files of the last flush, relative

    @staticmethod
    def load(root: Path) -> Checkpoint:
        path = root / CHECKPOINT
        if not path.exists():
            return Checkpoint()
        try:
            data = json.loads(path.read_text())
            return Checkpoint(dict(data["next_offsets"]), list(data.get("pending", [])))
        except (ValueError, KeyError, TypeError) as exc:
            raise ReplayError(f"unreadable archive checkpoint {path}: {exc}") from None

    def save(self, root: Path) -> None:
        tmp = root / (CHECKPOINT + ".tmp")
        body = {"version": 1, "next_offsets": self.next_offsets, "pending": self.pending}
        _fsync_write(tmp, json.dumps(body, sort_keys=True).encode())
        os.replace(tmp, root / CHECKPOINT)


class ArchiveWriter:
    """Buffers archive rows and flushes them crash-safely (see the module docstring)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        root.mkdir(parents=True, exist_ok=True)
        self.checkpoint = Checkpoint.load(root)
        self._recover()
        self.rows: list[dict[str, Any]] = []
        self.bytes = 0
        self.next_offsets = dict(self.checkpoint.next_offsets)
        self.written = 0

    def _recover(self) -> None:
        for rel in self.checkpoint.pending:  # roll the last checkpointed flush forward
            final = self.root / rel
            tmp = final.with_name(final.name + ".tmp")
            if tmp.exists():
                os.replace(tmp, final)
        for tmp in self.root.glob("chain_id=*/day=*/*.parquet.tmp"):
            log.info("discarding an unfinished flush", extra={"file": str(tmp)})
            tmp.unlink()  # never checkpointed: its offsets are consumed again

    def add(self, row: dict[str, Any]) -> None:
        self.rows.append(row)
        self.bytes += len(row["payload"]) + 200 * len(row.get("transactions") or ())
        self.next_offsets[f"{row['topic']}:{row['partition']}"] = row["offset"] + 1

    def flush(self) -> int:
        if not self.rows:
            return 0
        groups: dict[tuple[str, str, int], list[dict[str, Any]]] = defaultdict(list)
        for row in self.rows:
            groups[(partition_dir(row), row["topic"], row["partition"])].append(row)
        written: list[str] = []
        try:
            for (directory, topic, partition), rows in sorted(groups.items()):
                first, last = rows[0]["offset"], rows[-1]["offset"]
                rel = f"{directory}/{topic}-{partition}-{first:020d}-{last:020d}.parquet"
                final = self.root / rel
                final.parent.mkdir(parents=True, exist_ok=True)
                tmp = final.with_name(final.name + ".tmp")
                frame = pl.DataFrame(rows, schema=ARCHIVE_SCHEMA)
                frame.write_parquet(
                    tmp, compression="zstd", row_group_size=READ_CHUNK_ROWS,
                    metadata={LOWERCASE_KEY: LOWERCASE} if _tx_text_lowercase(frame) else None,
                )
                with tmp.open("rb") as handle:
                    os.fsync(handle.fileno())
                written.append(rel)
        except (pl.exceptions.PolarsError, OSError) as exc:  # a full disk, say
            # nothing checkpointed: a restart rolls the .tmp files back and re-reads these
            raise ReplayError(
                f"cannot write the archive under {self.root}: {one_line(exc)}") from None
        self.checkpoint = Checkpoint(dict(self.next_offsets), written)
        self.checkpoint.save(self.root)
        for rel in written:
            final = self.root / rel
            os.replace(final.with_name(final.name + ".tmp"), final)
        count = len(self.rows)
        self.written += count
        self.rows, self.bytes = [], 0
        return count


def _tx_text_lowercase(frame: pl.DataFrame) -> bool:
    """Whether the addresses and selectors in a file's `transactions` are all lower-case."""
    flat = frame.select(pl.col("transactions").explode()).unnest("transactions")
    return bool(flat.select(
        pl.all_horizontal((pl.col(c) == pl.col(c).str.to_lowercase()).fill_null(True).all()
                          for c in _LOWERCASED)).item())


@dataclass(frozen=True)
class ArchiveConfig:
    flush_records: int = 20_000
    flush_bytes: int = 64 * 1024 * 1024
    flush_seconds: float = 5.0
    until_end: bool = False  # stop once the end offsets seen at start are archived
    refresh_seconds: float = 30.0
    # replay --from/--to given as a time or offset:N (block numbers are the driver's)
    start: Position | None = None
    stop: Position | None = None


def kafka_bounds(
    consumer: Any, parts: list[Any], start: Position | None, stop: Position | None
) -> tuple[dict[Any, int], dict[Any, int]]:
    """First offset to read and end offset (exclusive) of each partition for --from/--to.

    Times are looked up with `offsets_for_times` on the messages' own timestamps (when the
    collector published them), offset:N applies to every partition; both are clamped to
    what the partition holds. Block numbers leave the partition whole.
    """
    begin = consumer.beginning_offsets(parts)
    end = consumer.end_offsets(parts)

    def resolve(position: Position | None, upper: bool) -> dict[Any, int]:
        if position is None or position.kind == "block":
            return dict(end if upper else begin)
        if position.kind == "offset":
            wanted = dict.fromkeys(parts, position.number + (1 if upper else 0))
        else:  # the first message at or after the time (after it, for the inclusive --to)
            ms = math.floor(position.value * 1000) + 1 if upper else math.ceil(
                position.value * 1000)
            found = consumer.offsets_for_times(dict.fromkeys(parts, max(ms, 0)))
            wanted = {tp: end[tp] if found.get(tp) is None else found[tp].offset for tp in parts}
        return {tp: min(max(wanted[tp], begin[tp]), end[tp]) for tp in parts}

    return resolve(start, upper=False), resolve(stop, upper=True)


def archive_topics(
    consumer: Any,
    topics: list[str],
    writer: ArchiveWriter,
    config: ArchiveConfig,
    stop: threading.Event,
    *,
    on_flush: Callable[[int, int], None] | None = None,
) -> int:
    """Consume `topics` from the archive's offsets into Parquet until stopped (or the end).

    `consumer` is a kafka-python KafkaConsumer without a group: partitions are assigned
    here and positioned from the checkpoint, so the group never decides what is archived.
    """
    from kafka import TopicPartition
    from kafka.errors import KafkaError

    starts: dict[Any, int] = {}

    def partitions() -> list[Any]:
        return [TopicPartition(topic, p) for topic in topics
                for p in sorted(consumer.partitions_for_topic(topic) or ())]

    def assign(parts: list[Any]) -> list[Any]:
        current = set(consumer.assignment())
        if set(parts) != current:
            consumer.assign(parts)
            for tp in parts:
                nxt = writer.next_offsets.get(f"{tp.topic}:{tp.partition}")
                if nxt is not None:
                    consumer.seek(tp, nxt)
                elif tp in starts:
                    consumer.seek(tp, starts[tp])
                else:
                    consumer.seek_to_beginning(tp)
        return parts

    bounded = config.start is not None or config.stop is not None
    try:
        parts = partitions()
        if bounded:
            starts, ends = kafka_bounds(consumer, parts, config.start, config.stop)
        assign(parts)
        if not bounded:
            ends = consumer.end_offsets(parts) if config.until_end else {}
    except KafkaError as exc:
        raise ReplayError(f"Kafka failed: {type(exc).__name__}: {exc}") from None
    except ValueError as exc:  # offsets_for_times refuses what the broker cannot look up
        raise ReplayError(f"Kafka cannot position --from/--to: {exc}") from None
    last_refresh = last_flush = time.monotonic()
    while not stop.is_set():
        try:
            batches = consumer.poll(timeout_ms=500, max_records=min(config.flush_records, 5000))
        except KafkaError as exc:
            log.error("Kafka poll failed, retrying", extra={"error": str(exc)})
            stop.wait(1.0)
            continue
        for tp, messages in sorted(batches.items(), key=lambda kv: (kv[0].topic, kv[0].partition)):
            for m in messages:
                if bounded and m.offset >= ends.get(tp, m.offset + 1):
                    continue  # past --to
                key = m.key.decode("utf-8", "replace") if m.key is not None else None
                writer.add(archive_row(tp.topic, tp.partition, m.offset, key, m.value or b"",
                                       m.timestamp))
        now = time.monotonic()
        if writer.rows and (
            len(writer.rows) >= config.flush_records
            or writer.bytes >= config.flush_bytes
            or now - last_flush >= config.flush_seconds
        ):
            flushed = writer.flush()
            last_flush = now
            if on_flush is not None:
                on_flush(flushed, writer.written)
        if (config.until_end or bounded) and all(
            writer.next_offsets.get(f"{tp.topic}:{tp.partition}", 0) >= end
            or consumer.position(tp) >= end
            for tp, end in ends.items()
        ):
            break
        if not config.until_end and now - last_refresh >= config.refresh_seconds:
            last_refresh = now
            try:
                # partitions_for_topic answers from cached metadata (up to 5 min old):
                # fetch it anew, or a partition added meanwhile waits that long
                consumer.topics()
                parts = assign(partitions())
            except KafkaError as exc:
                log.error("Kafka metadata refresh failed, retrying",
                          extra={"error": str(exc)})
    flushed = writer.flush()
    if on_flush is not None and flushed:
        on_flush(flushed, writer.written)
    return writer.written


TOPIC_RANK = {"blocks": 0, "mempool": 1, "peers": 2, "findings": 3}


@dataclass(frozen=True)
class ArchiveFile:
    path: Path
    chain: str
    topic: str
    partition: int
    first: int


def _file_where(f: ArchiveFile) -> str:
    return f"{f.path.parent.parent.name}/{f.path.parent.name}/{f.path.name}"


def list_archive(root: Path) -> list[ArchiveFile]:
    files: list[ArchiveFile] = []
    for path in root.glob("chain_id=*/day=*/*.parquet"):
        match = FILE_RE.match(path.name)
        if match is None:
            continue
        chain = path.parent.parent.name.removeprefix("chain_id=")
        files.append(ArchiveFile(path, chain, match["topic"], int(match["partition"]),
                                 int(match["first"])))
    return files


def is_archive(path: Path) -> bool:
    return path.is_dir() and ((path / CHECKPOINT).exists() or any(path.glob("chain_id=*")))


def _no_time() -> float | None:
    return None


_HEADER_TIME = re.compile(r'"timestamp"\s*:\s*(\d+)')


class _TxRange(NamedTuple):  # (named tuples: one per row, ~3x quicker made)
    """A block's transactions: `length` rows of a chunk's exploded column from `start`.

    Kept as a reference until needed: the blocks of a replay batch are mostly adjacent
    rows of one chunk, and one slice of the run is cheaper than a slice per block plus a
    concatenation of hundreds of them (a third of the reading on thin blocks).
    """

    flat: pl.DataFrame
    start: int
    length: int
    lowercase: bool = False  # the file says its addresses and selectors are lower-case

    def frame(self) -> pl.DataFrame:
        return self.flat.slice(self.start, self.length)


def _tx_runs(ranges: list[_TxRange]) -> list[pl.DataFrame]:
    """The ranges' rows in order, adjacent ranges of one chunk as one slice."""
    runs: list[pl.DataFrame] = []
    flat: pl.DataFrame | None = None
    start = end = 0
    for r in ranges:
        if r.flat is flat and r.start == end:
            end += r.length
            continue
        if flat is not None:
            runs.append(flat.slice(start, end - start))
        flat, start, end = r.flat, r.start, r.start + r.length
    if flat is not None:
        runs.append(flat.slice(start, end - start))
    return runs


def _frame_of(parts: Sequence[tuple[Block, _TxRange]]) -> pl.DataFrame:
    """The tx frame (`detector.tx_features.tx_frame_of`) of blocks and their txs' rows."""
    # one chunk per column: a frame of 500 blocks' slices kept them as 500 chunks,
    # which made every later step over it a third slower
    txs = pl.concat(_tx_runs([t for _, t in parts]), rechunk=True).rename(
        {"transaction_index": "tx_index"})
    return tx_frame_of([h for h, _ in parts], [t.length for _, t in parts], txs,
                       lowercase=all(t.lowercase for _, t in parts))


class _Row(NamedTuple):
    """An archive row before decoding: what --from/--to can be decided on."""

    kind: str
    payload: str | None  # None: not read (a block outside the source's block_window)
    number: int | None
    file: ArchiveFile
    offset: int
    txs: _TxRange | None = None  # a block's transactions, when stored in columns

    def where(self) -> str:
        return f"{_file_where(self.file)} offset {self.offset}"

    def header_time(self) -> float | None:
        """A block's header timestamp without decoding it: its first "timestamp" field
        (chainwatch's encoding puts the block's own before the transactions, which have
        none); None if absent, and the block is then decoded to be sure.
        """
        if self.payload is None:
            return None
        match = _HEADER_TIME.search(self.payload)
        return float(match[1]) if match else None


@dataclass(frozen=True)
class _Outside:
    """A whole file of block rows all above the block window, or all below it: every row
    is rejected on its height, and only the first can change the range's state (the
    first block above --to ends it), so the file is screened at its first row's place
    in the merge, without a row object or a merge step per row."""

    numbers: list[int]


@dataclass(frozen=True)
class _Invalid:
    """A row the archive itself stored as invalid, or the unreadable rest of a file:
    where, and why."""

    where: str
    reason: str
    whole_rest: bool = False  # the rest of a file, rows unknown


class ArchiveSource(Source):
    """Replays an archive: each (chain, topic, partition) in offset order, merged by time.

    Merging keeps every partition's own order (a node's reorg stays before the blocks of
    its new branch) and breaks ties by chain, topic and partition, so the order is the
    same on every run. Findings stored in the archive are outputs, not inputs: skipped.
    """

    def __init__(self, root: Path, invalid: InvalidRows, *, include_findings: bool = False) -> None:
        self.root = root
        self.invalid = invalid
        self.include_findings = include_findings
        files = list_archive(root)
        if not files:
            raise ReplayError(f"no archive files under {root}")
        self.total = 0
        streams: dict[tuple[str, str, int], list[ArchiveFile]] = defaultdict(list)
        for f in files:
            try:  # reads the footer: a truncated or foreign file fails here
                self.total += int(pl.scan_parquet(f.path).select(pl.len()).collect().item())
            except UNREADABLE as exc:
                invalid.add_file(_file_where(f),
                                 f"unreadable Parquet file, skipped: {first_line(exc)}")
                continue
            streams[(f.chain, f.topic, f.partition)].append(f)
        if not streams:
            raise ReplayError(f"no readable archive files under {root}")
        for stream in streams.values():
            stream.sort(key=lambda f: f.first)

        def rank(key: tuple[str, str, int]) -> tuple[str, int, str, int]:
            suffix = key[1].rsplit(".", 1)[-1]
            return (key[0], TOPIC_RANK.get(suffix, 9), key[1], key[2])

        self.streams = [streams[k] for k in sorted(streams, key=rank)]
        self.read = 0
        self.payloads_skipped = 0
        self.columnar = False  # blocks as headers + tx_frame (replay), or whole
        self._columns: dict[str, tuple[Block, _TxRange]] = {}  # event id -> its txs
        self.description = f"archive {root} ({len(files)} files)"

    def progress(self) -> float | None:
        return self.read / self.total if self.total else None

    def _stream(
        self, files: list[ArchiveFile]
    ) -> Iterator[tuple[float, _Row | _Outside | _Invalid]]:
        """The rows of one stream in offset order, not decoded yet.

        With a `block_window`, the payloads of block rows outside it are not read (a
        block's payload is ~64 KB at mainnet size; reading them cost more than the replay
        of a short range): such rows come with payload None, for `screen` to reject.
        """
        last_time = -math.inf
        for f in files:
            rows = 0
            try:
                for item in self._file_rows(f, last_time):
                    if isinstance(item[1], _Row):
                        last_time = item[0]
                        rows += 1
                    yield item
            except UNREADABLE as exc:  # a damaged page or column
                yield last_time, _Invalid(
                    _file_where(f), "unreadable Parquet file, the rest skipped: "
                    f"{first_line(exc)} (after {rows} rows)", whole_rest=True)

    def _file_rows(
        self, f: ArchiveFile, last_time: float
    ) -> Iterator[tuple[float, _Row | _Outside | _Invalid]]:
        """One file's rows for `_stream` (`last_time`: the stream's last row time)."""
        wanted = self._payload_wanted()
        scan = pl.scan_parquet(f.path)
        columnar = "transactions" in scan.collect_schema()
        lowercase = columnar and (
            pl.read_parquet_metadata(f.path).get(LOWERCASE_KEY) == LOWERCASE)
        if wanted is None:
            rows = self._rows(scan, columnar, lowercase)
        else:
            small = scan.select("type", "offset", "error", "observed_at", "block_number",
                                wanted.alias("wanted")).collect()
            outside = self._outside(small)
            if outside is not None:
                first_time, numbers = outside
                self.read += len(numbers)
                self.payloads_skipped += len(numbers)
                yield first_time, _Outside(numbers)
                return
            rows = self._rows_in_window(scan, small, wanted, columnar, lowercase)
        for kind, offset, payload, error, observed_at, number, txs in rows:
            self.read += 1
            if kind == "finding" and not self.include_findings:
                continue
            row = _Row(kind, payload, number, f, offset, txs)
            if kind == "invalid":  # recorded by records(), in order, on its thread
                yield last_time, _Invalid(row.where(), error or "invalid record")
                continue
            last_time = observed_at
            yield observed_at, row

    def _outside(self, small: pl.DataFrame) -> tuple[float, list[int]] | None:
        """(first row's time, heights) of a file (`small`: its rows' small columns) whose
        rows are all blocks above the block window or all below it; None for any other."""
        if self.block_window is None:
            return None
        first, last = self.block_window
        numbers = small["block_number"]
        if (small.height == 0 or numbers.null_count() or small["type"].n_unique() != 1
                or small["type"][0] != "block"):
            return None
        above = last is not None and numbers.min() > last  # type: ignore[operator]
        below = first is not None and numbers.max() < first  # type: ignore[operator]
        if not (above or below):
            return None
        return float(small["observed_at"][0]), numbers.to_list()

    def _payload_wanted(self) -> pl.Expr | None:
        """Which rows need their payload read: None for all."""
        if self.block_window is None:
            return None
        first, last = self.block_window
        number = pl.col("block_number")
        outside = pl.lit(False)
        if first is not None:
            outside = outside | (number < first)
        if last is not None:
            outside = outside | (number > last)
        return ~((pl.col("type") == "block") & outside).fill_null(False)

    @staticmethod
    def _transactions(chunk: pl.DataFrame, lowercase: bool) -> Iterator[_TxRange | None]:
        """Each row's transactions (rows of the chunk's exploded column); None where the
        row has none in columns."""
        column = chunk["transactions"]
        lengths = column.list.len().to_list()
        flat = chunk.select(
            pl.col("transactions").explode(empty_as_null=False, keep_nulls=False)
        ).unnest("transactions")
        start = 0
        for n in lengths:
            if n is None:
                yield None
                continue
            yield _TxRange(flat, start, n, lowercase)
            start += n

    @classmethod
    def _rows(
        cls, scan: pl.LazyFrame, columnar: bool, lowercase: bool
    ) -> Iterator[tuple[Any, ...]]:
        names = ["type", "offset", "payload", "error", "observed_at", "block_number"]
        lazy = scan.select(*names, *(["transactions"] if columnar else []))
        for chunk in lazy.collect_batches(chunk_size=READ_CHUNK_ROWS):
            txs = cls._transactions(chunk, lowercase) if columnar else repeat(None)
            for row, t in zip(chunk.select(names).iter_rows(), txs, strict=False):
                yield *row, t

    def _rows_in_window(
        self, scan: pl.LazyFrame, small: pl.DataFrame, wanted: pl.Expr, columnar: bool,
        lowercase: bool,
    ) -> Iterator[tuple[Any, ...]]:
        """Every row's small columns (`small`, read already, with `wanted`); payloads only
        where `wanted`, read in a second scan that the parquet reader filters (row groups
        outside are skipped, not decoded)."""
        big = ["payload", *(["transactions"] if columnar else [])]
        payloads = (
            (payload, t)
            for chunk in scan.filter(wanted).select(big).collect_batches(
                chunk_size=READ_CHUNK_ROWS)
            for payload, t in zip(chunk["payload"],
                                  self._transactions(chunk, lowercase) if columnar
                                  else repeat(None),
                                  strict=False)
        )
        for kind, offset, error, observed_at, number, read in small.iter_rows():
            if read:
                payload, txs = next(payloads)
            else:
                payload, txs = None, None
                self.payloads_skipped += 1
            yield kind, offset, payload, error, observed_at, number, txs

    def records(self) -> Iterator[AnyRecord]:
        """Records merged by time; rows `screen` rejects are never decoded.

        With `columnar` set, a block whose transactions are stored in columns comes as its
        header alone (no `transactions`); `tx_frame` gives a batch's transactions as the
        detectors' frame. Otherwise every block comes whole.
        """
        # each stream is read (parquet decoded, rows cut) ahead on a thread of its own
        streams = [read_ahead(self._stream(s)) for s in self.streams]
        merged = streams[0] if len(streams) == 1 else heapq.merge(*streams, key=lambda kv: kv[0])
        screen = self.screen
        for _, row in merged:
            if isinstance(row, _Invalid):
                record_skip = self.invalid.add_file if row.whole_rest else self.invalid.add
                record_skip(row.where, row.reason)
                continue
            if isinstance(row, _Outside):
                if screen is None or any([screen("block", n, _no_time) for n in row.numbers]):
                    raise ReplayError("the archive skipped blocks outside --from/--to that "
                                      "the replay would keep")
                continue
            if screen is not None and not screen(row.kind, row.number, row.header_time):
                continue
            if row.payload is None:  # only rows screen rejects come without one
                raise ReplayError(f"{row.where()}: kept a row whose payload was not read")
            try:
                record = decode(row.payload)
                if row.txs is not None and isinstance(record, Block):
                    if self.columnar:
                        self._columns[record.event_id] = (record, row.txs)
                    else:
                        record = with_transactions(record, row.txs.frame())
            except (InvalidRecord, ValueError) as exc:
                self.invalid.add(row.where(), first_line(exc))
                continue
            yield record

    def tx_columns(self, batch: list[AnyRecord]) -> TxColumns | None:
        """The transactions of the batch's blocks read in columns, to be made into one tx
        frame (`_frame_of`) when the detector scores them; None when it has none."""
        parts = []
        for record in batch:
            if isinstance(record, Block):
                part = self._columns.pop(record.event_id, None)
                if part is not None:
                    parts.append(part)
        return TxColumns(tuple(parts), _frame_of) if parts else None

    def discard(self, record: AnyRecord) -> None:
        if isinstance(record, Block):
            self._columns.pop(record.event_id, None)
