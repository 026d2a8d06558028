"""Node faults on real servers, each ending with an exact account of blocks and pending txs.

A node restarted with a fresh chain, a node answering errors and garbage for a while,
its WebSocket cut and refused, a reorg while the collector is down, and a reorg deeper
than the collector's window. After each, every block height and every pending tx the
node produced is delivered (to the detector, or on the blocks topic) or counted with a
reason; duplicates appear only where at-least-once delivery allows, and are counted
where the detector drops them.

The misbehaving node is anvil behind `NodeProxy`, a loopback HTTP + WebSocket proxy in
this file. Figures are printed (run with -s); docs/reliability.md quotes them.
"""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from chainwatch.local.anvil import Anvil
from chainwatch.local.kafka import KafkaBroker
from chainwatch.local.procs import LOCALHOST
from chainwatch.schema import Block, Reorg, decode
from tests.integration.conftest import chain_view, free_port, metric, rpc, wait_until
from tests.integration.test_spine import LABELS, canonical_hashes, head, node_args

pytestmark = pytest.mark.integration

NODE = {"node": "anvil1"}
RPC_REASONS = ("unreachable", "timeout", "http_status", "invalid_json", "error_response",
               "malformed", "wrong_block")
FATES = ("included", "replaced", "dropped", "requeued")
# pending txs polled fast, and dropped as soon as a pool listing lacks them
FAST_MEMPOOL = {
    "CHAINWATCH_MEMPOOL_POLL_INTERVAL": "0.5",
    "CHAINWATCH_MEMPOOL_SNAPSHOT_INTERVAL": "1",
    "CHAINWATCH_MEMPOOL_RECONCILE_INTERVAL": "1",
    "CHAINWATCH_MEMPOOL_DROP_GRACE": "0",
}
BLOCK_METHODS = ("eth_getBlockByNumber", "eth_getBlockByHash")
ERROR_ANSWERS = (
    (-32000, "header not found"),
    (-32603, "internal error"),
    (-32005, "request rate exceeded"),
)
# geth's answer when state is pruned; it once made chainwatch stop txpool polling for good
NOT_AVAILABLE = (-32000, "missing trie node 5f1c (path ): state is not available")
NOT_JSON = (
    b'{"jsonrpc": "2.0", "id": 1, "result": {"number": "0x',
    b"<html><body>upstream busy</body></html>",
    b"",
    b"\xff\xfe\x00garbage",
)
STALL_SECONDS = 6.0
RPC_TIMEOUT = "3"


