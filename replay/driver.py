"""Drive the live detector over recorded history: batching, a replayed clock, ticks, range.

Domain code, no I/O (sleeping for `--speed` is an injected callable). The detector is the
live one (`detector.engine.Detector`), used as a black box through `process` and `tick`,
exactly as `detector.service` drives it; only time differs: the clock is the
`observed_at` of the records being processed, so the same input gives the same findings.

Batches: up to `batch_records` records (the live consumer's poll size), cut early where
the recorded stream goes quiet for more than `gap_seconds`; inside such a gap the
detector is ticked every `tick_seconds` of recorded time, as the live loop ticks every
second of wall time, so a stalled node is found at the same moment it was live.
`per_block` batches instead as a caught-up consumer polls: everything up to and
including each block (what `chainwatch evaluate` measures latency in blocks with), and
with `max_batch_seconds` no batch spans more recorded time than that (pending txs are
seen within a poll of their arrival, not at the next block).
"""

from __future__ import annotations

import contextlib
import gc
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

from chainwatch.schema import (
    AnyRecord,
    Block,
    Finding,
    NodeStatus,
    Reorg,
    TxLifecycle,
)
from detector.pools import shut_down_pools

if TYPE_CHECKING:
    import polars as pl

    from detector.tx_features import TxColumns

GC_YOUNG_THRESHOLD = 100_000  # allocations between young collections (CPython's is 700)


@contextlib.contextmanager
def fewer_collections(young: int = GC_YOUNG_THRESHOLD) -> Iterator[None]:
    """Run the cyclic garbage collector less often while replaying.

    Decoding and detecting allocate millions of short-lived objects that reference
    counting frees; at CPython's default threshold the collector still walks the young
    (and, every tenth time, the middle) generation every 700 allocations, about a tenth
    of replay's CPU time. Findings do not depend on it; memory barely (cycles are rare
    and still collected). What exists before the replay starts (the libraries' objects,
    the models: ~280k) is frozen meanwhile: left out of the oldest generation's
    collections, which walked them every time (~0.1 s each). The previous thresholds,
    and those objects' place in the collector, are restored afterwards.
    """
    before = gc.get_threshold()
    gc.set_threshold(max(young, before[0]), *before[1:])
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()
        gc.set_threshold(*before)


class DetectorLike(Protocol):
    """What replay needs of `detector.engine.Detector`."""

    def process(
        self, records: Sequence[AnyRecord], txs: pl.DataFrame | TxColumns | None = None
    ) -> list[Finding]: ...

    def tick(self) -> list[Finding]: ...

    def flush(self) -> list[Finding]: ...


class ColumnarTxs(Protocol):
    """A source that sends blocks without their transactions (`replay.sources.Source`)."""

    def tx_columns(self, batch: list[AnyRecord]) -> TxColumns | None: ...

    def discard(self, record: AnyRecord) -> None: ...


POLL_SECONDS = 1.0  # per-block batches span at most this (the live consumer polls every 0.5 s)


@dataclass(frozen=True)
class ReplayConfig:
    batch_records: int = 500
    gap_seconds: float = 20.0
    tick_seconds: float = 1.0
    max_ticks_per_gap: int = 3600
    per_block: bool = False  # one batch per block (no size or gap cut)
    # with per_block: also cut a batch spanning more than this much recorded time, as a
    # live consumer polls (every 0.5 s) instead of waiting for the next block
    max_batch_seconds: float | None = None
    from_block: int | None = None
    to_block: int | None = None
    from_time: float | None = None  # on block timestamps (unix seconds), inclusive
    to_time: float | None = None
    speed: float | None = None  # recorded seconds per wall second; None = as fast as possible


