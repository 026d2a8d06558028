"""The mempool collector: pending transactions of one node, followed to their fate.

Sources, best first: the `newPendingTransactions` subscription with full transaction
objects (WebSocket), and `txpool_content` polling (the fallback when there is no
WebSocket or the subscription is down; also the reconciliation that finds dropped txs).
`txpool_status` gives the pool's counts for the periodic snapshot. Inclusions, and
re-queues after a reorg, come from the block collector of the same node.

The tracked txs are saved in the state dir (`mempool-<chain>-<node>.json`) whenever the
outbox has nothing unacknowledged, at most every `save_interval` and at a clean
shutdown, and restored at start: a restarted collector still reports the txs that were
dropped or mined while it was down. The saved state never runs ahead of the bus: a
fate whose record is still queued is not in it. It can lag behind it: after a kill, the
block collector resumes from its own checkpoint, which may be newer than the state. So
the blocks after the state's head are fetched again for the tracker (at most
`MAX_REFETCH_BLOCKS`): a restored tx mined in one of them gets its `included` record
(again, with the same event id, if it was published before the kill), not a `dropped`.
The txs announced after the last save are not in the state: each announcement the bus
acknowledges is appended to a journal beside it (`mempool-<chain>-<node>.journal.<n>`,
a new generation per save, the older ones deleted once the state is written), and a
restart tracks them again from it, so a tx announced just before a kill and mined while
the collector was down still gets its `included` record.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from chainwatch.bus import Bus, Topics
from chainwatch.exceptions import (
    ConfigError,
    InvalidRecord,
    MalformedRpcPayload,
    RpcError,
    RpcMethodUnsupported,
)
from chainwatch.metrics import Metrics
from chainwatch.schema import AnyRecord, Block, PendingTx, Reorg, TxLifecycle, decode
from collector.checkpoint import FileCheckpointStore, JournalStore
from collector.mempool import (
    MempoolTracker,
    TrackerState,
    map_pending_tx,
    parse_txpool_content,
    parse_txpool_status,
    state_document,
)
from collector.publishing import Outbox
from collector.rpc import NodeRpc, Subscription

log = logging.getLogger("chainwatch.collector.mempool")

MAX_REFETCH_BLOCKS = 256  # blocks after a restored state's head fetched again (~50 min at 12 s)


@dataclass(frozen=True)
class MempoolConfig:
    poll_interval: float = 2.0  # txpool_content polling while no subscription is live
    snapshot_interval: float = 10.0
    reconcile_interval: float = 30.0  # txpool_content check for dropped txs
    drop_grace: float = 30.0  # a tx must be gone from the pool this long to count as dropped
    max_tracked: int = 50_000
    max_outbox: int = 100_000
    save_interval: float = 30.0  # tracked txs saved at most this often (wall seconds)
    final_flush_timeout: float = 5.0  # at shutdown, how long the bus may take the rest


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
        state: FileCheckpointStore | None = None,
    ) -> None:
        self.rpc = rpc
        self.node = rpc.node
        self.metrics = metrics
        self.config = config
        self.ws_url = ws_url
        self.clock = clock
        self.state = state  # where the tracked txs outlive a restart; None: they do not
        # announcements acknowledged since the last save (see the module docstring)
        self.journal = JournalStore(state.directory, state.prefix) if state else None
        self._journal_generation = 0  # the generation appended to now
        self.outbox = Outbox(bus, topics.mempool, max_records=config.max_outbox,
                             on_idle=self._save_if_due, on_sent=self._journal_sent)
        self.tracker: MempoolTracker | None = None
        self.subscription: Subscription | None = None
        self._txpool_supported = True
        self._pending_raw: list[Any] = []
        self._wake = asyncio.Event()
        self._gap = False  # the subscription (re)started or ended: reconcile at once
        self._logged: set[str] = set()
        self._saved_revision = -1  # the tracker revision in the state file
        self._saved_at = -math.inf  # monotonic
        self._saving: asyncio.Task[None] | None = None
        self._refetch_from: int | None = None  # first block to fetch again after a restore

    def on_chain(self, records: list[Block | Reorg]) -> None:
        """Listener for the block collector: inclusions and re-queues. It may start the
        tracker: the block collector can backfill before `run` sees the chain id, and
        those blocks hold the restored txs mined while the collector was down."""
        tracker = self.tracker
        if tracker is None and self.rpc.chain_id is not None:
            tracker = self._start_tracker(self.rpc.chain_id)
        if tracker is not None:
            self._queue(tracker.on_blocks(records, self.clock()))

    def _start_tracker(self, chain_id: int) -> MempoolTracker:
        self.tracker = MempoolTracker(
            chain_id,
            self.node,
            max_tracked=self.config.max_tracked,
            grace_seconds=self.config.drop_grace,
        )
        if self.state is not None:
            self._queue(self._restore(self.tracker))
        return self.tracker

    def _restore(self, tracker: MempoolTracker) -> list[TxLifecycle]:
        """The txs the last run saved, and those its journal holds; an unreadable or
        foreign file is a counted warning and a fresh start (it is overwritten at the first
        save), never a crash loop."""
        assert self.state is not None and self.journal is not None
        chain_id = tracker.chain_id
        name = self.state.path(chain_id, self.node).name
        generations = [g for g, _ in self.journal.generations(chain_id, self.node)]
        self._journal_generation = max(generations, default=0) + 1
        try:
            data = self.state.read(chain_id, self.node)
            out: list[TxLifecycle] = (tracker.restore(data, self.clock())
                                      if data is not None else [])
            first = (data or {}).get("journal_from") or 0
            if type(first) is not int or first < 0:
                raise ValueError(f"mempool state: journal_from {first!r} is not a generation")
            lines = self.journal.read(chain_id, self.node, first)
        except (ConfigError, ValueError) as exc:
            self.metrics.collector_errors.labels(self.node, "malformed").inc()
            log.warning("mempool state ignored, starting fresh",
                        extra={"node": self.node, "file": name, "error": str(exc)})
            return []
        journaled = self._track_journaled(tracker, lines, out)
        if data is not None or journaled:
            log.info("mempool state restored", extra={
                "node": self.node, "file": name, "tracked": tracker.tracked_count,
                "journaled": journaled, "expired": len(out), "head": tracker.restored_head})
            if tracker.restored_head is not None and tracker.tracked_count:
                self._refetch_from = tracker.restored_head + 1
        return out

    def _track_journaled(self, tracker: MempoolTracker, lines: list[bytes],
                         out: list[TxLifecycle]) -> int:
        """Track the journal's txs again, as announcements already published: their
        `pending_tx` records are not sent twice, a replacement's `replaced` record is (with
        its event id: a duplicate for consumers). A line a kill cut short is a counted skip."""
        tracked, bad = 0, 0
        for line in lines:
            try:
                tx = decode(line)
            except InvalidRecord:
                bad += 1
                continue
            if not isinstance(tx, PendingTx) or (tx.chain_id, tx.node) != (tracker.chain_id,
                                                                           self.node):
                bad += 1
                continue
            records = tracker.on_pending(tx)
            tracked += bool(records)
            out.extend(r for r in records if isinstance(r, TxLifecycle))
        if bad:
            self._error("malformed", f"{bad} unreadable line(s) in the mempool journal skipped")
        return tracked

    def _journal_sent(self, records: list[AnyRecord], payloads: list[bytes]) -> None:
        """The outbox's hook: append the acknowledged announcements to the journal."""
        tracker = self.tracker
        if self.journal is None or tracker is None:
            return
        lines = [p for r, p in zip(records, payloads, strict=True) if isinstance(r, PendingTx)]
        try:
            self.journal.append(tracker.chain_id, self.node, self._journal_generation, lines)
        except OSError as exc:  # disk full, state dir gone: counted; the state still saves
            self._error("internal", f"cannot append to the mempool journal: {exc}")

    async def _seed_head(self) -> None:
        """Before the first listing, with no block delivered yet: the node's head. Every tx
        listed or announced from now on is mined after it, so a state saved before the
        first delivery still says where to fetch blocks again after a kill."""
        tracker = self.tracker
        assert tracker is not None
        if tracker.head_number is None:
            try:
                head = await self.rpc.latest_number()
            except RpcError as exc:  # the first delivery sets it; until then no head is saved
                self._error("rpc", f"eth_blockNumber for the mempool state: {exc}")
                return
            except Exception as exc:  # nothing foreseen: counted, and the collector goes on
                self._error("internal", repr(exc), exc_info=exc)
                return
            if tracker.head_number is None:  # no delivery meanwhile
                tracker.head_number = head

    async def _refetch_blocks(self, stop: asyncio.Event) -> None:
        """Deliver the blocks after the restored state's head to the tracker once, up to the
        node's head or the first height the block collector has delivered since (it goes
        on from there). Drops are not judged until this is done; RPC failures are
        counted and retried."""
        tracker = self.tracker
        assert tracker is not None and self._refetch_from is not None
        start = self._refetch_from
        end: int | None = None  # the last height to fetch, set at the node's first answer
        while self._refetch_from is not None and not stop.is_set():
            try:
                latest = await self.rpc.latest_number()
                if end is None:
                    end = min(latest, start + MAX_REFETCH_BLOCKS - 1)
                for number in range(self._refetch_from, end + 1):
                    if tracker.has_block_at(number):
                        break  # the block collector goes on from here
                    block = await self.rpc.block_by_number(number)
                    if block is not None:
                        self._queue(tracker.on_refetched_block(block, self.clock()))
                    self._refetch_from = number + 1
                else:
                    if latest > end:
                        self._once("refetch", f"the mempool state is {latest - start + 1} "
                                   f"blocks old; only {MAX_REFETCH_BLOCKS} fetched again: "
                                   "restored txs mined later may be reported dropped")
                self._refetch_from = None
            except RpcError as exc:
                self._error("malformed" if isinstance(exc, MalformedRpcPayload) else "rpc",
                            f"refetching blocks after the mempool state: {exc}")
                await asyncio.sleep(self.config.poll_interval)

    async def run(self, stop: asyncio.Event) -> None:
        while self.rpc.chain_id is None and not stop.is_set():  # the block collector connects
            await asyncio.sleep(0.2)
        if stop.is_set():
            return
        chain_id = self.rpc.chain_id
        assert chain_id is not None
        if self.tracker is None:  # before the first listing: absent restored txs get dropped
            self._start_tracker(chain_id)
        await self._seed_head()
        flusher = asyncio.create_task(self.outbox.flush_forever(lambda m: self._error("bus", m)))
        tasks = [
            asyncio.create_task(self._poll_loop(stop)),
            asyncio.create_task(self._drain_loop(stop)),
        ]
        if self._refetch_from is not None:
            tasks.append(asyncio.create_task(self._refetch_blocks(stop)))
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
            await self._close(flusher)

    async def _close(self, flusher: asyncio.Task[None]) -> None:
        """Let the bus take what is queued (within `final_flush_timeout`), then save the
        tracked txs if it took everything; else the last saved state stands."""
        deadline = time.monotonic() + self.config.final_flush_timeout
        while len(self.outbox) and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        flusher.cancel()
        await asyncio.gather(flusher, return_exceptions=True)
        if self._saving is not None:
            await asyncio.gather(self._saving, return_exceptions=True)
        final = self._start_save()
        if final is not None:
            await asyncio.gather(final, return_exceptions=True)

    def _save_if_due(self) -> None:
        """The outbox's idle hook (and each poll round): save at most every save_interval."""
        if time.monotonic() - self._saved_at >= self.config.save_interval:
            self._start_save()

    def _start_save(self) -> asyncio.Task[None] | None:
        """Export now, if the tracked set changed and nothing queued is unacknowledged
        (so no fate in the export is still waiting for the bus); write it in a thread."""
        tracker = self.tracker
        # during a refetch the state's head would skip blocks not given to the tracker yet
        if (self.state is None or tracker is None or len(self.outbox)
                or tracker.revision == self._saved_revision
                or (self._saving is not None and not self._saving.done())
                or self._refetch_from is not None):
            return None
        state = tracker.state()  # now; encoded and written in a thread
        # announcements acknowledged from now on are not in `state`: a new generation
        self._journal_generation += 1
        self._saved_revision, self._saved_at = tracker.revision, time.monotonic()
        self._saving = asyncio.get_running_loop().create_task(
            self._write(tracker.chain_id, state, self._journal_generation))
        return self._saving

    async def _write(self, chain_id: int, state: TrackerState, journal_from: int) -> None:
        """Encode and save off the event loop (~0.15 s for 50k txs); then the journal
        generations the state covers go."""
        store, journal = self.state, self.journal
        assert store is not None and journal is not None

        def save() -> None:
            store.save(chain_id, self.node,
                       state_document(chain_id, self.node, state, journal_from))
            journal.drop_before(chain_id, self.node, journal_from)

        try:
            await asyncio.to_thread(save)
        except Exception as exc:  # disk full, state dir gone: counted, retried at the next save
            self._saved_revision = -1
            self._error("internal", f"cannot save the mempool state: {exc}")

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
        self.outbox.put_nowait(out)

    def _queue(self, records: Sequence[AnyRecord]) -> None:
        # at once, not in a task: a save in between would see the tracker's change with
        # its record not yet queued, and run ahead of the bus
        self.outbox.put_nowait(records)

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
            self._save_if_due()
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
        if self._refetch_from is None and await self._delivered_through_head():
            # A tx gone from the pool may be in a block not delivered yet: while the block
            # collector fails (a node answering garbage for blocks only), backfills or lags
            # behind the listing, or the blocks after a restored state are not fetched
            # again yet, judging drops would call mined txs dropped once the grace ran out.
            self._queue(self.tracker.on_pool_contents(hashes, now))

    async def _delivered_through_head(self) -> bool:
        """The tracker has been given every block the node had when the pool was listed
        (asked after the listing): a tx gone from that listing is in one of them, or was
        dropped. The block collector's own view of the node's head can be a poll old."""
        assert self.tracker is not None
        delivered = self.tracker.head_number
        return delivered is not None and delivered >= await self.rpc.latest_number()

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
        self.outbox.put_nowait([self.tracker.snapshot(now, pending, queued, source)])

    def _error(self, kind: str, message: str, exc_info: BaseException | None = None) -> None:
        self.metrics.collector_errors.labels(self.node, kind).inc()
        self._once(kind, message, exc_info)

    def _once(self, key: str, message: str, exc_info: BaseException | None = None) -> None:
        if key not in self._logged:  # log once per kind; the counter counts every one
            self._logged.add(key)
            log.warning("mempool collector", extra={"node": self.node, "kind": key,
                                                     "error": message}, exc_info=exc_info)