class NodeProxy:
    """A loopback JSON-RPC (HTTP + WebSocket) proxy in front of anvil that misbehaves on
    demand. It counts what it did, so the test can compare with what chainwatch counted.

    HTTP `mode` (named after the `reason` chainwatch should count): `pass`,
    `error_response` (JSON-RPC errors), `invalid_json` (truncated JSON, HTML, nothing,
    bytes), `http_status` (502), `unreachable` (hangs up), `timeout` (answers too late),
    `malformed` (blocks with a field missing or not hex, a short hash...), `wrong_block`
    (another block than asked). Block modes garble the block methods only, and only
    when there is a block to garble. WebSocket: cut (no close frame), refuse upgrades,
    close cleanly, or send a frame that is not JSON.
    """

    def __init__(self, node: Anvil) -> None:
        self.upstream, self.upstream_ws = node.http_url, node.ws_url
        self.mode = "pass"
        self.refuse_ws = False
        self.served: Counter[str] = Counter()
        self.ws_events: Counter[str] = Counter()  # accepted, refused, cut, closed, garbage
        self.port = 0
        self._sockets: dict[web.WebSocketResponse, web.Request] = {}
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True,
                                        name="node-proxy")

    @property
    def http_url(self) -> str:
        return f"http://{LOCALHOST}:{self.port}"

    @property
    def ws_url(self) -> str:
        return f"ws://{LOCALHOST}:{self.port}"

    def start(self) -> NodeProxy:
        self._thread.start()
        self.port = self._call(self._start())
        return self

    def stop(self) -> None:
        if self._thread.is_alive():
            self._call(self._stop())
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout=10)

    def cut_websockets(self) -> None:
        self._call(self._each_socket("cut"))

    def close_websockets(self) -> None:
        self._call(self._each_socket("closed"))

    def send_garbage_frames(self) -> None:
        self._call(self._each_socket("garbage"))

    def ws_errors(self) -> int:
        """WebSocket failures chainwatch should have counted, one per socket or refusal."""
        return sum(self.ws_events[k] for k in ("refused", "cut", "closed", "garbage"))

    def _call(self, coro: Coroutine[Any, Any, Any]) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout=30)

    async def _start(self) -> int:
        self._session = aiohttp.ClientSession()
        app = web.Application()
        app.router.add_route("*", "/", self._handle)
        self._runner = web.AppRunner(app, handle_signals=False, access_log=None,
                                     shutdown_timeout=1)
        await self._runner.setup()
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.bind((LOCALHOST, 0))
        await web.SockSite(self._runner, sock).start()
        return int(sock.getsockname()[1])

    async def _stop(self) -> None:
        for request in self._sockets.values():
            if request.transport is not None:
                request.transport.abort()
        await self._runner.cleanup()
        await self._session.close()

    async def _each_socket(self, what: str) -> None:
        for ws, request in list(self._sockets.items()):
            self.ws_events[what] += 1
            if what == "cut" and request.transport is not None:
                request.transport.abort()
            elif what == "closed":
                await ws.close(code=1001, message=b"going away")
            elif what == "garbage":
                await ws.send_str("}{ not json")

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        if request.headers.get("Upgrade", "").lower() == "websocket":
            return await self._websocket(request)
        body = await request.read()
        try:
            call = json.loads(body)
            method, call_id = str(call.get("method")), call.get("id")
        except (ValueError, AttributeError):
            method, call_id = "", None
        mode = self.mode
        n = self.served[mode]
        if mode == "error_response":
            self.served[mode] += 1
            code, message = (NOT_AVAILABLE if method.startswith("txpool_")
                             else ERROR_ANSWERS[n % len(ERROR_ANSWERS)])
            error = {"code": code, "message": message}
            return web.json_response({"jsonrpc": "2.0", "id": call_id, "error": error})
        if mode == "invalid_json":
            self.served[mode] += 1
            return web.Response(body=NOT_JSON[n % len(NOT_JSON)],
                                content_type="application/json")
        if mode == "http_status":
            self.served[mode] += 1
            return web.Response(status=502, text="<html>502 Bad Gateway</html>",
                                content_type="text/html")
        if mode == "unreachable":
            self.served[mode] += 1
            assert request.transport is not None
            request.transport.abort()
            return web.Response()
        if mode == "timeout":
            self.served[mode] += 1
            await asyncio.sleep(STALL_SECONDS)
        answer = await self._forward(body)
        if (mode in ("malformed", "wrong_block") and method in BLOCK_METHODS
                and isinstance(answer.get("result"), dict)):
            self.served[mode] += 1
            answer["result"] = await self._garble(mode, method, answer["result"], n)
        return web.json_response(answer)

    async def _forward(self, body: bytes) -> dict[str, Any]:
        async with self._session.post(self.upstream, data=body,
                                      headers={"Content-Type": "application/json"}) as resp:
            return json.loads(await resp.read())

    async def _garble(self, mode: str, method: str, block: dict[str, Any], n: int) -> Any:
        if mode == "wrong_block":  # the block before (by number), or genesis (by hash)
            other = hex(int(block["number"], 16) - 1) if method == BLOCK_METHODS[0] else "0x0"
            call = {"jsonrpc": "2.0", "id": 1, "method": BLOCK_METHODS[0],
                    "params": [other, True]}
            return (await self._forward(json.dumps(call).encode()))["result"]
        garbled = dict(block)
        variant = n % 6
        if variant == 0:
            del garbled["hash"]
        elif variant == 1:
            garbled["number"] = "0xzz"
        elif variant == 2:
            garbled["parentHash"] = 12345
        elif variant == 3:
            garbled["hash"] = "0xdeadbeef"  # hex, but no 32-byte hash
        elif variant == 4:
            garbled["transactions"] = "0x"
        else:
            garbled["miner"] = "0x" + "zz" * 20
        return garbled

    async def _websocket(self, request: web.Request) -> web.StreamResponse:
        if self.refuse_ws:
            self.ws_events["refused"] += 1
            return web.Response(status=503, text="WebSocket refused")
        client = web.WebSocketResponse()
        await client.prepare(request)
        self.ws_events["accepted"] += 1
        self._sockets[client] = request
        try:
            async with self._session.ws_connect(self.upstream_ws) as upstream:
                pumps = [asyncio.ensure_future(self._pump(client, upstream)),
                         asyncio.ensure_future(self._pump(upstream, client))]
                await asyncio.wait(pumps, return_when=asyncio.FIRST_COMPLETED)
                for pump in pumps:
                    pump.cancel()
                await asyncio.gather(*pumps, return_exceptions=True)
        finally:
            self._sockets.pop(client, None)
        return client

    @staticmethod
    async def _pump(source: Any, sink: Any) -> None:
        async for message in source:
            if message.type == aiohttp.WSMsgType.TEXT:
                await sink.send_str(message.data)
            elif message.type == aiohttp.WSMsgType.BINARY:
                await sink.send_bytes(message.data)
            else:
                return


