"""A bounded outbox for records that exist only once (pending txs, snapshots).

Blocks can always be fetched again from the node, so the block collector simply retries
from its checkpoint. Mempool and peer records cannot: they wait here, within a bound,
until the bus acknowledges them. When the bus is down long enough for the outbox to
fill, new records are dropped and each drop is reported through `on_drop` (a counter,
`chainwatch_collector_records_dropped_total`): memory stays bounded and nothing is lost
without a count. Waiting instead (back-pressure) does not bound anything here, because
a node's subscription keeps pushing and the notifications would pile up unbounded
in front of the outbox.

`on_idle` is called, synchronously, each time a flush leaves nothing unacknowledged:
the moment when state derived from the queued records (the mempool tracker's) may be
checkpointed without running ahead of the bus. `on_sent` is called, synchronously, with
each batch the bus acknowledged (records and their encoded payloads), before it leaves
the queue: the mempool collector journals its acknowledged announcements there.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Callable, Sequence

from chainwatch.bus import Bus
from chainwatch.exceptions import BusError
from chainwatch.schema import AnyRecord, encode

log = logging.getLogger("chainwatch.collector")

OUTBOX_FULL = "outbox_full"  # the reason label of a drop


def publish_and_flush(bus: Bus, messages: Sequence[tuple[str, str | None, bytes]]) -> None:
    """Publish a batch and wait for the acknowledgement (blocking: run it in a thread)."""
    for topic, key, value in messages:
        bus.publish(topic, key, value)
    bus.flush()


class Outbox:
    def __init__(
        self,
        bus: Bus,
        topic: str,
        *,
        max_records: int = 100_000,
        on_drop: Callable[[AnyRecord, str], None] | None = None,
        on_idle: Callable[[], None] | None = None,
        on_sent: Callable[[list[AnyRecord], list[bytes]], None] | None = None,
    ) -> None:
        if max_records < 1:
            raise ValueError("max_records must be at least 1")
        self.bus = bus
        self.topic = topic
        self.max_records = max_records
        self.on_drop = on_drop  # (record, reason) for each record refused
        self.on_idle = on_idle  # everything queued so far is acknowledged
        self.on_sent = on_sent  # (records, payloads) of each acknowledged batch
        self.dropped = 0
        self._queue: deque[AnyRecord] = deque()
        self._ready = asyncio.Event()
        self._full = False  # within a full episode: log once, count every drop

    def __len__(self) -> int:
        return len(self._queue)

    async def put(self, records: Sequence[AnyRecord]) -> None:
        """Queue records; never waits. Past the bound, each record is dropped and counted."""
        self.put_nowait(records)

    def put_nowait(self, records: Sequence[AnyRecord]) -> None:
        """`put` for synchronous callers: the records are queued before it returns."""
        for record in records:
            if len(self._queue) >= self.max_records:
                self._drop(record)
                continue
            self._queue.append(record)
        if records:
            self._ready.set()

    def _drop(self, record: AnyRecord) -> None:
        self.dropped += 1
        if self.on_drop is not None:
            self.on_drop(record, OUTBOX_FULL)
        if not self._full:
            self._full = True
            log.error(
                "outbox full while the bus is unavailable: dropping new records (counted)",
                extra={"topic": self.topic, "max_records": self.max_records},
            )

    async def flush_forever(
        self, on_error: Callable[[str], None], batch: int = 2000, linger: float = 0.1
    ) -> None:
        """Send what is queued, oldest first; on a bus error keep it and retry."""
        backoff = 0.5
        while True:
            await self._ready.wait()
            await asyncio.sleep(linger)  # let a burst gather into one batch
            chunk = [self._queue[i] for i in range(min(batch, len(self._queue)))]
            messages = [(self.topic, r.stream_key(), encode(r)) for r in chunk]
            try:
                await asyncio.to_thread(publish_and_flush, self.bus, messages)
            except BusError as exc:
                on_error(str(exc))
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 30.0)
                continue
            backoff = 0.5
            if self.on_sent is not None:
                self.on_sent(chunk, [payload for _, _, payload in messages])
            for _ in chunk:
                self._queue.popleft()
            if self._full and len(self._queue) < self.max_records:
                self._full = False
                log.info("outbox accepting records again",
                         extra={"topic": self.topic, "dropped_so_far": self.dropped})
            if not self._queue:
                self._ready.clear()
                if self.on_idle is not None:
                    self.on_idle()
