"""The peer collector: net_peerCount always, admin_peers where the node allows it."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable

from chainwatch.bus import Bus, Topics
from chainwatch.exceptions import MalformedRpcPayload, RpcError, RpcMethodUnsupported
from chainwatch.metrics import Metrics
from collector.peers import PeerTracker
from collector.publishing import Outbox
from collector.rpc import NodeRpc

log = logging.getLogger("chainwatch.collector.peers")


class PeerCollector:
    def __init__(
        self,
        rpc: NodeRpc,
        bus: Bus,
        topics: Topics,
        metrics: Metrics,
        *,
        interval: float = 15.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.rpc = rpc
        self.node = rpc.node
        self.metrics = metrics
        self.interval = interval
        self.clock = clock
        self.outbox = Outbox(bus, topics.peers, max_records=10_000)
        self.admin_allowed = True
        self._logged: set[str] = set()

    async def run(self, stop: asyncio.Event) -> None:
        while self.rpc.chain_id is None and not stop.is_set():
            await asyncio.sleep(0.2)
        if stop.is_set():
            return
        assert self.rpc.chain_id is not None
        tracker = PeerTracker(self.rpc.chain_id, self.node)
        flusher = asyncio.create_task(
            self.outbox.flush_forever(lambda m: self._error("bus", m), linger=0)
        )
        try:
            while not stop.is_set():
                try:
                    try:
                        count = await self.rpc.call("net_peerCount", [])
                    except RpcMethodUnsupported as exc:
                        # dev nodes (anvil) have no p2p at all: nothing to watch here
                        self._once("net", f"net_peerCount unavailable, peers not followed: {exc}")
                        return
                    peers = None
                    if self.admin_allowed:
                        try:
                            peers = await self.rpc.call("admin_peers", [])
                        except RpcMethodUnsupported as exc:
                            self.admin_allowed = False
                            self._once("admin", f"admin_peers unavailable, counts only: {exc}")
                    await self.outbox.put([tracker.observe(count, peers, self.clock())])
                except RpcError as exc:
                    kind = "malformed" if isinstance(exc, MalformedRpcPayload) else "rpc"
                    self._error(kind, str(exc))
                except Exception as exc:  # never end the loop: the next poll may be fine
                    self._error("internal", repr(exc), exc_info=exc)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), timeout=self.interval)
        finally:
            flusher.cancel()
            await asyncio.gather(flusher, return_exceptions=True)

    def _error(self, kind: str, message: str, exc_info: BaseException | None = None) -> None:
        self.metrics.collector_errors.labels(self.node, kind).inc()
        self._once(kind, message, exc_info)

    def _once(self, key: str, message: str, exc_info: BaseException | None = None) -> None:
        if key not in self._logged:
            self._logged.add(key)
            log.warning("peer collector", extra={"node": self.node, "kind": key,
                                                  "error": message}, exc_info=exc_info)