@pytest.fixture
def proxy(anvil: Anvil):
    node_proxy = NodeProxy(anvil).start()
    try:
        yield node_proxy
    finally:
        node_proxy.stop()


# --- helpers --------------------------------------------------------------------------


def run_through(target: Anvil | NodeProxy, state: Path, port: int) -> list[str]:
    """`chainwatch run` arguments for one node (anvil itself or the proxy in front)."""
    return ["run", "--rpc", target.http_url, "--ws", target.ws_url, "--node", "anvil1",
            "--state-dir", str(state), "--poll-interval", "1", "--start-block", "0",
            "--metrics-port", str(port), "--metrics-host", LOCALHOST]


def value(port: int, name: str, labels: dict[str, str]) -> float:
    found = metric(port, name, labels)
    assert found is not None, f"{name}{labels} missing"
    return found


def fates(port: int) -> dict[str, float]:
    return {f: value(port, "chainwatch_tx_lifecycle_total", {**LABELS, "fate": f})
            for f in FATES}


def arrivals(port: int) -> float:
    return metric(port, "chainwatch_pending_tx_arrivals_total", LABELS) or 0


def rpc_errors(port: int) -> dict[str, float]:
    return {r: value(port, "chainwatch_rpc_errors_total", {**NODE, "reason": r})
            for r in RPC_REASONS}


def collector_errors(port: int, kind: str) -> float:
    return value(port, "chainwatch_collector_errors_total", {**NODE, "kind": kind})


def reorg_findings(port: int) -> dict[str, float]:
    return {s: value(port, "chainwatch_findings_total",
                     {"chain_id": "31337", "detector": "reorg_depth", "severity": s})
            for s in ("info", "warning", "critical")}


def send(node: Anvil, sender: str, nonce: int) -> str:
    return rpc(node.http_url, "eth_sendTransaction", [{
        "from": sender, "to": sender, "value": hex(nonce + 1), "nonce": hex(nonce),
        "maxPriorityFeePerGas": hex(10**9), "maxFeePerGas": hex(100 * 10**9),
    }])


def follows(port: int, node: Anvil) -> Callable[[], bool]:
    """The detector's canonical chain is the node's, every height from 0 to its head."""

    def check() -> bool:
        try:
            views = chain_view(port)
        except OSError:  # not serving yet
            return False
        if not views:
            return False
        top = head(node)
        return dict(views[0]["canonical"]) == canonical_hashes(node, 0, top)

    return check


def assert_every_height_once(port: int, node: Anvil, distinct_blocks: int,
                             duplicates: int = 0) -> None:
    """The exact block account: the detector's chain is the node's, height by height,
    and it processed `distinct_blocks` blocks (the canonical ones plus any it dropped
    from its chain at reorgs), having dropped `duplicates` redelivered ones."""
    top = head(node)
    view = chain_view(port)[0]
    assert [n for n, _ in view["canonical"]] == list(range(top + 1))
    assert dict(view["canonical"]) == canonical_hashes(node, 0, top)
    assert value(port, "chainwatch_blocks_observed_total", LABELS) == distinct_blocks
    assert value(port, "chainwatch_duplicate_events_total", {"type": "block"}) == duplicates


