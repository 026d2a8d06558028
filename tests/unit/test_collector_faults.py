"""The block collector keeps going through every kind of node failure, and counts each."""

from __future__ import annotations

import asyncio
import time

from chainwatch.bus import EmbeddedBus, Topics
from chainwatch.exceptions import BusError, MalformedRpcPayload, RpcError
from chainwatch.httpserver import Health
from chainwatch.metrics import Metrics
from chainwatch.schema import Block, decode
from collector.checkpoint import FileCheckpointStore
from collector.service import BlockCollector, CollectorConfig
from tests.fakes import FakeChain


class FlakyNode(FakeChain):
    """A FakeChain behind an RPC-like face that fails on a schedule."""

    def __init__(self, length: int, failures: list[Exception | None]) -> None:
        super().__init__(length)
        self.node = "flaky"
        self.url = "http://127.0.0.1:1/SECRET"
        self.chain_id: int | None = None
        self.failures = failures

    def _maybe_fail(self) -> None:
        if self.failures:
            failure = self.failures.pop(0)
            if failure is not None:
                raise failure

    async def fetch_chain_id(self) -> int:
        self.chain_id = 1
        return 1

    async def block_by_number(self, number: int) -> Block | None:
        self._maybe_fail()
        return await super().block_by_number(number)

    async def close(self) -> None:
        return None


class FlakyBus(EmbeddedBus):
    def __init__(self, fail_flushes: int) -> None:
        super().__init__()
        self.fail_flushes = fail_flushes

    def flush(self, timeout: float = 30.0) -> None:
        if self.fail_flushes:
            self.fail_flushes -= 1
            raise BusError("broker unavailable")


def run_collector(node: FlakyNode, bus: EmbeddedBus, tmp_path, seconds: float) -> Metrics:
    metrics = Metrics()
    collector = BlockCollector(
        node, bus, Topics(), FileCheckpointStore(tmp_path), metrics, Health(time.time),  # type: ignore[arg-type]
        CollectorConfig(poll_interval=0.01, start_block=0, batch_size=5, retry_backoff=0.05),
    )

    async def main() -> None:
        stop = asyncio.Event()
        asyncio.get_running_loop().call_later(seconds, stop.set)
        await collector.run(stop)

    asyncio.run(main())
    return metrics


def delivered(consumer) -> list[int]:
    numbers = []
    while batch := consumer.poll(0.01, 1000):
        numbers += [r.number for r in map(decode, (m.value for m in batch)) if isinstance(r, Block)]
    return numbers


def test_timeouts_rpc_errors_and_malformed_payloads_are_counted_and_nothing_is_skipped(tmp_path):
    failures: list[Exception | None] = [
        None, None, RpcError("timeout"), None, RpcError("error -32000: busy"), None,
        MalformedRpcPayload("missing field hash"), None, None, RpcError("refused")]
    node = FlakyNode(30, failures)
    bus = EmbeddedBus()
    consumer = bus.consumer([Topics().blocks], "test")
    metrics = run_collector(node, bus, tmp_path, seconds=3.0)
    numbers = delivered(consumer)
    assert sorted(set(numbers)) == list(range(30)), "every height, no gap"
    for kind, expected in (("rpc", 3), ("malformed", 1)):
        assert metrics.registry.get_sample_value(
            "chainwatch_collector_errors_total", {"node": "flaky", "kind": kind}) == expected
    assert metrics.registry.get_sample_value(
        "chainwatch_collector_checkpoint_block_number", {"chain_id": "1", "node": "flaky"}) == 29


def test_bus_failures_hold_the_checkpoint_and_the_blocks_are_sent_again(tmp_path):
    node = FlakyNode(12, [])
    bus = FlakyBus(fail_flushes=3)
    consumer = bus.consumer([Topics().blocks], "test")
    metrics = run_collector(node, bus, tmp_path, seconds=3.0)  # backoff 0.05, 0.1, 0.2 s
    numbers = delivered(consumer)
    assert set(numbers) == set(range(12))
    assert metrics.registry.get_sample_value(
        "chainwatch_collector_errors_total", {"node": "flaky", "kind": "bus"}) == 3
    saved = FileCheckpointStore(tmp_path).load(1, "flaky")
    assert saved is not None and saved["refs"][-1][0] == 11


class BrokerGoesAway(EmbeddedBus):
    """Acknowledges the first `ok` flushes, then refuses every one (a broker that died)."""

    def __init__(self, ok: int) -> None:
        super().__init__()
        self.ok = ok

    def flush(self, timeout: float = 30.0) -> None:
        if self.ok <= 0:
            raise BusError("broker unavailable")
        self.ok -= 1


def test_a_refused_heartbeat_keeps_an_idle_collector_unready(tmp_path):
    """No new blocks: the heartbeat is the only publish. The broker refusing it is a failed
    round (counted, not ready), not a "recovered" collector every status interval."""
    node = FlakyNode(5, [])
    bus = BrokerGoesAway(ok=2)  # the blocks and the first heartbeat
    health = Health(time.time)
    metrics = Metrics()
    collector = BlockCollector(
        node, bus, Topics(), FileCheckpointStore(tmp_path), metrics, health,  # type: ignore[arg-type]
        CollectorConfig(poll_interval=0.01, start_block=0, batch_size=5, retry_backoff=0.05,
                        max_retry_backoff=0.1, status_interval=0.05),
    )

    async def main() -> None:
        stop = asyncio.Event()
        asyncio.get_running_loop().call_later(1.5, stop.set)
        await collector.run(stop)

    asyncio.run(main())
    ready, _ = health.ready()
    assert not ready
    bus_errors = metrics.registry.get_sample_value(
        "chainwatch_collector_errors_total", {"node": "flaky", "kind": "bus"})
    assert bus_errors is not None and bus_errors >= 3