class ReplayClock:
    """The detector's clock during replay: recorded time, never wall time."""

    def __init__(self, start: float = 0.0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now


def block_number_of(record: AnyRecord) -> int | None:
    """The height a record is about, for --from/--to; None when it has none."""
    if isinstance(record, Block):
        return record.number
    if isinstance(record, Reorg):
        return record.new_head_number
    if isinstance(record, TxLifecycle | NodeStatus):
        return record.block_number if isinstance(record, TxLifecycle) else record.head_number
    if isinstance(record, Finding):
        return record.block_number
    return None


class RecordRange:
    """--from/--to on block numbers and/or block timestamps.

    A block is kept when its number and its header timestamp are inside the bounds given.
    Other records with a height are kept when it is inside the block-number bounds.
    Records without one (peer and mempool snapshots, pending transactions), and any record
    but a block under time bounds (no header time of its own), are kept while the stream is
    inside the range: after the first block at or above the lower bounds and before the
    first block above an upper bound.
    """

    def __init__(
        self,
        first: int | None = None,
        last: int | None = None,
        *,
        first_time: float | None = None,
        last_time: float | None = None,
    ) -> None:
        if first is not None and last is not None and first > last:
            raise ValueError(f"--from {first} is after --to {last}")
        self.first, self.last = first, last
        self.first_time, self.last_time = first_time, last_time
        self.inside = first is None and first_time is None
        self.past = False

    @property
    def unbounded(self) -> bool:
        """No bound at all: every record is kept."""
        return (self.first is None and self.last is None and self.first_time is None
                and self.last_time is None)

    @property
    def timed(self) -> bool:
        return self.first_time is not None or self.last_time is not None

    def block_window(self) -> tuple[int | None, int | None] | None:
        """Heights outside which keep_unread rejects a block on its height alone, without
        its header time: None under time bounds or without height bounds."""
        if self.timed or (self.first is None and self.last is None):
            return None
        return self.first, self.last

    def keep(self, record: AnyRecord) -> bool:
        if isinstance(record, Block):
            return self._keep_block(record.number, record.timestamp)
        return self._keep_other(block_number_of(record))

    def keep_unread(
        self, kind: str, number: int | None, header_time: Callable[[], float | None]
    ) -> bool | None:
        """keep() for a record not decoded yet, from its type and height (the archive's
        columns): None when only the record can tell (a block under time bounds whose
        header time `header_time` cannot find). Same answer and state as keep(), which may
        then run again on the decoded record: it changes nothing the second time.
        """
        if kind != "block":
            return self._keep_other(number)
        if number is None:
            return None
        timestamp = header_time() if self.timed else 0.0
        if timestamp is None:
            return None
        return self._keep_block(number, timestamp)

    def _keep_block(self, number: int, timestamp: float) -> bool:
        above = (self.first is None or number >= self.first) and (
            self.first_time is None or timestamp >= self.first_time)
        below = (self.last is None or number <= self.last) and (
            self.last_time is None or timestamp <= self.last_time)
        self.inside = self.inside or above
        self.past = self.past or not below
        return above and below

    def _keep_other(self, number: int | None) -> bool:
        timed = self.timed
        if (number is None or timed) and not (self.inside and not self.past):
            return False
        return number is None or (
            (self.first is None or number >= self.first)
            and (self.last is None or number <= self.last)
        )


@dataclass
class ReplayStats:
    """What went through: shown in the summary and written to summary.json."""

    records: int = 0
    filtered_out: int = 0
    blocks: int = 0
    transactions: int = 0
    batches: int = 0
    ticks: int = 0
    findings: int = 0
    by_type: Counter[str] = field(default_factory=Counter)
    findings_by_detector: Counter[str] = field(default_factory=Counter)
    first_block: int | None = None
    last_block: int | None = None
    first_observed_at: float | None = None
    last_observed_at: float | None = None
    wall_seconds: float = 0.0

    def as_dict(self) -> dict[str, object]:
        return {
            "records": self.records,
            "filtered_out": self.filtered_out,
            "blocks": self.blocks,
            "transactions": self.transactions,
            "batches": self.batches,
            "ticks": self.ticks,
            "findings": self.findings,
            "records_by_type": dict(sorted(self.by_type.items())),
            "findings_by_detector": dict(sorted(self.findings_by_detector.items())),
            "first_block": self.first_block,
            "last_block": self.last_block,
            "first_observed_at": self.first_observed_at,
            "last_observed_at": self.last_observed_at,
        }


FindingsSink = Callable[[list[Finding]], None]


class Replayer:
    """Feeds records to the detector in batches on the replayed clock; findings to a sink."""

    def __init__(
        self,
        detector: DetectorLike,
        clock: ReplayClock,
        config: ReplayConfig,
        sink: FindingsSink,
        *,
        sleep: Callable[[float], None] = time.sleep,
        monotonic: Callable[[], float] = time.monotonic,
        on_batch: Callable[[ReplayStats, list[AnyRecord]], None] | None = None,
        before_batch: Callable[[list[AnyRecord]], None] | None = None,
        columns: ColumnarTxs | None = None,
    ) -> None:
        self.detector = detector
        self.clock = clock
        self.config = config
        self.sink = sink
        self.sleep = sleep
        self.monotonic = monotonic
        self.on_batch = on_batch  # after the batch's findings went to the sink
        self.before_batch = before_batch  # before the detector sees the batch
        self.columns = columns  # a source that sends blocks' transactions in columns
        self.stats = ReplayStats()
        self.range = RecordRange(config.from_block, config.to_block,
                                 first_time=config.from_time, last_time=config.to_time)
        self._pace_origin: tuple[float, float] | None = None  # (recorded, wall)

    def screen(
        self, kind: str, number: int | None, header_time: Callable[[], float | None]
    ) -> bool:
        """For sources that can skip decoding: False when --from/--to drops the record
        (counted as filtered out), True when it has to be decoded (kept, or undecided).
        """
        verdict = self.range.keep_unread(kind, number, header_time)
        if verdict is False:
            self.stats.filtered_out += 1
            return False
        return True

    def batches(self, records: Iterable[AnyRecord]) -> Iterator[tuple[list[AnyRecord], float]]:
        """Batches in order, each with the recorded time of the next record (gap end)."""
        c = self.config
        batch: list[AnyRecord] = []
        last: float | None = None
        keep = None if self.range.unbounded else self.range.keep  # a call per record saved
        for record in records:
            if keep is not None and not keep(record):
                self.stats.filtered_out += 1
                if self.columns is not None:
                    self.columns.discard(record)
                continue
            t = record.observed_at
            if batch and not c.per_block and (
                len(batch) >= c.batch_records or (last is not None and t - last > c.gap_seconds)
            ):
                yield batch, t
                batch = []
            if c.per_block and batch and (
                isinstance(batch[-1], Block)
                or (c.max_batch_seconds is not None
                    and t - batch[0].observed_at > c.max_batch_seconds)
            ):
                yield batch, t
                batch = []
            batch.append(record)
            last = t if last is None else max(last, t)
        if batch:
            yield batch, batch[-1].observed_at

    def run(self, records: Iterable[AnyRecord]) -> ReplayStats:
        started = self.monotonic()
        try:
            with fewer_collections():
                for batch, next_at in self.batches(records):
                    self._process(batch)
                    self._tick_through(next_at)
                self._emit(self.detector.flush())  # what the detector kept back to the end
        finally:
            shut_down_pools()  # also a helper thread whose start a Ctrl-C cut short
        self.stats.wall_seconds = self.monotonic() - started
        return self.stats

    def _process(self, batch: list[AnyRecord]) -> None:
        s = self.stats
        times = [r.observed_at for r in batch]
        batch_end = max(times)
        self.clock.now = max(self.clock.now, batch_end)
        self._pace(self.clock.now)
        if self.before_batch is not None:
            self.before_batch(batch)
        txs = self.columns.tx_columns(batch) if self.columns is not None else None
        findings = (self.detector.process(batch) if txs is None
                    else self.detector.process(batch, txs))
        s.batches += 1
        s.records += len(batch)
        s.by_type.update(record.type for record in batch)
        blocks = [r for r in batch if isinstance(r, Block)]
        if blocks:
            s.blocks += len(blocks)
            s.transactions += sum(b.tx_count for b in blocks)
            numbers = [b.number for b in blocks]
            low, high = min(numbers), max(numbers)
            s.first_block = low if s.first_block is None else min(s.first_block, low)
            s.last_block = high if s.last_block is None else max(s.last_block, high)
        first = min(times)
        s.first_observed_at = first if s.first_observed_at is None else s.first_observed_at
        s.last_observed_at = self.clock.now
        self._emit(findings)
        if self.on_batch is not None:
            self.on_batch(s, batch)

    def _tick_through(self, until: float) -> None:
        """Tick once after the batch, and every tick_seconds through a quiet gap."""
        c = self.config
        self._tick()
        ticks = 0
        while self.clock.now + c.tick_seconds < until and ticks < c.max_ticks_per_gap:
            self.clock.now += c.tick_seconds
            self._pace(self.clock.now)
            self._tick()
            ticks += 1

    def _tick(self) -> None:
        self.stats.ticks += 1
        self._emit(self.detector.tick())

    def _emit(self, findings: list[Finding]) -> None:
        if not findings:
            return
        self.stats.findings += len(findings)
        for f in findings:
            self.stats.findings_by_detector[f.detector] += 1
        self.sink(findings)

    def _pace(self, recorded: float) -> None:
        """--speed: wait until wall time catches up with recorded time / speed."""
        speed = self.config.speed
        if not speed:
            return
        if self._pace_origin is None:
            self._pace_origin = (recorded, self.monotonic())
            return
        origin_recorded, origin_wall = self._pace_origin
        due = origin_wall + (recorded - origin_recorded) / speed
        wait = due - self.monotonic()
        if wait > 0:
            self.sleep(wait)