def assert_calm(output: str, most_error_lines: int) -> int:
    """No traceback, and errors logged once per episode, not once per failure.
    Returns the number of error and warning lines (findings aside)."""
    assert "Traceback" not in output
    lines = [json.loads(line) for line in output.splitlines() if line.startswith("{")]
    errors = [r for r in lines if r.get("level") in ("error", "warning")
              and r.get("msg") != "finding"]
    assert len(errors) <= most_error_lines, [r.get("msg") for r in errors]
    return len(errors)


def figures(title: str, **numbers: object) -> None:
    print(f"\n{title}: " + ", ".join(f"{k}={v}" for k, v in numbers.items()))


# --- 1. the node restarts --------------------------------------------------------------


def test_node_restarted_with_a_fresh_chain_every_block_and_pending_tx_accounted(
    anvil: Anvil, chainwatch_procs, tmp_path: Path
) -> None:
    port = free_port()
    proc = chainwatch_procs("run", *run_through(anvil, tmp_path / "state", port),
                            env=FAST_MEMPOOL)
    rpc(anvil.http_url, "anvil_mine", ["0x5"])
    wait_until(follows(port, anvil), 40, "the detector to follow blocks 0..5")
    a, b, c = rpc(anvil.http_url, "eth_accounts", [])[:3]
    send(anvil, a, 0)
    send(anvil, b, 0)  # both pending when the node goes: the restarted node forgets them
    wait_until(lambda: arrivals(port) == 2, 20, "2 pending txs seen")

    anvil.stop()
    wait_until(lambda: metric(port, "chainwatch_node_up", LABELS) == 0, 20, "node_up == 0")
    anvil.restart()  # same port, a fresh chain from a new genesis
    rpc(anvil.http_url, "anvil_mine", ["0x8"])
    wait_until(follows(port, anvil), 40, "the detector to follow the new chain 0..8")
    send(anvil, c, 0)
    wait_until(lambda: arrivals(port) == 3, 20, "the tx sent after the restart")
    rpc(anvil.http_url, "evm_mine", [])
    wait_until(lambda: fates(port)["included"] == 1 and fates(port)["dropped"] == 2, 30,
               "1 inclusion and the 2 forgotten txs dropped")
    wait_until(follows(port, anvil), 20, "the detector to follow block 9")

    # blocks: old 0..5, then new 0..9, each once
    assert_every_height_once(port, anvil, distinct_blocks=6 + 10)
    assert value(port, "chainwatch_collector_blocks_published_total", LABELS) == 16
    assert value(port, "chainwatch_reorgs_total", LABELS) == 1
    unknown = {**LABELS, "ancestor": "unknown"}
    assert value(port, "chainwatch_collector_reorgs_total", unknown) == 1, "no common block"
    assert value(port, "chainwatch_reorg_depth_blocks_sum", LABELS) == 6, "old 0..5 dropped"
    assert reorg_findings(port)["critical"] == 1
    # pending txs: 3 seen, 2 dropped with the old node's pool, 1 included
    assert arrivals(port) == 3
    assert fates(port) == {"included": 1, "replaced": 0, "dropped": 2, "requeued": 0}
    # every failed call counted once, with its reason, by whichever loop made it
    errors = rpc_errors(port)
    assert errors["unreachable"] >= 1
    assert sum(errors.values()) == collector_errors(port, "rpc")
    assert proc.proc is not None and proc.proc.poll() is None
    logged = assert_calm(proc.output(), most_error_lines=8)
    figures("node restart", log_lines=logged, blocks_observed=16, reorg_depth=6,
            pending_seen=3, included=1, dropped=2,
            rpc_errors={k: v for k, v in errors.items() if v},
            websocket_errors=collector_errors(port, "websocket"))


# --- 2. the node answers errors and garbage for a while --------------------------------


