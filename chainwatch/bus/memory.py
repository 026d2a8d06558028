"""In-process bus for embedded mode (`chainwatch run` without Kafka).

Each consumer group gets its own bounded queue; publishing blocks when a group's queue
is full (back-pressure instead of unbounded memory). A message is acknowledged once it
sits in every subscribed group's queue, so `flush` has nothing to wait for.
Groups must subscribe before publishing starts: the bootstrap wires them in that order.
"""

from __future__ import annotations

import queue
import threading

from chainwatch.bus.base import Bus, Consumer, Message


class _GroupQueue(Consumer):
    def __init__(self, topics: set[str], maxsize: int) -> None:
        self.topics = topics
        self.queue: queue.Queue[Message] = queue.Queue(maxsize=maxsize)
        self._offset = 0

    def put(self, message: Message) -> None:
        self.queue.put(message)

    def poll(self, timeout: float = 1.0, max_records: int = 500) -> list[Message]:
        try:
            first = self.queue.get(timeout=timeout) if timeout > 0 else self.queue.get_nowait()
        except queue.Empty:
            return []
        out = [first]
        while len(out) < max_records:
            try:
                out.append(self.queue.get_nowait())
            except queue.Empty:
                break
        return out

    def commit(self) -> None:
        """Nothing to persist: an embedded bus does not outlive its process."""

    def lag(self) -> int:
        return self.queue.qsize()


class EmbeddedBus(Bus):
    name = "embedded"

    def __init__(self, max_queued: int = 10_000) -> None:
        self.max_queued = max_queued
        self._groups: dict[str, _GroupQueue] = {}
        self._lock = threading.Lock()
        self._offsets: dict[str, int] = {}

    def publish(self, topic: str, key: str | None, value: bytes) -> None:
        with self._lock:
            offset = self._offsets.get(topic, 0)
            self._offsets[topic] = offset + 1
            targets = [g for g in self._groups.values() if topic in g.topics]
        message = Message(topic=topic, key=key, value=value, offset=offset)
        for group in targets:
            group.put(message)

    def flush(self, timeout: float = 30.0) -> None:
        return None

    def consumer(self, topics: list[str], group: str) -> Consumer:
        with self._lock:
            existing = self._groups.get(group)
            if existing is not None:
                existing.topics.update(topics)
                return existing
            created = _GroupQueue(set(topics), self.max_queued)
            self._groups[group] = created
            return created
