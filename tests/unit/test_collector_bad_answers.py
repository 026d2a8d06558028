"""A node answering garbage: every bad answer is counted with its reason, none is followed.

Regression cases for what the node fault suite (tests/integration/test_faults_node.py)
found; each fails on the code before its fix.
"""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import aiohttp
import pytest
import yarl
from multidict import CIMultiDict, CIMultiDictProxy

from chainwatch.bus import EmbeddedBus, Topics
from chainwatch.exceptions import MalformedRpcPayload, RpcError, RpcMethodUnsupported
from chainwatch.httpserver import Health
from chainwatch.metrics import Metrics
from chainwatch.schema import Block, Reorg, decode
from collector.chain import ChainFollower, ChainTracker
from collector.checkpoint import FileCheckpointStore
from collector.mappers import map_block
from collector.mempool_service import MempoolCollector, MempoolConfig
from collector.rpc import NodeRpc
from collector.service import BlockCollector, CollectorConfig
from tests.fakes import FakeChain
from tests.unit.test_collector_faults import FlakyNode, delivered, run_collector

HASH_A = "0x" + "aa" * 32
HASH_B = "0x" + "bb" * 32
URL = yarl.URL("http://127.0.0.1:1")
REQUEST = aiohttp.RequestInfo(URL, "POST", CIMultiDictProxy(CIMultiDict()), URL)


def raw_block(height: int, block_hash: str = HASH_A, **changes: Any) -> dict[str, Any]:
    raw = {
        "number": hex(height), "hash": block_hash, "parentHash": "0x" + "01" * 32,
        "timestamp": "0x6553f100", "miner": "0x" + "03" * 20, "gasUsed": "0x0",
        "gasLimit": "0x1c9c380", "transactions": [],
    }
    raw.update(changes)
    return raw


class ScriptedRpc(NodeRpc):
    """A NodeRpc whose transport answers from a script instead of the network."""

    def __init__(self, answers: list[Any]) -> None:
        self.reasons: list[str] = []
        super().__init__("http://127.0.0.1:1", node="n", on_error=self.reasons.append)
        self.chain_id = 1
        self.answers = answers

        async def make_request(method: str, params: list[Any]) -> Any:
            answer = self.answers.pop(0)
            if isinstance(answer, BaseException):
                raise answer
            return answer

        self._provider.make_request = make_request  # type: ignore[method-assign]


def call(rpc: NodeRpc, method: str = "eth_blockNumber") -> Any:
    return asyncio.run(rpc.call(method, []))


@pytest.mark.parametrize(
    ("failure", "reason"),
    [
        (TimeoutError(), "timeout"),
        (aiohttp.ClientResponseError(REQUEST, (), status=502), "http_status"),
        (json.JSONDecodeError("Expecting value", "<html>", 0), "invalid_json"),
        (UnicodeDecodeError("utf-8", b"\xff", 0, 1, "invalid start byte"), "invalid_json"),
        (aiohttp.ClientConnectionError("refused"), "unreachable"),
        (ConnectionResetError(), "unreachable"),
    ],
)
def test_a_call_without_an_answer_is_an_rpc_error_counted_with_its_reason(failure, reason):
    rpc = ScriptedRpc([failure])
    with pytest.raises(RpcError):
        call(rpc)
    assert rpc.reasons == [reason]


@pytest.mark.parametrize(
    ("answer", "reason"),
    [
        ({"jsonrpc": "2.0", "id": 1, "error": {"code": -32000, "message": "header not found"}},
         "error_response"),
        ([1, 2], "malformed"),
        ({"jsonrpc": "2.0", "id": 1}, "malformed"),
    ],
)
def test_an_unusable_answer_is_counted_with_its_reason(answer, reason):
    rpc = ScriptedRpc([answer])
    with pytest.raises(RpcError):
        call(rpc)
    assert rpc.reasons == [reason]


def test_a_transient_error_that_says_not_available_does_not_mean_unsupported():
    """It did: txpool polling (and so drop detection) stopped for good after one such answer."""
    answer = {"jsonrpc": "2.0", "id": 1, "error": {
        "code": -32000, "message": "missing trie node 5f1c (path ): state is not available"}}
    rpc = ScriptedRpc([answer])
    with pytest.raises(RpcError) as caught:
        call(rpc, "txpool_content")
    assert not isinstance(caught.value, RpcMethodUnsupported)
    assert rpc.reasons == ["error_response"]


@pytest.mark.parametrize(
    "error",
    [
        {"code": -32601, "message": "Method not found"},
        {"code": -32000, "message": "the method txpool_content does not exist/is not available"},
    ],
)
def test_an_unsupported_method_is_recognised_and_not_counted_as_a_bad_answer(error):
    rpc = ScriptedRpc([{"jsonrpc": "2.0", "id": 1, "error": error}])
    with pytest.raises(RpcMethodUnsupported):
        call(rpc, "txpool_content")
    assert rpc.reasons == []