def test_node_answering_errors_and_garbage_is_survived_counted_and_loses_nothing(
    anvil: Anvil, proxy: NodeProxy, chainwatch_procs, tmp_path: Path
) -> None:
    port = free_port()
    # a drop needs 5 s of absence from the pool: shorter than the garbage lasts, so a
    # mined tx whose block cannot be fetched must not be called dropped meanwhile
    env = {**FAST_MEMPOOL, "CHAINWATCH_MEMPOOL_DROP_GRACE": "5",
           "CHAINWATCH_RPC_TIMEOUT": RPC_TIMEOUT}
    proc = chainwatch_procs("run", *run_through(proxy, tmp_path / "state", port), env=env)
    rpc(anvil.http_url, "anvil_mine", ["0x3"])
    wait_until(follows(port, anvil), 40, "the detector to follow blocks 0..3")
    accounts = rpc(anvil.http_url, "eth_accounts", [])
    wait_until(lambda: proxy.ws_events["accepted"] == 2, 20, "both subscriptions")

    sent = 0
    for mode in ("error_response", "invalid_json", "http_status", "unreachable", "timeout",
                 "malformed", "wrong_block"):
        proxy.mode = mode
        send(anvil, accounts[sent], 0)  # announced over the WebSocket, which still works
        sent += 1
        wait_until(lambda: arrivals(port) == sent, 20, f"pending tx {sent}")  # noqa: B023
        deadline = time.monotonic() + 40
        while proxy.served[mode] < 3:  # new heads keep the collector trying
            assert time.monotonic() < deadline, f"no 3 {mode} answers in 40 s"
            rpc(anvil.http_url, "evm_mine", [])
            time.sleep(0.7)
    proxy.mode = "pass"
    rpc(anvil.http_url, "evm_mine", [])
    wait_until(follows(port, anvil), 60, "the detector to catch up after the garbage")
    wait_until(lambda: fates(port)["included"] == sent, 20,
               f"{sent} inclusions: {fates(port)}")

    # the WebSocket answers garbage too: both subscriptions reconnect
    proxy.send_garbage_frames()
    wait_until(lambda: proxy.ws_events["accepted"] == 4, 30, "both subscriptions back")
    doomed = send(anvil, accounts[sent], 0)
    wait_until(lambda: arrivals(port) == sent + 1, 20, "the last pending tx")
    rpc(anvil.http_url, "anvil_dropTransaction", [doomed])
    wait_until(lambda: fates(port)["dropped"] == 1, 30,
               "the dropped tx (txpool reconciliation still on after the garbage)")
    rpc(anvil.http_url, "evm_mine", [])
    wait_until(follows(port, anvil), 20, "the last block")

    top = head(anvil)
    assert_every_height_once(port, anvil, distinct_blocks=top + 1)
    assert value(port, "chainwatch_collector_blocks_published_total", LABELS) == top + 1
    assert value(port, "chainwatch_reorgs_total", LABELS) == 0, "no false reorg"
    errors = rpc_errors(port)
    assert errors == {r: proxy.served[r] for r in RPC_REASONS}, "each bad answer counted once"
    assert collector_errors(port, "websocket") == proxy.ws_errors() == 2
    assert collector_errors(port, "internal") == 0
    assert arrivals(port) == sent + 1
    assert fates(port) == {"included": sent, "replaced": 0, "dropped": 1, "requeued": 0}
    assert proc.proc is not None and proc.proc.poll() is None
    logged = assert_calm(proc.output(), most_error_lines=10)
    figures("garbage", log_lines=logged, blocks=top + 1, bad_answers=dict(errors),
            collector_errors={k: collector_errors(port, k)
                              for k in ("rpc", "malformed", "websocket")},
            pending_seen=sent + 1, included=sent, dropped=1)


# --- 3. the WebSocket is cut, refused for a while, then closed cleanly -----------------


