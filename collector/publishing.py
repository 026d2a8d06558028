"""A bounded outbox for records that exist only once (pending txs, snapshots).

Blocks can always be fetched again from the node, so the block collector simply retries
from its checkpoint. Mempool and peer records cannot: they wait here, within a bound,
until the bus acknowledges them. When the bus is down and the outbox is full, `put`
waits (back-pressure on the reader) instead of dropping anything.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque

from chainwatch.bus import Bus
from chainwatch.exceptions import BusError
from chainwatch.schema import AnyRecord, encode

log = logging.getLogger("chainwatch.collector")


def publish_and_flush(bus: Bus, messages: list[tuple[str, str | None, bytes]]) -> None:
    """Publish a batch and wait for the acknowledgement (blocking: run it in a thread)."""
    for topic, key, value in messages:
        bus.publish(topic, key, value)
    bus.flush()


class Outbox:
    def __init__(self, bus: Bus, topic: str, *, max_records: int = 100_000) -> None:
        self.bus = bus
        self.topic = topic
        self.max_records = max_records
        self._queue: deque[AnyRecord] = deque()
        self._space = asyncio.Event()
        self._space.set()
        self._ready = asyncio.Event()

    def __len__(self) -> int:
        return len(self._queue)

    async def put(self, records: list[AnyRecord]) -> None:
        for record in records:
            while len(self._queue) >= self.max_records:
                self._space.clear()
                await self._space.wait()
            self._queue.append(record)
        if records:
            self._ready.set()

    async def flush_forever(self, on_error, batch: int = 2000, linger: float = 0.1) -> None:
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
            for _ in chunk:
                self._queue.popleft()
            self._space.set()
            if not self._queue:
                self._ready.clear()
