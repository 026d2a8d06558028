"""The block collector: follows one node and publishes its chain to the bus.

Loop: wait for a new head (WebSocket notification, or the polling interval as a
fallback), then step the ChainFollower until it has nothing new; each step's records
are published, flushed (acknowledged) and only then checkpointed. Any failure rolls
the tracker back to the last acknowledged checkpoint, so the next try re-fetches and
re-publishes from there: at-least-once, nothing skipped.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

from chainwatch.bus import Bus, Topics
from chainwatch.exceptions import BusError, ConfigError, MalformedRpcPayload, RpcError
from chainwatch.httpserver import Health
from chainwatch.metrics import Metrics
from chainwatch.schema import Block, NodeStatus, Reorg, encode
from collector.chain import ChainFollower, ChainTracker
from collector.checkpoint import FileCheckpointStore
from collector.rpc import NodeRpc, Subscription

log = logging.getLogger("chainwatch.collector")


@dataclass(frozen=True)
class CollectorConfig:
    poll_interval: float = 2.0  # seconds between polls when no WebSocket head arrives
    window: int = 64
    max_reorg_depth: int = 128
    batch_size: int = 100
    start_block: int | None = None  # None: start at the node's head when no checkpoint
    expected_block_time: float = 12.0
    status_interval: float = 5.0  # seconds between node_status heartbeats
    max_message_bytes: int = 900_000  # Kafka's default broker limit is 1 MiB
    retry_backoff: float = 1.0  # first wait after a failure; doubles while failures go on
    max_retry_backoff: float = 30.0


def encode_within(record: Block | Reorg | NodeStatus, limit: int) -> bytes:
    """Encode a record; a block too large for the bus keeps its first transactions only.

    tx_count keeps the real count and `transactions_truncated` says what happened, so a
    huge block is delivered (and counted) instead of blocking the stream forever.
    """
    payload = encode(record)
    if len(payload) <= limit or not isinstance(record, Block) or not record.transactions:
        return payload
    keep = len(record.transactions)
    while keep > 0 and len(payload) > limit:
        keep = int(keep * limit / len(payload) * 0.95)
        payload = encode(
            record.model_copy(
                update={"transactions": record.transactions[:keep], "transactions_truncated": True}
            )
        )
    return payload


def failure_kind(exc: Exception) -> str:
    """The `kind` label of chainwatch_collector_errors_total for a failed round."""
    if isinstance(exc, MalformedRpcPayload):
        return "malformed"
    if isinstance(exc, RpcError):
        return "rpc"
    if isinstance(exc, BusError):
        return "bus"
    return "internal"  # a bug, or input nothing foresaw


class BlockCollector:
    def __init__(
        self,
        rpc: NodeRpc,
        bus: Bus,
        topics: Topics,
        store: FileCheckpointStore,
        metrics: Metrics,
        health: Health,
        config: CollectorConfig,
        *,
        ws_url: str | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.rpc = rpc
        self.bus = bus
        self.topics = topics
        self.store = store
        self.metrics = metrics
        self.health = health
        self.config = config
        self.ws_url = ws_url
        self.clock = clock
        self.node = rpc.node
        self.follower: ChainFollower | None = None
        self._acked: list[list[object]] = []
        self._head_event = asyncio.Event()
        self._failing: set[str] = set()
        self._last_status: tuple[bool, float] | None = None  # (reachable, monotonic time)
        self.listeners: list[Callable[[list[Block | Reorg]], None]] = []

    @property
    def loop_name(self) -> str:
        return f"collector:{self.node}"

    async def start(self) -> None:
        """Connect and restore the checkpoint. Raises RpcError if the node is unreachable."""
        chain_id = await self.rpc.fetch_chain_id()
        saved = self.store.load(chain_id, self.node)
        self._acked = list(saved["refs"]) if saved else []
        tracker = ChainTracker.restore(self._acked, self.config.window)
        self.follower = ChainFollower(
            self.rpc,
            tracker,
            chain_id=chain_id,
            node=self.node,
            max_reorg_depth=self.config.max_reorg_depth,
            batch_size=self.config.batch_size,
            start_block=self.config.start_block,
            clock=self.clock,
        )
        self.metrics.init_collector(chain_id, self.node)
        head = tracker.head
        log.info(
            "collector started",
            extra={"node": self.node, "chain_id": chain_id,
                   "resume_from": head.number if head else None,
                   "websocket": self.ws_url is not None},
        )

    async def run(self, stop: asyncio.Event) -> None:
        """Follow the node until `stop`; connection failures (even at start) are retried."""
        ws_task = None
        if self.ws_url:
            sub = Subscription(
                self.ws_url,
                node=self.node,
                kind="newHeads",
                on_message=lambda _: self._head_event.set(),
                on_gap=self._head_event.set,
                on_error=lambda msg: self._error("websocket", msg),
            )
            ws_task = asyncio.create_task(sub.run(), name=f"ws:{self.node}")
        backoff = self.config.retry_backoff
        try:
            while not stop.is_set():
                self.health.beat(self.loop_name)
                try:
                    if self.follower is None:
                        await self.start()
                    await self.catch_up()
                    # a heartbeat Kafka refused is a failed round like any other: with no
                    # new block it is the only publish, so swallowing it would report
                    # "recovered" (and ready) while the broker is still down
                    await self._publish_status(True, None, raise_errors=True)
                    self._recovered()
                    backoff = self.config.retry_backoff
                    self.health.set_ready(self.loop_name, True)
                    await self._wait_for_head(stop, self.config.poll_interval)
                except ConfigError:
                    raise  # an unreadable checkpoint: one line and exit, not a retry loop
                except Exception as exc:
                    # A bug or input no mapper foresaw must not kill the loop: a restart
                    # would meet the same input again (a crash loop). Count it, log it
                    # once per episode, and retry from the checkpoint.
                    kind = failure_kind(exc)
                    internal = kind == "internal"
                    self._error(kind, repr(exc) if internal else str(exc),
                                exc_info=exc if internal else None)
                    self._rollback()
                    if kind in ("rpc", "malformed") and self.follower is not None:
                        self.metrics.node_up.labels(*self._labels()).set(0)
                        await self._publish_status(False, kind)
                    await self._wait_for_head(stop, backoff)
                    backoff = min(backoff * 2, self.config.max_retry_backoff)
        finally:
            if ws_task:
                ws_task.cancel()
                await asyncio.gather(ws_task, return_exceptions=True)

    async def _wait_for_head(self, stop: asyncio.Event, timeout: float) -> None:
        # The event is cleared before each catch-up, not here: a head announced while
        # catching up must wake the next round instead of being lost.
        waits = [asyncio.create_task(self._head_event.wait()), asyncio.create_task(stop.wait())]
        try:
            await asyncio.wait(waits, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in waits:
                task.cancel()

    async def catch_up(self) -> int:
        """Step until the tracked head is the node's head; returns records delivered."""
        assert self.follower is not None
        self._head_event.clear()
        delivered = 0
        while records := await self.follower.step():
            await self.deliver(records)
            delivered += len(records)
            self.health.beat(self.loop_name)
        self.metrics.node_up.labels(*self._labels()).set(1)
        self.metrics.collector_lag.labels(*self._labels()).set(self.follower.lag_blocks)
        return delivered

    async def deliver(self, records: list[Block | Reorg]) -> None:
        """Publish, wait for the acknowledgement, then move the checkpoint."""
        assert self.follower is not None
        limit = self.config.max_message_bytes
        messages = [(self.topics.blocks, r.stream_key(), encode_within(r, limit)) for r in records]
        await asyncio.to_thread(self._publish_all, messages)
        snapshot = self.follower.tracker.snapshot()
        self.store.save(
            self.follower.chain_id, self.node,
            {"chain_id": self.follower.chain_id, "node": self.node, "refs": snapshot},
        )
        self._acked = snapshot
        for listener in self.listeners:  # e.g. the mempool tracker follows inclusions
            listener(records)
        blocks = [r for r in records if isinstance(r, Block)]
        labels = self._labels()
        self.metrics.collector_published.labels(*labels).inc(len(blocks))
        head = self.follower.tracker.head
        if head is not None:
            self.metrics.collector_checkpoint.labels(*labels).set(head.number)
        for r in records:
            if isinstance(r, Reorg):
                found = "found" if r.ancestor_found else "unknown"
                self.metrics.collector_reorgs.labels(*labels, found).inc()
                extra = {"node": self.node, "chain_id": r.chain_id, "depth": r.depth,
                         "old_head": r.old_head_number, "new_head": r.new_head_number,
                         "common_ancestor": r.common_ancestor_number}
                if r.ancestor_found:
                    log.warning("reorg", extra=extra)
                else:
                    # deeper than the window and the node no longer serves the old blocks,
                    # or deeper than max_reorg_depth: depth is only a lower bound
                    log.error("reorg with unknown common ancestor (depth is a lower bound)",
                              extra=extra)

    async def _publish_status(self, reachable: bool, error_kind: str | None, *,
                              raise_errors: bool = False) -> None:
        """Heartbeat for the detector: on every change, else every status_interval."""
        if self.follower is None:
            return
        now = time.monotonic()
        last = self._last_status
        interval = self.config.status_interval
        if last is not None and last[0] == reachable and now - last[1] < interval:
            return
        head = self.follower.tracker.head
        status = NodeStatus(
            chain_id=self.follower.chain_id,
            node=self.node,
            event_id=NodeStatus.id_for(self.follower.chain_id, self.node, self.clock()),
            observed_at=self.clock(),
            reachable=reachable,
            head_number=head.number if head else None,
            expected_block_time_seconds=self.config.expected_block_time,
            error_kind=error_kind,
        )
        try:
            await asyncio.to_thread(
                self._publish_all, [(self.topics.blocks, status.stream_key(), encode(status))]
            )
            self._last_status = (reachable, now)
        except BusError as exc:
            if raise_errors:
                raise
            self._error("bus", str(exc))

    def _publish_all(self, messages: list[tuple[str, str, bytes]]) -> None:
        for topic, key, value in messages:
            self.bus.publish(topic, key, value)
        self.bus.flush()

    def _rollback(self) -> None:
        """Forget everything not acknowledged: the next step fetches it again."""
        if self.follower is not None:
            self.follower.tracker = ChainTracker.restore(self._acked, self.config.window)

    def _labels(self) -> tuple[str, str]:
        assert self.follower is not None
        return str(self.follower.chain_id), self.node

    def _error(self, kind: str, message: str, exc_info: BaseException | None = None) -> None:
        self.metrics.collector_errors.labels(self.node, kind).inc()
        if kind not in self._failing:  # log once per episode, count every time
            self._failing.add(kind)
            log.error("collector error, retrying", extra={"node": self.node, "kind": kind,
                                                           "error": message},
                      exc_info=exc_info)
        if kind != "websocket":
            self.health.set_ready(self.loop_name, False)

    def _recovered(self) -> None:
        for kind in [k for k in self._failing if k != "websocket"]:
            self._failing.discard(kind)
            log.info("collector recovered", extra={"node": self.node, "kind": kind})