def test_websocket_cut_and_refused_is_counted_backfilled_and_pending_txs_reconciled(
    anvil: Anvil, proxy: NodeProxy, chainwatch_procs, tmp_path: Path
) -> None:
    port = free_port()
    args = run_through(proxy, tmp_path / "state", port)
    args[args.index("--poll-interval") + 1] = "60"  # heads come from the WebSocket only
    proc = chainwatch_procs("run", *args, env={"CHAINWATCH_MEMPOOL_POLL_INTERVAL": "0.5"})
    wait_until(lambda: proxy.ws_events["accepted"] == 2, 30, "both subscriptions")
    rpc(anvil.http_url, "anvil_mine", ["0x2"])
    wait_until(follows(port, anvil), 30, "blocks 0..2 announced over the WebSocket")
    accounts = rpc(anvil.http_url, "eth_accounts", [])
    for sender in accounts[:2]:
        send(anvil, sender, 0)
    wait_until(lambda: arrivals(port) == 2, 20, "2 pending txs over the subscription")

    proxy.refuse_ws = True
    proxy.cut_websockets()
    for sender in accounts[2:5]:  # sent while the subscription is down
        send(anvil, sender, 0)
    wait_until(lambda: arrivals(port) == 5, 20, "the txpool poll to find the 3 new txs")
    for _ in range(4):
        rpc(anvil.http_url, "evm_mine", [])
        time.sleep(0.5)
    wait_until(lambda: proxy.ws_events["refused"] >= 4, 30, "reconnects refused")
    proxy.refuse_ws = False
    wait_until(lambda: proxy.ws_events["accepted"] == 4, 40, "both subscriptions back")
    wait_until(follows(port, anvil), 20, "the blocks mined during the cut, backfilled")
    wait_until(lambda: fates(port)["included"] == 5, 20, "5 inclusions")

    # a new head now arrives by the WebSocket alone (the poll interval is 60 s)
    rpc(anvil.http_url, "evm_mine", [])
    wait_until(follows(port, anvil), 15, "a new head over the reconnected WebSocket")
    # a node closing the socket cleanly is a gap too: counted, reconnected
    proxy.close_websockets()
    wait_until(lambda: proxy.ws_events["accepted"] == 6, 30, "both subscriptions again")
    send(anvil, accounts[5], 0)
    wait_until(lambda: arrivals(port) == 6, 20, "a pending tx over the subscription")
    rpc(anvil.http_url, "evm_mine", [])
    wait_until(lambda: fates(port)["included"] == 6, 20, "6 inclusions")
    wait_until(follows(port, anvil), 15, "the last head")

    top = head(anvil)
    assert_every_height_once(port, anvil, distinct_blocks=top + 1)
    assert value(port, "chainwatch_collector_blocks_published_total", LABELS) == top + 1
    assert collector_errors(port, "websocket") == proxy.ws_errors()
    assert arrivals(port) == 6
    assert fates(port) == {"included": 6, "replaced": 0, "dropped": 0, "requeued": 0}
    assert proc.proc is not None and proc.proc.poll() is None
    logged = assert_calm(proc.output(), most_error_lines=6)
    figures("websocket", log_lines=logged, blocks=top + 1, ws_events=dict(proxy.ws_events),
            websocket_errors=collector_errors(port, "websocket"), pending_seen=6, included=6)


# --- 4. a reorg while the collector is down --------------------------------------------


def read_all(kafka: KafkaBroker, topic: str) -> list[Any]:
    """Every record on a topic, to its end (what is there when this is called)."""
    from kafka import KafkaConsumer, TopicPartition

    consumer = KafkaConsumer(bootstrap_servers=[kafka.bootstrap], enable_auto_commit=False,
                             auto_offset_reset="earliest")
    try:
        partitions = [TopicPartition(topic, p) for p in consumer.partitions_for_topic(topic)]
        consumer.assign(partitions)
        consumer.seek_to_beginning(*partitions)
        ends = consumer.end_offsets(partitions)
        records: list[Any] = []
        deadline = time.monotonic() + 30
        while any(consumer.position(p) < ends[p] for p in partitions):
            assert time.monotonic() < deadline, f"could not read {topic} to its end"
            for batch in consumer.poll(timeout_ms=500).values():
                records.extend(decode(m.value) for m in batch)
        return records
    finally:
        consumer.close()


