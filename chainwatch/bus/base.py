"""Bus interface shared by the embedded and the Kafka implementation.

Contract (what the collector and detector rely on):
- `publish` queues a message; `flush` returns only once every queued message has been
  acknowledged by the bus, and raises BusError otherwise. Checkpoints move after flush.
- A consumer's `commit` marks everything returned by `poll` so far as processed; after a
  restart, a group resumes from its last commit (at-least-once).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Message:
    topic: str
    key: str | None
    value: bytes
    partition: int = 0
    offset: int = 0


@dataclass(frozen=True, slots=True)
class Topics:
    """Topic names under one configurable prefix."""

    prefix: str = "chainwatch"

    @property
    def blocks(self) -> str:
        return f"{self.prefix}.blocks"

    @property
    def findings(self) -> str:
        return f"{self.prefix}.findings"

    @property
    def deadletter(self) -> str:
        return f"{self.prefix}.deadletter"

    @property
    def mempool(self) -> str:
        return f"{self.prefix}.mempool"

    @property
    def peers(self) -> str:
        return f"{self.prefix}.peers"

    def all(self) -> list[str]:
        return [self.blocks, self.mempool, self.peers, self.findings, self.deadletter]


class Consumer(ABC):
    @abstractmethod
    def poll(self, timeout: float = 1.0, max_records: int = 500) -> list[Message]:
        """Next messages, oldest first per partition; empty list on timeout."""

    @abstractmethod
    def commit(self) -> None:
        """Everything polled so far is processed."""

    def lag(self) -> int | None:
        """Messages published but not yet polled, when the bus can tell."""
        return None

    def close(self) -> None:  # noqa: B027 - optional hook
        """Leave the group and free resources."""


class Bus(ABC):
    name: str = "bus"

    @abstractmethod
    def publish(self, topic: str, key: str | None, value: bytes) -> None:
        """Queue one message (may block when the bus applies back-pressure)."""

    @abstractmethod
    def flush(self, timeout: float = 30.0) -> None:
        """Wait until every queued message is acknowledged; raise BusError if not."""

    @abstractmethod
    def consumer(self, topics: list[str], group: str) -> Consumer:
        """A consumer in `group` reading `topics`."""

    def ensure_topics(self, topics: list[str]) -> None:  # noqa: B027 - optional hook
        """Create topics that do not exist yet (no-op where topics are implicit)."""

    def close(self) -> None:  # noqa: B027 - optional hook
        """Flush what can be flushed and release connections."""