def test_a_block_for_another_height_is_refused_not_followed():
    """It was followed: the tracker took it for a fork and published a false reorg."""
    rpc = ScriptedRpc([{"result": raw_block(6)}])
    with pytest.raises(MalformedRpcPayload, match="answered block 6"):
        asyncio.run(rpc.block_by_number(7))
    assert rpc.reasons == ["wrong_block"]


def test_a_block_with_another_hash_is_refused():
    rpc = ScriptedRpc([{"result": raw_block(6, HASH_B)}])
    with pytest.raises(MalformedRpcPayload):
        asyncio.run(rpc.block_by_hash(HASH_A))
    assert rpc.reasons == ["wrong_block"]
    rpc = ScriptedRpc([{"result": raw_block(6, HASH_A)}])
    assert asyncio.run(rpc.block_by_hash(HASH_A.upper().replace("0X", "0x"))) is not None


def test_a_malformed_block_is_counted_as_malformed():
    rpc = ScriptedRpc([{"result": raw_block(6, **{"number": "0xzz"})}])
    with pytest.raises(MalformedRpcPayload):
        asyncio.run(rpc.block_by_number(6))
    assert rpc.reasons == ["malformed"]


@pytest.mark.parametrize(
    ("field", "value"),
    [("hash", "0xdeadbeef"), ("parentHash", "0x" + "01" * 31), ("miner", "0x" + "03" * 21)],
)
def test_block_hashes_and_miner_must_have_their_length(field, value):
    """A short hash was published as a block; the next block then looked like a fork."""
    with pytest.raises(MalformedRpcPayload, match=field):
        map_block(raw_block(1, **{field: value}), chain_id=1, node="n", observed_at=1.0)


class BuggyNode(FlakyNode):
    """Raises what no except clause names, as a mapper or tracker bug would."""

    def __init__(self, length: int, bugs: int) -> None:
        super().__init__(length, [])
        self.bugs = bugs

    async def latest_number(self) -> int:
        if self.bugs:
            self.bugs -= 1
            raise TypeError("'NoneType' object is not subscriptable")
        return await super().latest_number()


def test_an_unexpected_exception_is_a_counted_retry_not_a_dead_collector(tmp_path):
    """It ended the collector (and the process): under a supervisor, a crash loop."""
    node = BuggyNode(12, bugs=3)
    bus = EmbeddedBus()
    consumer = bus.consumer([Topics().blocks], "test")
    metrics = run_collector(node, bus, tmp_path, seconds=2.0)
    assert sorted(set(delivered(consumer))) == list(range(12))
    assert metrics.registry.get_sample_value(
        "chainwatch_collector_errors_total", {"node": "flaky", "kind": "internal"}) == 3


def test_reorg_records_are_counted_by_whether_the_ancestor_was_found(tmp_path):
    chain = FakeChain(20)
    chain.forget_side_blocks = True
    node = FlakyNode(1, [])
    node.by_hash, node.canonical = chain.by_hash, chain.canonical
    metrics = Metrics()
    collector = BlockCollector(
        node, EmbeddedBus(), Topics(), FileCheckpointStore(tmp_path), metrics,  # type: ignore[arg-type]
        Health(time.time), CollectorConfig(poll_interval=0.01, start_block=0, window=4),
    )

    async def main() -> None:
        await collector.start()
        await collector.catch_up()
        chain.reorg(2)
        await collector.catch_up()
        chain.reorg(6)  # below the window of 4, and the node forgot the old blocks
        await collector.catch_up()

    asyncio.run(main())
    for ancestor, count in (("found", 1), ("unknown", 1)):
        assert metrics.registry.get_sample_value(
            "chainwatch_collector_reorgs_total",
            {"chain_id": "1", "node": "flaky", "ancestor": ancestor}) == count


def test_an_unknown_ancestor_still_delivers_every_new_block_within_the_limit():
    """Block 24 of the new branch was never delivered: the detector kept the old one."""
    chain = FakeChain(30)
    chain.forget_side_blocks = True
    follower = ChainFollower(chain, ChainTracker(4), chain_id=1, node="n1", start_block=0,
                             max_reorg_depth=10)
    while asyncio.run(follower.step()):
        pass
    chain.reorg(6)  # ancestor 23; the window holds 26..29 and the parent hash of 26
    records = asyncio.run(follower.step())
    reorg = records[0]
    assert isinstance(reorg, Reorg) and not reorg.ancestor_found
    blocks = [r for r in records[1:] if isinstance(r, Block)]
    assert [b.number for b in blocks] == list(range(20, 30))  # max_reorg_depth blocks
    assert all(chain.canonical[b.number].hash == b.hash for b in blocks)