def test_reorg_while_the_collector_is_down_is_found_from_its_checkpoint(
    anvil: Anvil, kafka: KafkaBroker, chainwatch_procs, tmp_path: Path
) -> None:
    prefix = f"t{uuid.uuid4().hex[:8]}"
    port = free_port()
    chainwatch_procs("detect", "detect", "--kafka", kafka.bootstrap, "--metrics-port",
                     str(port), "--metrics-host", LOCALHOST, "--topic-prefix", prefix,
                     "--group", f"g-{prefix}")
    collect = ["collect", *node_args(anvil, str(tmp_path / "state")), "--kafka",
               kafka.bootstrap, "--topic-prefix", prefix, "--metrics-host", LOCALHOST]
    first = chainwatch_procs("collect-1", *collect, "--metrics-port", str(free_port()),
                             env=FAST_MEMPOOL)
    a, b = rpc(anvil.http_url, "eth_accounts", [])[:2]
    wait_until(lambda: metric(port, "chainwatch_head_block_number", LABELS) == 0, 40,
               "the detector to see block 0")
    send(anvil, a, 0)
    wait_until(lambda: arrivals(port) == 1, 20, "a pending tx")
    rpc(anvil.http_url, "anvil_mine", ["0xa"])  # the tx goes into block 1
    wait_until(follows(port, anvil), 40, "the detector to follow blocks 0..10")
    # its inclusion acknowledged before the kill: a fate still in the outbox would be lost
    # with it (the tx is not in the mempool state if it was announced after the last save)
    wait_until(lambda: fates(port)["included"] == 1, 20, "the tx's inclusion")
    old = canonical_hashes(anvil, 0, 10)

    first.kill9()
    rpc(anvil.http_url, "anvil_reorg", [3, []])  # 8, 9, 10 replaced; ancestor 7
    rpc(anvil.http_url, "anvil_mine", ["0x2"])
    send(anvil, b, 0)  # pending while no collector runs
    new = canonical_hashes(anvil, 0, 12)
    assert [n for n in old if old[n] != new[n]] == [8, 9, 10]
    second = chainwatch_procs("collect-2", *collect, "--metrics-port", str(free_port()),
                              env=FAST_MEMPOOL)
    wait_until(lambda: metric(port, "chainwatch_reorgs_total", LABELS) == 1, 40,
               "the reorg to be found from the checkpoint")
    wait_until(follows(port, anvil), 20, "the detector to follow the new branch to 12")
    wait_until(lambda: arrivals(port) == 2, 20, "the tx sent meanwhile, from the txpool")
    rpc(anvil.http_url, "evm_mine", [])
    wait_until(lambda: fates(port)["included"] == 2, 20, "both txs included")
    wait_until(follows(port, anvil), 20, "the detector to follow block 13")
    new = canonical_hashes(anvil, 0, 13)

    records = read_all(kafka, f"{prefix}.blocks")
    [reorg] = [r for r in records if isinstance(r, Reorg)]
    assert (reorg.depth, reorg.common_ancestor_number) == (3, 7)
    assert reorg.common_ancestor_hash == new[7] and reorg.ancestor_found
    assert (reorg.old_head_number, reorg.old_head_hash) == (10, old[10])
    assert list(reorg.dropped_block_hashes) == [old[8], old[9], old[10]]
    blocks = [r for r in records if isinstance(r, Block)]
    on_topic = Counter((b.number, b.hash) for b in blocks)
    # every block of both branches is on the topic; nothing else
    assert set(on_topic) == set(old.items()) | set(new.items())
    duplicates = sum(on_topic.values()) - len(on_topic)
    assert_every_height_once(port, anvil, distinct_blocks=len(on_topic), duplicates=duplicates)
    assert reorg_findings(port) == {"info": 0, "warning": 1, "critical": 0}
    assert fates(port) == {"included": 2, "replaced": 0, "dropped": 0, "requeued": 0}
    assert "Traceback" not in second.output()
    figures("reorg during restart", depth=reorg.depth, ancestor=reorg.common_ancestor_number,
            blocks_on_topic=sum(on_topic.values()), distinct=len(on_topic),
            duplicates=duplicates)


# --- 5. a reorg deeper than the collector's window -------------------------------------


