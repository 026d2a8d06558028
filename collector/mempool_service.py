"""The mempool collector: pending transactions of one node, followed to their fate.

Sources, best first: the `newPendingTransactions` subscription with full transaction
objects (WebSocket), and `txpool_content` polling (the fallback when there is no
WebSocket or the subscription is down; also the reconciliation that finds dropped txs).
`txpool_status` gives the pool's counts for the periodic snapshot. Inclusions, and
re-queues after a reorg, come from the block collector of the same node.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from chainwatch.bus import Bus, Topics
from chainwatch.exceptions import MalformedRpcPayload, RpcError, RpcMethodUnsupported
from chainwatch.metrics import Metrics
from chainwatch.schema import AnyRecord, Block, Reorg
from collector.mempool import (
    MempoolTracker,
    map_pending_tx,
    parse_txpool_content,
    parse_txpool_status,
)
from collector.publishing import Outbox
from collector.rpc import NodeRpc, Subscription

log = logging.getLogger("chainwatch.collector.mempool")


@dataclass(frozen=True)
class MempoolConfig:
    poll_interval: float = 2.0  # txpool_content polling while no subscription is live
    snapshot_interval: float = 10.0
    reconcile_interval: float = 30.0  # txpool_content check for dropped txs
    drop_grace: float = 30.0  # a tx must be gone from the pool this long to count as dropped
    max_tracked: int = 50_000
    max_outbox: int = 100_000


class MempoolCollector:
    def __init__(
        self,
        rpc: NodeRpc,
        bus: Bus,
        topics: Topics,
        metrics: Metrics,
        config: MempoolConfig,
        *,
        ws_url: str | None = None,
        clock: Callable[[], float] = time.time,
        chain_ok: Callable[[], bool] | None = None,
    ) -> None:
        self.rpc = rpc
        self.chain_ok = chain_ok  # the block collector is delivering (see _poll_txpool)
        self.node = rpc.node
        self.metrics = metrics
        self.config = config
        self.ws_url = ws_url
        self.clock = clock
        self.outbox = Outbox(bus, topics.mempool, max_records=config.max_outbox)
        self.tracker: MempoolTracker | None = None
        self.subscription: Subscription | None = None
        self._txpool_supported = True
        self._pending_raw: list[Any] = []
        self._wake = asyncio.Event()
        self._gap = False  # the subscription (re)started or ended: reconcile at once
        self._logged: set[str] = set()

    def on_chain(self, records: list[Block | Reorg]) -> None:
        """Listener for the block collector: inclusions and re-queues."""
        if self.tracker is not None:
            self._queue(self.tracker.on_blocks(records, self.clock()))

    async def run(self, stop: asyncio.Event) -> None:
        while self.rpc.chain_id is None and not stop.is_set():  # the block collector connects
            await asyncio.sleep(0.2)
        if stop.is_set():
            return
        assert self.rpc.chain_id is not None
        self.tracker = MempoolTracker(
            self.rpc.chain_id,
            self.node,
            max_tracked=self.config.max_tracked,
            grace_seconds=self.config.drop_grace,
        )
        tasks = [
            asyncio.create_task(self.outbox.flush_forever(lambda m: self._error("bus", m))),
            asyncio.create_task(self._poll_loop(stop)),
            asyncio.create_task(self._drain_loop(stop)),
        ]
        if self.ws_url:
            self.subscription = Subscription(
                self.ws_url,
                node=self.node,
                kind="newPendingTransactions",
                argument=True,
                on_message=self._on_message,
                on_gap=self._on_gap,
                on_error=lambda m: self._error("websocket", m),
            )
            tasks.append(asyncio.create_task(self.subscription.run()))
        try:
            await stop.wait()
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    def _on_gap(self) -> None:
        """Txs announced while no subscription was live (or before this one was set up)
        are only in the pool: list it now rather than at the next reconcile interval."""
        self._gap = True
        self._wake.set()

    def _on_message(self, raw: Any) -> None:
        self._pending_raw.append(raw)
        if len(self._pending_raw) >= 256:
            self._wake.set()

    async def _drain_loop(self, stop: asyncio.Event) -> None:
        """Map what the subscription delivered, in batches (cheap per message)."""
        while not stop.is_set():
            await asyncio.sleep(0.05)
            if self._pending_raw:
                batch, self._pending_raw = self._pending_raw, []
                await self._ingest(batch, self.clock())

    async def _ingest(self, raws: list[Any], now: float) -> None:
        assert self.tracker is not None
        out: list[AnyRecord] = []
        for raw in raws:
            try:
                tx = map_pending_tx(
                    raw, chain_id=self.tracker.chain_id, node=self.node, first_seen_at=now
                )
                out.extend(self.tracker.on_pending(tx))
            except MalformedRpcPayload as exc:
                self._error("malformed", str(exc))
            except Exception as exc:  # one tx nothing foresaw: a counted skip, not a dead task
                self._error("internal", repr(exc), exc_info=exc)
        await self.outbox.put(out)

    def _queue(self, records: list[AnyRecord]) -> None:
        if records:
            asyncio.get_running_loop().create_task(self.outbox.put(records))

    async def _poll_loop(self, stop: asyncio.Event) -> None:
        # intervals on the service's clock, like drop_grace: a session clock that runs
        # faster than the wall (the scenario runner's) keeps both in proportion
        last_snapshot = last_reconcile = -math.inf
        while not stop.is_set():
            now = self.clock()
            last_snapshot, last_reconcile = min(last_snapshot, now), min(last_reconcile, now)
            live = self.subscription is not None and self.subscription.connected
            try:
                if self._txpool_supported and (
                    not live or self._gap
                    or now - last_reconcile >= self.config.reconcile_interval
                ):
                    last_reconcile = now
                    self._gap = False
                    await self._poll_txpool()
                if now - last_snapshot >= self.config.snapshot_interval:
                    last_snapshot = now
                    await self._snapshot()
            except RpcMethodUnsupported as exc:
                self._txpool_supported = False
                self._once("txpool", f"txpool methods unavailable, subscription only: {exc}")
            except RpcError as exc:
                kind = "malformed" if isinstance(exc, MalformedRpcPayload) else "rpc"
                self._error(kind, str(exc))
            except Exception as exc:
                # this task ending would stop pending-tx polling and drop detection for
                # good, with no sign: count it and poll again
                self._error("internal", repr(exc), exc_info=exc)
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), timeout=self.config.poll_interval)

    async def _poll_txpool(self) -> None:
        assert self.tracker is not None
        pending, queued = parse_txpool_content(await self.rpc.call("txpool_content", []))
        now = self.clock()
        await self._ingest(pending, now)
        # a tx demoted to queued (nonce gap) is still in the pool: not dropped
        hashes = {str(tx.get("hash", "")).lower() for tx in (*pending, *queued)}
        if self.chain_ok is None or self.chain_ok():
            # A tx gone from the pool may be in a block not delivered yet: while the block
            # collector fails (a node answering garbage for blocks only), judging drops
            # would call mined txs dropped once the grace period ran out.
            self._queue(self.tracker.on_pool_contents(hashes, now))

    async def _snapshot(self) -> None:
        assert self.tracker is not None
        pending = queued = None
        source = "subscription"
        if self._txpool_supported:
            try:
                pending, queued = parse_txpool_status(await self.rpc.call("txpool_status", []))
                source = "txpool"
            except RpcMethodUnsupported:
                self._txpool_supported = False
        now = self.clock()
        self._queue(self.tracker.expire(now))
        await self.outbox.put([self.tracker.snapshot(now, pending, queued, source)])

    def _error(self, kind: str, message: str, exc_info: BaseException | None = None) -> None:
        self.metrics.collector_errors.labels(self.node, kind).inc()
        self._once(kind, message, exc_info)

    def _once(self, key: str, message: str, exc_info: BaseException | None = None) -> None:
        if key not in self._logged:  # log once per kind; the counter counts every one
            self._logged.add(key)
            log.warning("mempool collector", extra={"node": self.node, "kind": key,
                                                     "error": message}, exc_info=exc_info)