def test_the_mempool_poll_loop_survives_an_unexpected_exception():
    """A dead poll task would have stopped pending-tx polling and drop detection silently."""

    class Rpc:
        node = "n"
        chain_id = 1
        calls = 0

        async def latest_number(self) -> int:
            return 0

        async def call(self, method: str, params: list[Any]) -> Any:
            Rpc.calls += 1
            if Rpc.calls <= 2:
                raise KeyError("pending")
            if method == "txpool_status":
                return {"pending": "0x0", "queued": "0x0"}
            return {"pending": {}, "queued": {}}

    metrics = Metrics()
    bus = EmbeddedBus()
    consumer = bus.consumer([Topics().mempool], "test")
    mempool = MempoolCollector(
        Rpc(), bus, Topics(), metrics,  # type: ignore[arg-type]
        MempoolConfig(poll_interval=0.01, snapshot_interval=0.01, reconcile_interval=0.01),
    )

    async def main() -> None:
        stop = asyncio.Event()
        asyncio.get_running_loop().call_later(1.0, stop.set)
        await mempool.run(stop)

    asyncio.run(main())
    assert metrics.registry.get_sample_value(
        "chainwatch_collector_errors_total", {"node": "n", "kind": "internal"}) == 2
    snapshots = [decode(m.value) for m in consumer.poll(0.01, 1000)]
    assert snapshots, "the loop went on polling after the exceptions"


def test_a_node_back_with_a_new_genesis_drops_the_old_genesis_too():
    """The old block 0 was left out of the dropped hashes and the depth (one short)."""
    chain = FakeChain(6)
    follower = ChainFollower(chain, ChainTracker(64), chain_id=1, node="n1", start_block=0)
    while asyncio.run(follower.step()):
        pass
    old = [b.hash for b in chain.canonical]
    fresh = FakeChain(1)  # restarted from a new genesis, not mined on yet
    fresh.canonical[0] = fresh.canonical[0].model_copy(update={"hash": "0x" + "ee" * 32})
    follower.source = fresh
    reorg = asyncio.run(follower.step())[0]
    assert isinstance(reorg, Reorg) and not reorg.ancestor_found
    assert reorg.depth == 6
    assert list(reorg.dropped_block_hashes) == old


class _EmptyPool:
    """A node whose pool is empty; counts the full listings (txpool_content) asked for."""

    node = "n"
    chain_id = 1

    def __init__(self) -> None:
        self.listings = 0

    async def latest_number(self) -> int:
        return 0

    async def call(self, method: str, params: list[Any]) -> Any:
        if method == "txpool_status":
            return {"pending": "0x0", "queued": "0x0"}
        self.listings += 1
        return {"pending": {}, "queued": {}}


class _Live:
    """A subscription that is connected: listings come only from the reconcile timer."""

    connected = True


def test_a_subscription_gap_lists_the_pool_at_once():
    """Txs sent while the subscription was down waited for the next reconcile (30 s)
    and, if mined meanwhile, were never seen pending."""

    rpc = _EmptyPool()
    mempool = MempoolCollector(
        rpc, EmbeddedBus(), Topics(), Metrics(),  # type: ignore[arg-type]
        MempoolConfig(poll_interval=0.05, snapshot_interval=3600, reconcile_interval=3600),
    )
    mempool.subscription = _Live()  # type: ignore[assignment]

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        loop.call_later(0.5, mempool._on_gap)
        loop.call_later(1.0, stop.set)
        await mempool.run(stop)

    asyncio.run(main())
    assert rpc.listings == 2  # the first round, then the gap


def test_pool_listings_follow_the_collectors_clock():
    """The reconcile interval ran on the wall clock while the drop grace ran on the
    collector's clock: on the scenario runner's faster session clock a pool listing came
    every ~17 blocks, so lost txs looked pending (and censored) for that long."""

    rpc = _EmptyPool()
    session = {"now": 1000.0}

    def clock() -> float:  # ten session seconds per poll round
        session["now"] += 10.0
        return session["now"]

    mempool = MempoolCollector(
        rpc, EmbeddedBus(), Topics(), Metrics(),  # type: ignore[arg-type]
        MempoolConfig(poll_interval=0.02, snapshot_interval=3600, reconcile_interval=30),
        clock=clock,
    )
    mempool.subscription = _Live()  # type: ignore[assignment]

    async def main() -> None:
        stop = asyncio.Event()
        asyncio.get_running_loop().call_later(0.5, stop.set)
        await mempool.run(stop)

    asyncio.run(main())
    # ~25 rounds of 10 session seconds (a few clock reads each): a listing every 30 s of
    # session time, not one per 30 s of wall time
    assert rpc.listings >= 3