def test_reorg_deeper_than_the_window_is_flagged_critical_and_every_new_block_delivered(
    anvil: Anvil, chainwatch_procs, tmp_path: Path
) -> None:
    """anvil keeps no side blocks, so below a window of 4 the old chain is unknown.

    Two collectors watch the same reorg of depth 6: one may follow a fork 10 blocks deep
    (its max_reorg_depth), the other only 3, less than the reorg.
    """
    port, short_port = free_port(), free_port()
    env = {"CHAINWATCH_WINDOW": "4", "CHAINWATCH_MAX_REORG_DEPTH": "10",
           "CHAINWATCH_MEMPOOL": "false"}
    proc = chainwatch_procs("run", *run_through(anvil, tmp_path / "state", port), env=env)
    short = chainwatch_procs("run-short", *run_through(anvil, tmp_path / "s2", short_port),
                             env={**env, "CHAINWATCH_MAX_REORG_DEPTH": "3"})
    rpc(anvil.http_url, "anvil_mine", ["0x14"])
    wait_until(follows(port, anvil), 40, "the detector to follow blocks 0..20")
    wait_until(follows(short_port, anvil), 20, "the other detector too")
    old = canonical_hashes(anvil, 0, 20)

    rpc(anvil.http_url, "anvil_reorg", [6, []])  # 15..20 replaced; ancestor 14
    new = canonical_hashes(anvil, 0, 20)
    assert [n for n in old if old[n] != new[n]] == list(range(15, 21))
    wait_until(lambda: metric(port, "chainwatch_reorgs_total", LABELS) == 1, 30, "the reorg")
    wait_until(follows(port, anvil), 20, "every new block, 15 included")

    unknown = {**LABELS, "ancestor": "unknown"}
    assert value(port, "chainwatch_collector_reorgs_total", unknown) == 1
    assert value(port, "chainwatch_collector_reorgs_total", {**LABELS, "ancestor": "found"}) == 0
    [flagged] = unknown_ancestor_lines(proc.output())
    assert flagged["common_ancestor"] is None
    assert flagged["depth"] == 5, "a lower bound: 16..20 seen to differ, 15 below all known"
    # the new branch is delivered down to max_reorg_depth (10) below the head the reorg
    # was seen at: 11..20 when seen at 20; 11..14 did not change and are dropped by the
    # detector as duplicates. anvil mines the new branch block by block, so the collector
    # may see the reorg at a lower head (16 once, in CI): down to 7 then, 8 duplicates,
    # and the blocks above that head come after it as new heads
    seen_at = flagged["new_head"]
    assert 15 <= seen_at <= 20, flagged
    duplicates = 14 - (seen_at - 9) + 1  # (seen_at - 9)..14 delivered again
    assert_every_height_once(port, anvil, distinct_blocks=21 + 6, duplicates=duplicates)
    assert value(port, "chainwatch_collector_blocks_published_total", LABELS) == (
        21 + 10 + (20 - seen_at))
    assert reorg_findings(port) == {"info": 0, "warning": 0, "critical": 1}

    # deeper than max_reorg_depth: flagged the same way, and the limit is visible: the new
    # blocks between the ancestor and the 3 delivered are not fetched (15..17)
    wait_until(lambda: metric(short_port, "chainwatch_reorgs_total", LABELS) == 1, 30,
               "the reorg seen by the collector limited to depth 3")
    assert value(short_port, "chainwatch_collector_reorgs_total", unknown) == 1
    assert reorg_findings(short_port) == {"info": 0, "warning": 0, "critical": 1}
    [short_flagged] = unknown_ancestor_lines(short.output())
    assert short_flagged["depth"] == 4  # 17..20 seen to differ
    view = dict(chain_view(short_port)[0]["canonical"])
    assert [n for n in range(21) if view.get(n) != new[n]] == [15, 16, 17]
    for output in (proc.output(), short.output()):
        assert "Traceback" not in output
    figures("reorg beyond the window", true_depth=6, reported_depth=flagged["depth"],
            finding="critical", redelivered=10, duplicates=duplicates,
            beyond_limit_reported_depth=short_flagged["depth"], not_delivered=[15, 16, 17])


def unknown_ancestor_lines(output: str) -> list[dict[str, Any]]:
    """The collector's ERROR line for each reorg whose common ancestor it could not find."""
    lines = [json.loads(line) for line in output.splitlines() if line.startswith("{")]
    return [r for r in lines
            if r.get("level") == "error" and str(r.get("msg")).startswith("reorg with unknown")]
