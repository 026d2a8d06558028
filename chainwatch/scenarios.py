"""Labelled scenarios on a real anvil, watched by the real collectors (issue 4, item 5).

One session: anvil with mining off; this module sends realistic traffic and mines every
block itself (`evm_mine`, a timestamp 12 s after the previous slot), so blocks hold many
transactions and the fee market moves with the load. Anomalies are injected on a fixed
plan and written down as labels; the collectors `chainwatch run` wires (block, mempool
and peer collectors on an embedded bus) observe the node, and every record they publish
is written to `records.jsonl` exactly as it went on the bus. `detector.evaluation` replays
that recording later, with no anvil.

Time: blocks are mined several per second, but the records must look like a 12 s chain,
so the collectors get a session clock anchored to each block's 12 s slot when it is mined
and running 4x wall time within the slot (capped at the slot's end), so
`observed_at - timestamp` is a propagation delay of well under a second to a few seconds.
Labels carry `injected_at` on that same clock (comparable with `observed_at`) and
`injected_wall_at` on the real clock.

What is real and what is simulated is listed in docs/quality.md (see `SIMULATION_NOTES`).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import http.client
import json
import logging
import math
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from chainwatch.bus import EmbeddedBus, Topics
from chainwatch.exceptions import ChainwatchError, ConfigError, InvalidRecord, first_line
from chainwatch.labels import KIND_FAMILY, Label, read_labels
from chainwatch.paths import output_directory, written
from chainwatch.schema import AnyRecord, Block, Reorg, decode

if TYPE_CHECKING:
    from detector.evaluation import Evaluation

log = logging.getLogger("chainwatch.scenarios")

GWEI = 10**9
ETHER = 10**18
NODE = "anvil-scenarios"
RECORDS_FILE = "records.jsonl"
LABELS_FILE = "labels.jsonl"
SESSION_FILE = "session.json"


SIMULATION_NOTES: tuple[str, ...] = (
    "Real: anvil (Foundry) executes, signs and mines every transaction; the EIP-1559 base "
    "fee moves with the load (block gas limit twice the mean demand, demand elastic to the "
    "base fee); reorgs are real branch switches "
    "(evm_snapshot / evm_revert, then a longer branch) seen by the real block collector; "
    "pending transactions come from anvil's newPendingTransactions subscription and "
    "txpool_status; every record is what the collectors published.",
    "Session clock: blocks are mined ~4 per second of wall time; the collectors run on a "
    "clock that jumps to each block's 12 s slot when it is mined and runs 4x wall time "
    "within it, so observed_at, first_seen_at and block timestamps look like a 12 s chain "
    "(propagation delay = 4x the collector's real delay). Latencies in seconds are on that "
    "clock, and so are the collector's intervals (pool listing every 30 s, drop grace 30 s: "
    "the live defaults).",
    "Miners: anvil has one coinbase at a time; `anvil_setCoinbase` before each block draws "
    "the fee recipient from 24 producers with Zipf-like shares (largest ~17%). Normal "
    "senders: 150 accounts (Zipf 0.3), one tx per sender per block.",
    "Contracts: hand-assembled bytecode that counts calls per selector (token-like ones per "
    "caller); calls carry ERC20 / router selectors and arguments, but move no balances.",
    "Empty blocks while the pool is full: anvil has no min-gas-price with EIP-1559 and no "
    "way to mine an empty block while transactions are pending, so the runner reads the "
    "pool's raw transactions, drops them (anvil_dropAllTransactions), mines, and re-submits "
    "the same raw transactions within a few milliseconds; the header is a normal one with "
    "gas_used 0.",
    "Censorship: the censored sender's high-fee transactions are dropped right before each "
    "block of the censoring producer and re-submitted (same raw bytes, same hashes) right "
    "after, so the node shows them pending the whole time; an honest producer then "
    "includes them.",
    "Ordering: anvil mines in arrival order (`--order fifo`; its `fees` order loses a "
    "sender's later nonces when they pay more than earlier ones), and the runner submits "
    "each block's batch sorted by effective tip, as a tip-maximising builder would; when "
    "a backlog exceeds a block, the pool is re-submitted in geth's greedy tip-and-nonce "
    "order right before mining (same raw transactions and hashes).",
    "Pool repair: anvil evicts pending txs a real pool keeps (a sender's later nonces when "
    "an earlier one did not fit the block's gas, and a tx whose fee cap fell under the base "
    "fee, with its later nonces); the runner re-submits them (same raw bytes and hashes) "
    "before the next block, an underpriced one once the base fee allows "
    "(session.json: txs_resubmitted, txs_underpriced, txs_lost).",
    "Sandwiches: attacker and victim swap on the same pool contract; the triple pays the "
    "highest tips of its block (front > victim > back) and lands at its top; nothing is "
    "actually traded.",
    "Timestamp manipulation: a dedicated producer stamps its blocks either ahead of the "
    "slot (60-150 s; later honest blocks keep parent + 1 s until the clock catches up, "
    "and the label's block range covers them) "
    "or behind (parent + 1 s for 2-4 blocks).",
    "Peers: anvil has no p2p (net_peerCount is unsupported), so no peer_snapshot records.",
)


# --- plan -------------------------------------------------------------------------------


@dataclass(frozen=True)
class ScenarioConfig:
    """What one session does; the defaults are the full run (~1,700 normal blocks)."""

    name: str = "full"
    seed: int = 20260508
    warmup_blocks: int = 240  # normal blocks before the first anomaly (models warm up)
    normal_blocks: int = 1700  # normal blocks in total (warm-up and gaps)
    tail_blocks: int = 12  # normal blocks after the last anomaly
    reorg_depths: tuple[int, ...] = (1, 2, 3, 4, 5, 6, 1, 2, 3, 4, 5, 6)
    fee_outliers: int = 16
    spam_bursts: int = 6
    replacement_spams: int = 2
    sandwiches: int = 10
    miner_dominance: int = 3
    dominance_blocks: tuple[int, int] = (40, 60)
    empty_block_runs: int = 5
    timestamp_manipulations: int = 6
    censorships: int = 4
    normal_accounts: int = 150
    reserve_accounts: int = 60
    producers: int = 24
    gas_per_tx: int = 30_000  # average gas of the normal mix, sets the block gas limit
    block_time: int = 12
    block_wall_seconds: float = 0.25  # wall time per block slot
    clock_scale: float = 4.0  # session seconds per wall second within a slot
    dwell_seconds: float = 0.1  # minimum wait between sending txs and mining them
    load_mean: float = 32.0  # normal txs per block, on average

    @classmethod
    def quick(cls) -> ScenarioConfig:
        """~2 minutes: every kind once or twice, enough normal blocks to warm up."""
        return cls(
            name="quick",
            warmup_blocks=210,
            normal_blocks=300,
            tail_blocks=8,
            reorg_depths=(1, 3),
            fee_outliers=2,
            spam_bursts=1,
            replacement_spams=1,
            sandwiches=2,
            miner_dominance=1,
            dominance_blocks=(36, 40),
            empty_block_runs=1,
            timestamp_manipulations=2,
            censorships=1,
            normal_accounts=120,
            reserve_accounts=20,
            load_mean=24.0,
        )

    @property
    def gas_limit(self) -> int:
        """Twice the mean demand at a 1 gwei base fee: EIP-1559's target sits at the load."""
        return int(2 * self.load_mean * self.gas_per_tx)

    def episodes(self) -> list[str]:
        """The anomalies to inject, in a fixed shuffled order."""
        kinds = (
            [f"reorg:{d}" for d in self.reorg_depths]
            + ["fee_outlier"] * self.fee_outliers
            + ["spam_burst"] * self.spam_bursts
            + ["replacement_spam"] * self.replacement_spams
            + ["sandwich"] * self.sandwiches
            + ["miner_dominance"] * self.miner_dominance
            + ["empty_blocks"] * self.empty_block_runs
            + ["timestamp_manipulation"] * self.timestamp_manipulations
            + ["censorship"] * self.censorships
        )
        order = np.random.default_rng(self.seed).permutation(len(kinds))
        return [kinds[i] for i in order]


@dataclass
class SessionResult:
    out_dir: Path
    blocks: int
    transactions: int
    records: int
    labels: int
    reorgs_recorded: int
    seconds: float
    by_kind: dict[str, int]
    warnings: list[str]

    def summary(self) -> str:
        kinds = ", ".join(f"{k} {v}" for k, v in sorted(self.by_kind.items()))
        return (
            f"recorded {self.records} records ({self.blocks} blocks, {self.transactions} txs, "
            f"{self.reorgs_recorded} reorgs) and {self.labels} labels ({kinds}) in "
            f"{self.seconds:.0f}s -> {self.out_dir}"
        )


# --- adapters: JSON-RPC, the clock, the recorder, the collectors ---------------------------


class JsonRpc:
    """Plain JSON-RPC over one keep-alive HTTP connection (the runner's only driver)."""

    BATCH = 100
    refused_batches: list[str]

    def __init__(self, port: int, timeout: float = 30.0) -> None:
        self.port = port
        self.timeout = timeout
        self._conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
        self.refused_batches = []

    def _post(self, body: object) -> Any:
        payload = json.dumps(body).encode()
        for attempt in (1, 2):
            try:
                self._conn.request("POST", "/", payload, {"Content-Type": "application/json"})
                return json.loads(self._conn.getresponse().read())
            except (http.client.HTTPException, OSError):
                self._conn.close()
                self._conn = http.client.HTTPConnection("127.0.0.1", self.port,
                                                        timeout=self.timeout)
                if attempt == 2:
                    raise
        raise AssertionError("unreachable")

    def call(self, method: str, *params: Any) -> Any:
        reply = self._post({"jsonrpc": "2.0", "id": 1, "method": method, "params": list(params)})
        if "error" in reply:
            raise ChainwatchError(f"anvil {method} failed: {reply['error'].get('message')}")
        return reply.get("result")

    def batch(self, calls: Sequence[tuple[str, list[Any]]]) -> list[tuple[Any, str | None]]:
        """Many calls in one request: [(result, error message or None)] in call order."""
        out: list[tuple[Any, str | None]] = []
        for start in range(0, len(calls), self.BATCH):  # anvil caps batch size and body
            chunk = calls[start:start + self.BATCH]
            body = [{"jsonrpc": "2.0", "id": i, "method": m, "params": p}
                    for i, (m, p) in enumerate(chunk)]
            reply = self._post(body)
            if not isinstance(reply, list):  # the batch itself was refused: one by one
                self.refused_batches.append(str(reply)[:200])
                reply = [{**self._post(call), "id": call["id"]} for call in body]
            replies = {r.get("id"): r for r in reply if isinstance(r, dict)}
            for i in range(len(chunk)):
                r = replies.get(i, {"error": {"message": "no reply"}})
                out.append((r.get("result"),
                            r["error"].get("message") if "error" in r else None))
        return out

    def close(self) -> None:
        self._conn.close()


class SimClock:
    """Session time: 12 s per block slot, anchored at each slot when its block is mined."""

    def __init__(self, start: float, scale: float, span: float) -> None:
        self.scale = scale
        self.span = span
        self._lock = threading.Lock()
        self._sim = start
        self._wall = time.monotonic()

    def anchor(self, sim_time: float) -> None:
        with self._lock:
            self._sim, self._wall = sim_time, time.monotonic()

    def now(self) -> float:
        with self._lock:
            ahead = min((time.monotonic() - self._wall) * self.scale, self.span - 0.001)
            return self._sim + max(ahead, 0.0)


class Recorder(threading.Thread):
    """Writes every record on the bus to JSONL and keeps an index of what was seen."""

    def __init__(self, bus: EmbeddedBus, topics: Topics, path: Path) -> None:
        super().__init__(name="scenario-recorder", daemon=True)
        self.consumer = bus.consumer([topics.blocks, topics.mempool, topics.peers], "recorder")
        self.path = path
        self.stop_event = threading.Event()
        self.cond = threading.Condition()
        self.head = -1
        self.blocks: dict[int, Block] = {}  # canonical as delivered: latest per height
        self.tx_block: dict[str, tuple[int, str]] = {}  # tx hash -> (number, block hash)
        self.first_seen: dict[str, float] = {}  # pending tx hash -> first_seen_at
        self.reorgs = 0
        self.records = 0
        self.invalid: list[str] = []
        self.counts: dict[str, int] = {}

    def run(self) -> None:
        with self.path.open("wb") as out:
            while True:
                batch = self.consumer.poll(0.05, 2000)
                if not batch:
                    if self.stop_event.is_set():
                        return
                    continue
                for message in batch:
                    out.write(message.value.rstrip(b"\n") + b"\n")
                    try:
                        record = decode(message.value)
                    except InvalidRecord as exc:
                        self.invalid.append(str(exc))
                        continue
                    self._index(record)
                out.flush()
                with self.cond:
                    self.cond.notify_all()

    def _index(self, record: AnyRecord) -> None:
        self.records += 1
        self.counts[record.type] = self.counts.get(record.type, 0) + 1
        if isinstance(record, Block):
            with self.cond:
                self.blocks[record.number] = record
                self.head = record.number
                for tx in record.transactions:
                    self.tx_block[tx.hash] = (record.number, record.hash)
        elif isinstance(record, Reorg):
            with self.cond:
                self.reorgs += 1
                dropped = set(record.dropped_block_hashes)
                for h in [h for h, (_, b) in self.tx_block.items() if b in dropped]:
                    del self.tx_block[h]
        elif record.type == "pending_tx":
            self.first_seen.setdefault(record.hash, record.first_seen_at)

    def wait(self, check: Callable[[], bool], timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        with self.cond:
            while not check():
                left = deadline - time.monotonic()
                if left <= 0:
                    raise ChainwatchError(f"scenario: the collector did not deliver {what} "
                                          f"within {timeout:.0f}s")
                self.cond.wait(min(left, 0.05))

    def wait_block(self, number: int, block_hash: str | None = None,
                   timeout: float = 20.0) -> Block:
        def seen() -> bool:
            b = self.blocks.get(number)
            return b is not None and (block_hash is None or b.hash == block_hash)

        self.wait(seen, timeout, f"block {number}")
        return self.blocks[number]

    def stop(self) -> None:
        self.stop_event.set()
        self.join(timeout=30)


class Collectors:
    """The block, mempool and peer collectors of `chainwatch run`, on their own loop."""

    def __init__(self, http_url: str, ws_url: str, bus: EmbeddedBus, clock: SimClock,
                 state_dir: Path) -> None:
        from chainwatch.bootstrap import make_agents, make_runtime
        from chainwatch.nodes import NodeConfig
        from chainwatch.settings import load_settings

        settings = load_settings(
            rpc=http_url, ws=ws_url, node=NODE, state_dir=state_dir, start_block=0,
            poll_interval=0.5, expected_block_time=12.0, mempool_poll_interval=0.1,
            # the live defaults, on the session clock: a pool listing every 30 s (2.5 slots)
            mempool_snapshot_interval=0.2, mempool_reconcile_interval=30.0,
            mempool_drop_grace=30.0, peer_interval=2.0, status_interval=2.0,
        )
        self.runtime = make_runtime(settings, bus=bus)
        node = NodeConfig(name=NODE, rpc=http_url, ws=ws_url, expected_block_time=12.0)
        self.agents = make_agents(self.runtime, node)
        # the collectors take their clock as a constructor default; give them session time
        self.agents.blocks.clock = clock.now
        self.agents.rpc.clock = clock.now
        for other in self.agents.others:
            other.clock = clock.now
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._main, name="scenario-collectors",
                                        daemon=True)

    def _main(self) -> None:
        async def go() -> None:
            self._loop = asyncio.get_running_loop()
            self._stop = asyncio.Event()
            self._ready.set()
            try:
                await self.agents.run(self._stop)
            finally:
                await self.agents.rpc.close()

        try:
            asyncio.run(go())
        except BaseException as exc:  # reported by stop(); the runner's waits time out first
            self._error = exc

    def start(self) -> None:
        self._thread.start()
        self._ready.wait(10)

    def stop(self) -> None:
        if self._loop is not None and self._stop is not None:
            with contextlib.suppress(RuntimeError):
                self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(timeout=30)


# --- contracts (hand-assembled; no compiler needed) --------------------------------------

# runtime: storage[selector] += 1
_SELECTOR_COUNTER = "600035" "60e01c" "80" "54" "600101" "90" "55" "00"
# runtime: storage[caller ^ selector] += 1 (a token-like contract: per-caller state)
_CALLER_COUNTER = "33" "600035" "60e01c" "18" "80" "54" "600101" "90" "55" "00"


def initcode(runtime_hex: str) -> str:
    """Deploy code that returns `runtime_hex` as the contract's code."""
    size = len(runtime_hex) // 2
    return "0x" + f"60{size:02x}80600b6000396000f3" + runtime_hex


TOKEN_SELECTORS = ("a9059cbb", "095ea7b3", "23b872dd")  # transfer, approve, transferFrom
SWAP_SELECTORS = ("38ed1739", "7ff36ab5", "18cbafe5", "022c0d9f")  # router/pair swaps


def _word(value: int) -> str:
    return f"{value % 2**256:064x}"


# --- the runner ---------------------------------------------------------------------------


class ScenarioRunner:
    """Drives anvil through the plan; domain choices (amounts, fees) come from one RNG."""

    def __init__(self, config: ScenarioConfig, out_dir: Path,
                 progress: Callable[[str], None] | None = None) -> None:
        self.c = config
        self.out_dir = out_dir
        self.say = progress or (lambda _m: None)
        self.rng = np.random.default_rng(config.seed)
        self.labels: list[Label] = []
        self.pending_labels: list[Label] = []
        self.awaiting: dict[str, list[str]] = {}  # label id -> hashes whose blocks we need
        self.warnings: list[str] = []
        self.nonces: dict[str, int] = {}
        self.nonce_holes: dict[str, list[int]] = {}  # nonces of refused txs, reused first
        # every sent tx until it is mined: (sender, nonce) -> (hash, raw bytes), so a tx anvil
        # loses from its pool can be re-submitted as it was (see _repair)
        self.unmined: dict[tuple[str, int], tuple[str, str]] = {}
        self.resubmitted = 0  # txs anvil lost and the runner re-submitted
        self.underpriced: set[str] = set()  # txs anvil refused for a while: fee cap < base fee
        self.sent = 0
        self.lost_at_end = 0
        self.slot = 0
        self.head = 0
        self.coinbase = ""
        self.market_tip = 1.5 * GWEI
        self.load_phase = float(self.rng.uniform(0, 2 * math.pi))
        self.last_mine_wall = time.monotonic()

    # ---- session ----

    def run(self) -> SessionResult:
        from chainwatch.local.anvil import Anvil
        from chainwatch.local.procs import ServerStartError

        t0 = time.monotonic()
        self.out_dir.mkdir(parents=True, exist_ok=True)
        c = self.c
        accounts = c.normal_accounts + c.reserve_accounts
        node = Anvil()
        try:
            node.start(no_mining=True, extra_args=[
                "--accounts", str(accounts), "--gas-limit", str(c.gas_limit),
                "--order", "fifo", "--balance", "100000",
            ])
        except (FileNotFoundError, ServerStartError) as exc:
            raise ChainwatchError(f"cannot start anvil: {first_line(exc)}") from None
        bus = EmbeddedBus(max_queued=200_000)
        topics = Topics()
        self.recorder = Recorder(bus, topics, self.out_dir / RECORDS_FILE)
        self.rpc = JsonRpc(node.port)
        collectors: Collectors | None = None
        try:
            self.chain_id = int(self.rpc.call("eth_chainId"), 16)
            genesis = self.rpc.call("eth_getBlockByNumber", "latest", False)
            self.t0 = int(genesis["timestamp"], 16)
            self.clock = SimClock(float(self.t0), c.clock_scale, float(c.block_time))
            self.accounts = [a.lower() for a in self.rpc.call("eth_accounts")]
            self.users = self.accounts[: c.normal_accounts]
            self.reserve = list(self.accounts[c.normal_accounts:])
            weights = 1.0 / np.arange(1, len(self.users) + 1) ** 0.3
            self.user_weights = weights / weights.sum()
            self.producers = [self._address("producer", i) for i in range(c.producers)]
            pw = 1.0 / np.arange(1, c.producers + 1) ** 0.8
            self.producer_weights = pw / pw.sum()
            self.recorder.start()
            with tempfile.TemporaryDirectory(prefix="chainwatch-scenarios-") as state:
                collectors = Collectors(node.http_url, node.ws_url, bus, self.clock, Path(state))
                collectors.start()
                self.recorder.wait_block(0, timeout=30)
                self._deploy()
                self._session()
                time.sleep(1.0)  # let the mempool collector publish its last snapshot
                collectors.stop()
                collectors = None
        finally:
            if collectors is not None:
                collectors.stop()
            self.recorder.stop()
            self.rpc.close()
            node.stop()
        return self._write(time.monotonic() - t0)

    def _address(self, role: str, i: int) -> str:
        digest = hashlib.sha256(f"{self.c.seed}:{role}:{i}".encode()).hexdigest()
        return "0x" + digest[:40]

    def _session(self) -> None:
        c = self.c
        episodes = c.episodes()
        gaps_total = max(c.normal_blocks - c.warmup_blocks - c.tail_blocks, len(episodes) * 6)
        gaps = self._split(gaps_total, len(episodes))
        self.say(f"warm-up: {c.warmup_blocks} normal blocks")
        self.normal_blocks(c.warmup_blocks)
        for i, (episode, gap) in enumerate(zip(episodes, gaps, strict=True)):
            self.say(f"[{i + 1}/{len(episodes)}] {episode} at block {self.head + 1}")
            kind, _, arg = episode.partition(":")
            getattr(self, f"inject_{kind}")(*([int(arg)] if arg else []))
            self.normal_blocks(gap)
            self._resolve_labels()
        self.normal_blocks(c.tail_blocks)
        for _ in range(20):  # labelled txs still pending: mine until they are in
            if not self.pending_labels:
                break
            self.normal_blocks(1)
            self._resolve_labels()
        for label in self.pending_labels:
            self.warnings.append(f"label {label.id}: some transactions were never included")
            self._finish_label(label)
        lost = self._missing()
        if lost:
            self.warnings.insert(0, f"{len(lost)} sent txs neither mined nor pending at the "
                                    f"end, e.g. {lost[0][0][0]} nonce {lost[0][0][1]}")
        self.lost_at_end = len(lost)

    def _split(self, total: int, parts: int) -> list[int]:
        """`total` normal blocks over `parts` gaps: random sizes, at least 6 each."""
        if parts == 0:
            return []
        raw = self.rng.uniform(0.5, 1.5, parts)
        sizes = np.maximum(np.floor(raw / raw.sum() * total).astype(int), 6)
        sizes[-1] += max(total - int(sizes.sum()), 0)
        return [int(s) for s in sizes]

    # ---- mining ----

    def slot_time(self, slot: int) -> int:
        return self.t0 + self.c.block_time * slot

    def mine(self, coinbase: str | None = None, timestamp: int | None = None,
             before: Callable[[], None] | None = None, restore: Sequence[str] = ()) -> Block:
        """Mine the next block (one slot later) and wait until the collector delivered it.

        `before` runs right before `evm_mine` (after the pacing sleep), for pool tricks
        that must not be visible to the mempool collector for long; `restore` (raw txs
        such a trick took out) is re-submitted right after it, then any tx anvil lost.
        """
        wait = self.c.block_wall_seconds - (time.monotonic() - self.last_mine_wall)
        time.sleep(max(wait, self.c.dwell_seconds))
        coinbase = coinbase or self._producer()
        if coinbase != self.coinbase:
            self.rpc.call("anvil_setCoinbase", coinbase)
            self.coinbase = coinbase
        self.slot += 1
        parent = self.recorder.blocks[self.head]
        stamp = timestamp if timestamp is not None else max(self.slot_time(self.slot),
                                                            parent.timestamp + 1)
        self.clock.anchor(float(self.slot_time(self.slot)))
        self.rpc.call("evm_setNextBlockTimestamp", stamp)
        if before is not None:
            before()
        pending = int(self.rpc.call("txpool_status").get("pending", "0x0"), 16)
        if pending * self.c.gas_per_tx > self.c.gas_limit:
            self._reorder_pool()
        self.rpc.call("evm_mine")
        self.last_mine_wall = time.monotonic()
        if restore:
            self._resend(list(restore))
        self._repair()
        self.head += 1
        return self.recorder.wait_block(self.head)

    def _producer(self) -> str:
        return str(self.rng.choice(self.producers, p=self.producer_weights))

    def normal_blocks(self, count: int) -> None:
        for _ in range(count):
            self.send(self.normal_txs())
            self.mine()

    # ---- traffic ----

    def base_fee(self) -> int:
        block = self.recorder.blocks.get(self.head)
        return block.base_fee_per_gas or GWEI if block else GWEI

    def _tip(self, factor: float = 1.0) -> int:
        return max(int(self.market_tip * factor * self.rng.lognormal(0.0, 0.55)), 1)

    def _next_nonce(self, sender: str) -> int:
        holes = self.nonce_holes.get(sender)
        if holes:  # a refused tx left a gap below the sender's later txs: fill it first
            return holes.pop(0)
        nonce = self.nonces.get(sender, 0)
        self.nonces[sender] = nonce + 1
        return nonce

    def tx(self, sender: str, *, to: str | None, value: int = 0, data: str | None = None,
           gas: int | None = None, tip: int | None = None, legacy: bool = False,
           nonce: int | None = None) -> dict[str, Any]:
        """An eth_sendTransaction request with wallet-like fees (max fee = 2 base + tip)."""
        tip = tip if tip is not None else self._tip()
        base = self.base_fee()
        req: dict[str, Any] = {
            "from": sender, "value": hex(value),
            "nonce": hex(nonce if nonce is not None else self._next_nonce(sender)),
            "gas": hex(gas or (21_000 if data is None else 90_000)),
        }
        if to is not None:
            req["to"] = to
        if data is not None:
            req["input"] = data
        if legacy:
            req["gasPrice"] = hex(2 * base + tip)
        else:
            req["maxPriorityFeePerGas"] = hex(tip)
            req["maxFeePerGas"] = hex(2 * base + tip)
        return req

    def normal_txs(self, extra: int = 0) -> list[dict[str, Any]]:
        """One block's worth of ordinary traffic; load and tips drift slowly."""
        self.load_phase += 2 * math.pi / 180
        self.market_tip = float(np.clip(self.market_tip * math.exp(self.rng.normal(0, 0.04)),
                                        0.4 * GWEI, 4 * GWEI))
        # demand follows a slow cycle and backs off when the base fee is high (elastic),
        # so the base fee oscillates around 1 gwei with the load instead of running away
        elastic = float(np.clip((GWEI / max(self.base_fee(), 1)) ** 0.6, 0.3, 2.5))
        lam = self.c.load_mean * (1 + 0.45 * math.sin(self.load_phase)) * elastic
        n = int(np.clip(self.rng.poisson(lam), 5, 140)) + extra
        # people send one tx per block: a sender repeats only when the block is huge
        senders = self.rng.choice(len(self.users), size=n, p=self.user_weights,
                                  replace=n > len(self.users))
        out: list[dict[str, Any]] = []
        for i in senders:
            sender = self.users[int(i)]
            legacy = bool(self.rng.random() < 0.12)
            roll = self.rng.random()
            if roll < 0.55:
                to = self.users[int(self.rng.integers(len(self.users)))]
                value = int(self.rng.lognormal(math.log(0.05), 1.5) * ETHER)
                out.append(self.tx(sender, to=to, value=value, legacy=legacy))
            elif roll < 0.88:
                token = self.tokens[int(self.rng.integers(len(self.tokens)))]
                sel = TOKEN_SELECTORS[int(self.rng.choice(3, p=[0.7, 0.2, 0.1]))]
                who = self.users[int(self.rng.integers(len(self.users)))]
                args = _word(int(who, 16)) + _word(int(self.rng.integers(1, 10**9)) * 10**9)
                out.append(self.tx(sender, to=token, data="0x" + sel + args, legacy=legacy,
                                   gas=int(self.rng.choice([65_000, 80_000, 100_000]))))
            else:
                out.append(self.swap(sender, legacy=legacy))
        return self.by_tip(out)

    def by_tip(self, txs: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """The builder's order: highest effective tip first, each sender's nonces ascending.

        anvil mines in arrival order (`--order fifo`: its fee ordering loses a sender's
        later nonces when they pay more than the earlier ones), so the runner sends each
        batch in the order a tip-maximising builder would include it.
        """
        base = self.base_fee()

        def tip(t: dict[str, Any]) -> int:
            if "gasPrice" in t:
                return int(t["gasPrice"], 16) - base
            return min(int(t["maxPriorityFeePerGas"], 16), int(t["maxFeePerGas"], 16) - base)

        ordered = sorted(txs, key=tip, reverse=True)
        nonces: dict[str, list[int]] = {}
        for t in txs:
            nonces.setdefault(t["from"], []).append(int(t["nonce"], 16))
        for values in nonces.values():
            values.sort(reverse=True)
        return [{**t, "nonce": hex(nonces[t["from"]].pop())} for t in ordered]

    def swap(self, sender: str, *, pool: str | None = None, selector: str | None = None,
             tip: int | None = None, legacy: bool = False) -> dict[str, Any]:
        pool = pool or self.pools[int(self.rng.integers(len(self.pools)))]
        sel = selector or SWAP_SELECTORS[int(self.rng.integers(len(SWAP_SELECTORS)))]
        amount = int(self.rng.lognormal(math.log(2), 1.0) * ETHER)
        args = _word(amount) + _word(0) + _word(128) + _word(int(sender, 16))
        value = amount // 10 if sel == "7ff36ab5" else 0
        return self.tx(sender, to=pool, data="0x" + sel + args, value=value, tip=tip,
                       gas=150_000, legacy=legacy)

    def send(self, txs: list[dict[str, Any]]) -> list[str]:
        """Submit in one batch; a refused tx gives back its nonce (the sender stays usable).

        The nonce goes back to the counter when it was the sender's last one, otherwise it
        is a hole below txs already sent, which the sender's next tx fills.
        """
        hashes: list[str] = []
        results = self.rpc.batch([("eth_sendTransaction", [t]) for t in txs])
        for req, (result, error) in zip(txs, results, strict=True):
            sender, nonce = req["from"], int(req["nonce"], 16)
            if error is None and isinstance(result, str):
                hashes.append(result.lower())
                self.sent += 1
            else:
                hashes.append("")
                self.warnings.append(f"tx refused by anvil: {error}")
                if (sender, nonce) in self.unmined:
                    continue  # a refused replacement: the earlier tx keeps the nonce
                if self.nonces.get(sender) == nonce + 1:
                    self.nonces[sender] = nonce
                else:
                    self.nonce_holes[sender] = sorted([*self.nonce_holes.get(sender, []), nonce])
        sent = [(t, h) for t, h in zip(txs, hashes, strict=True) if h]
        raws = self.rpc.batch([("eth_getRawTransactionByHash", [h]) for _t, h in sent])
        for (t, h), (raw, _error) in zip(sent, raws, strict=True):
            if isinstance(raw, str):
                self.unmined[(t["from"], int(t["nonce"], 16))] = (h, raw)
        return hashes

    def send_from(self, sender: str, txs: list[dict[str, Any]]) -> list[str]:
        """Send a batch; the hashes of `sender`'s transactions in it."""
        hashes = self.send(txs)
        return [h for t, h in zip(txs, hashes, strict=True) if t["from"] == sender and h]

    def _deploy(self) -> None:
        deployer = self.reserve.pop()
        txs = [self.tx(deployer, to=None, data=initcode(_CALLER_COUNTER), gas=200_000)
               for _ in range(3)]
        txs += [self.tx(deployer, to=None, data=initcode(_SELECTOR_COUNTER), gas=200_000)
                for _ in range(2)]
        hashes = self.send(txs)
        self.mine()
        receipts = [self.rpc.call("eth_getTransactionReceipt", h) for h in hashes]
        addresses = [str(r["contractAddress"]).lower() for r in receipts]
        self.tokens, self.pools = addresses[:3], addresses[3:]

    # ---- labels ----

    def _label(self, kind: str, scenario: str, *, tx_hashes: Sequence[str] = (),
               miner: str | None = None, sender: str | None = None,
               first_block: int | None = None, last_block: int | None = None,
               awaiting: Sequence[str] | None = None, **details: Any) -> Label:
        label = Label(
            id=f"{len(self.labels) + len(self.pending_labels) + 1:03d}-{scenario}",
            scenario=scenario, family=KIND_FAMILY[kind], kind=kind, chain_id=self.chain_id,
            node=NODE, first_block=first_block, last_block=last_block,
            tx_hashes=tuple(tx_hashes), miner=miner, sender=sender,
            injected_at=round(self.clock.now(), 3), injected_wall_at=round(time.time(), 3),
            details=details,
        )
        if label.tx_hashes and first_block is None:
            self.awaiting[label.id] = [h for h in (awaiting or label.tx_hashes) if h]
            self.pending_labels.append(label)  # blocks known once the txs are included
        else:
            self.labels.append(label)
        return label

    def _resolve_labels(self) -> None:
        still: list[Label] = []
        for label in self.pending_labels:
            if all(h in self.recorder.tx_block for h in self.awaiting[label.id]):
                self._finish_label(label)
            else:
                still.append(label)
        self.pending_labels = still

    def _finish_label(self, label: Label) -> None:
        numbers = [self.recorder.tx_block[h][0] for h in self.awaiting.get(label.id, [])
                   if h in self.recorder.tx_block]
        if numbers:
            label = replace(label, first_block=min(numbers), last_block=max(numbers))
        if label.kind == "sandwich" and numbers:
            block = self.recorder.blocks[numbers[0]]
            index = {tx.hash: tx.transaction_index for tx in block.transactions}
            positions = [index.get(h) for h in label.tx_hashes]
            first = positions[0] if positions else None
            ok = len(set(numbers)) == 1 and first is not None and (
                positions == list(range(first, first + 3)))
            label = replace(label, details={**label.details, "indices": positions,
                                            "adjacent": ok})
            if not ok:
                self.warnings.append(f"label {label.id}: sandwich not adjacent: {positions}")
        self.labels.append(label)

    def _take_reserve(self) -> str:
        if not self.reserve:
            raise ChainwatchError("scenario: out of reserve accounts (raise reserve_accounts)")
        return self.reserve.pop(0)

    # ---- anomalies ----

    def inject_reorg(self, depth: int) -> None:
        """Mine `depth` blocks on a snapshot, revert, and mine a longer branch over them."""
        ancestor = self.head
        snapshot = self.rpc.call("evm_snapshot")
        first_slot = self.slot + 1
        old = []
        for _ in range(depth):
            self.send(self.normal_txs())
            old.append(self.mine())
        pending = self._pool_hashes()
        mined = [tx.hash for b in old for tx in b.transactions]
        raws = self._raws(mined + pending)
        if len(raws) == len(mined) + len(pending):  # the dropped branch's txs: unmined again
            for tx, raw in zip([tx for b in old for tx in b.transactions], raws, strict=False):
                self.unmined[(tx.from_address, tx.nonce)] = (tx.hash, raw)
        if not self.rpc.call("evm_revert", snapshot):
            raise ChainwatchError("scenario: evm_revert refused the snapshot")
        self.rpc.call("anvil_dropAllTransactions")
        miner = self._address("reorg-miner", len(self.labels))
        self._resend(raws)
        for _ in range(depth + 1):  # fresh traffic, so no block of the branch is empty
            self.send(self.normal_txs())
        self.rpc.call("anvil_setCoinbase", miner)
        self.coinbase = miner
        self.slot = first_slot + depth  # the new branch's tip takes the next slot
        self.clock.anchor(float(self.slot_time(self.slot)))
        self.rpc.call("evm_setNextBlockTimestamp", self.slot_time(first_slot))
        self.rpc.call("anvil_mine", hex(depth + 1), hex(self.c.block_time))
        self.last_mine_wall = time.monotonic()
        new_head = ancestor + depth + 1
        self.head = new_head
        self.recorder.wait(
            lambda: (new_head in self.recorder.blocks
                     and self.recorder.blocks[ancestor + 1].hash != old[0].hash),
            30, f"the new branch up to block {new_head}")
        self._repair()
        self._label("reorg", f"reorg_depth_{depth}", miner=miner,
                    first_block=ancestor + 1, last_block=ancestor + depth, depth=depth,
                    dropped_block_hashes=[b.hash for b in old])

    def _reorder_pool(self) -> None:
        """Re-submit a backlog in a tip-maximising builder's order (anvil mines FIFO).

        Greedy as geth's miner: the best effective tip among each sender's next nonce,
        then that sender's following one. Queued transactions go last.
        """
        import heapq

        content = self.rpc.call("txpool_content") or {}
        base = self.base_fee()

        def tip(tx: dict[str, Any]) -> int:
            if tx.get("maxPriorityFeePerGas") is None:
                return int(tx["gasPrice"], 16) - base
            return min(int(tx["maxPriorityFeePerGas"], 16), int(tx["maxFeePerGas"], 16) - base)

        def queues(part: str) -> dict[str, list[dict[str, Any]]]:
            return {sender.lower(): [tx for _n, tx in sorted(txs.items(),
                                                              key=lambda kv: int(kv[0]))]
                    for sender, txs in (content.get(part) or {}).items()}

        pending = queues("pending")
        heap = [(-tip(txs[0]), sender, 0) for sender, txs in pending.items() if txs]
        heapq.heapify(heap)
        order: list[str] = []
        while heap:
            _t, sender, i = heapq.heappop(heap)
            order.append(str(pending[sender][i]["hash"]).lower())
            if i + 1 < len(pending[sender]):
                heapq.heappush(heap, (-tip(pending[sender][i + 1]), sender, i + 1))
        order += [str(tx["hash"]).lower() for txs in queues("queued").values() for tx in txs]
        raws = self._raws(order)
        if len(raws) != len(order):
            return  # the pool changed under us: leave it as it is
        self.rpc.call("anvil_dropAllTransactions")
        self._resend(raws)

    def _pool_hashes(self) -> list[str]:
        content = self.rpc.call("txpool_content") or {}
        out: list[str] = []
        for part in ("pending", "queued"):
            for by_nonce in (content.get(part) or {}).values():
                for _nonce, tx in sorted(by_nonce.items(), key=lambda kv: int(kv[0])):
                    out.append(str(tx["hash"]).lower())
        return out

    def _raws(self, hashes: list[str]) -> list[str]:
        results = self.rpc.batch([("eth_getRawTransactionByHash", [h]) for h in hashes])
        return [r for r, err in results if err is None and isinstance(r, str)]

    def _resend(self, raws: list[str]) -> None:
        for _result, error in self.rpc.batch([("eth_sendRawTransaction", [r]) for r in raws]):
            # under the base fee: _repair sends it again once the base fee allows
            if error is not None and "already" not in error and "base fee" not in error:
                self.warnings.append(f"re-submitted tx refused: {error}")

    def _missing(self) -> list[tuple[tuple[str, int], tuple[str, str]]]:
        """Sent txs that are neither mined nor in anvil's pool, by sender and nonce."""
        latest = self.rpc.call("eth_getBlockByNumber", "latest", False) or {}
        fresh = {str(h).lower() for h in latest.get("transactions") or []}  # not yet delivered
        mined = self.recorder.tx_block
        for key in [k for k, (h, _raw) in self.unmined.items() if h in mined or h in fresh]:
            del self.unmined[key]
        status = self.rpc.call("txpool_status") or {}
        size = int(status.get("pending", "0x0"), 16) + int(status.get("queued", "0x0"), 16)
        if size >= len(self.unmined):  # the pool holds only the runner's txs: none missing
            return []
        pool = set(self._pool_hashes())
        return sorted((k, v) for k, v in self.unmined.items() if v[0] not in pool)

    def _repair(self) -> None:
        """Re-submit (same raw bytes and hash) every sent tx anvil lost from its pool.

        Runs right after each block, so a lost tx is out of the pool for milliseconds.

        Real pools keep these; anvil does not: when a block's gas runs out before a sender's
        tx, its next nonce is tried anyway, fails as "nonce too high" and is evicted with
        all later ones; a tx whose fee cap falls below the base fee is evicted with its
        later nonces, and refused on re-submission until the base fee is back under it.
        """
        missing = self._missing()
        if not missing:
            return
        calls = [("eth_sendRawTransaction", [raw]) for _key, (_h, raw) in missing]
        for (key, (h, _raw)), (_result, error) in zip(missing, self.rpc.batch(calls),
                                                      strict=True):
            if error is None:
                self.resubmitted += 1
            elif "base fee" in error:
                self.underpriced.add(h)  # kept: retried before the next block
            elif "nonce too low" in error:
                del self.unmined[key]  # the nonce is used: mined, or replaced
            elif "already" not in error:
                del self.unmined[key]
                self.warnings.append(f"lost tx {h} refused on re-submission: {error}")

    def inject_fee_outlier(self) -> None:
        sender = self._take_reserve()
        factor = float(np.exp(self.rng.uniform(math.log(50), math.log(1000))))
        tip = int(self.market_tip * factor)
        if self.rng.random() < 0.5:
            to = self.users[int(self.rng.integers(len(self.users)))]
            req = self.tx(sender, to=to, value=int(0.2 * ETHER), tip=tip)
        else:
            req = self.swap(sender, tip=tip)
        hashes = self.send_from(sender, self.by_tip([*self.normal_txs(), req]))
        self._label("fee_outlier", "fee_outlier", tx_hashes=hashes, sender=sender,
                    tip_factor=round(factor, 1), tip_wei=tip)
        self.mine()

    def inject_spam_burst(self) -> None:
        sender = self._take_reserve()
        count = int(self.rng.integers(60, 151))
        target = self.users[int(self.rng.integers(len(self.users)))]
        spam = [self.tx(sender, to=target, value=int(self.rng.integers(1, 10**6)),
                        tip=self._tip()) for _ in range(count)]
        hashes = self.send_from(sender, self.by_tip([*self.normal_txs(), *spam]))
        self._label("spam_burst", "spam_burst", tx_hashes=hashes, sender=sender, txs=count)
        self.mine()

    def inject_replacement_spam(self) -> None:
        """One nonce replaced 6-10 times with ~15% fee bumps, then mined."""
        sender = self._take_reserve()
        nonce = self._next_nonce(sender)
        times = int(self.rng.integers(6, 11))
        tip = self._tip()
        hashes: list[str] = []
        self.send(self.normal_txs())
        for _ in range(times + 1):
            hashes += self.send([self.tx(sender, to=sender, value=1, tip=tip, nonce=nonce)])
            tip = int(tip * 1.15) + 1
            time.sleep(0.06)  # the subscription sees each version
        self._label("spam_burst", "replacement_spam", tx_hashes=hashes, sender=sender,
                    awaiting=hashes[-1:], replacements=times)
        self.mine()

    def inject_sandwich(self) -> None:
        """Attacker front-runs and back-runs a victim's swap on one pool, in one block."""
        attacker, victim = self._take_reserve(), self._take_reserve()
        pool = self.pools[int(self.rng.integers(len(self.pools)))]
        txs = self.normal_txs()
        top = max((int(t.get("maxPriorityFeePerGas") or t["gasPrice"], 16) for t in txs),
                  default=GWEI)
        top += int(self.base_fee() * 0.3)  # above legacy txs' effective tip too
        front = self.swap(attacker, pool=pool, selector="7ff36ab5", tip=int(top * 1.6))
        middle = self.swap(victim, pool=pool, selector="7ff36ab5", tip=int(top * 1.4))
        back = self.swap(attacker, pool=pool, selector="18cbafe5", tip=int(top * 1.2))
        hashes = self.send([front, middle, back, *txs])[:3]  # the top of the block
        self._label("sandwich", "sandwich", tx_hashes=hashes, sender=attacker, contract=pool,
                    victim=victim)
        self.mine()

    def inject_miner_dominance(self) -> None:
        lo, hi = self.c.dominance_blocks
        length = int(self.rng.integers(lo, hi + 1))
        share = float(self.rng.uniform(0.8, 1.0))
        miner = self._address("dominant", len(self.labels))
        first = self.head + 1
        mine_count = 0
        for _ in range(length):
            self.send(self.normal_txs())
            own = self.rng.random() < share
            mine_count += int(own)
            self.mine(coinbase=miner if own else None)
        self._label("miner_dominance", "miner_dominance", miner=miner, first_block=first,
                    last_block=self.head, blocks=length, produced=mine_count)

    def inject_empty_blocks(self) -> None:
        """A surge fills the pool; one producer then mines 2-3 empty blocks over it."""
        miner = self._address("empty", len(self.labels))
        runs = int(self.rng.integers(2, 4))
        self.send(self.normal_txs(extra=90))
        time.sleep(0.3)  # a mempool snapshot sees the full pool
        first = self.head + 1
        pool_sizes = []
        for _ in range(runs):
            self.send(self.normal_txs())
            time.sleep(0.25)
            hashes = self._pool_hashes()
            pool_sizes.append(len(hashes))
            raws = self._raws(hashes)
            self.mine(coinbase=miner, before=lambda: self.rpc.call("anvil_dropAllTransactions"),
                      restore=raws)
        self._label("empty_blocks", "empty_blocks", miner=miner, first_block=first,
                    last_block=self.head, blocks=runs, pool_sizes=pool_sizes)

    def inject_timestamp_manipulation(self) -> None:
        miner = self._address("clock", len(self.labels))
        ahead = len([lb for lb in self.labels if lb.kind == "timestamp_manipulation"]) % 2 == 0
        first = self.head + 1
        if ahead:
            shift = int(self.rng.integers(60, 151))
            self.send(self.normal_txs())
            block = self.mine(coinbase=miner, timestamp=self.slot_time(self.slot + 1) + shift)
            drift = [shift]
            blocks = 1
            # honest blocks can only add 1 s to a clock already ahead: until the slots catch
            # up, the chain's timestamps are still the manipulation's doing, so they belong
            # to the label's range (its miner stays the one producer to blame)
            while self.slot_time(self.slot + 1) <= block.timestamp:
                self.send(self.normal_txs())
                self.mine()
        else:
            blocks = int(self.rng.integers(2, 5))
            drift = []
            for _ in range(blocks):
                self.send(self.normal_txs())
                parent = self.recorder.blocks[self.head]
                block = self.mine(coinbase=miner, timestamp=parent.timestamp + 1)
                drift.append(block.timestamp - self.slot_time(self.slot))
        self._label("timestamp_manipulation",
                    "timestamp_ahead" if ahead else "timestamp_behind", miner=miner,
                    first_block=first, last_block=self.head, blocks=blocks,
                    drift_seconds=drift, last_timestamp=block.timestamp)

    def inject_censorship(self) -> None:
        """High-fee txs of one sender stay pending while one producer mines 6-10 blocks."""
        sender = self._take_reserve()
        miner = self._address("censor", len(self.labels))
        count = int(self.rng.integers(2, 5))
        tip = int(self.market_tip * float(self.rng.uniform(4, 8)))
        txs = [self.tx(sender, to=self.users[int(self.rng.integers(len(self.users)))],
                       value=int(0.5 * ETHER), tip=tip) for _ in range(count)]
        hashes = self.send_from(sender, self.by_tip([*self.normal_txs(), *txs]))
        time.sleep(0.05)
        raws = self._raws(hashes)
        blocks = int(self.rng.integers(6, 11))
        first = self.head + 1

        def drop() -> None:
            self.rpc.batch([("anvil_dropTransaction", [h]) for h in hashes])

        for i in range(blocks):
            if i:
                self.send(self.normal_txs())
            self.mine(coinbase=miner, before=drop, restore=raws)
        self._label("censorship", "censorship", tx_hashes=hashes, miner=miner, sender=sender,
                    first_block=first, last_block=self.head, blocks=blocks, tip_wei=tip)

    # ---- output ----

    def _write(self, seconds: float) -> SessionResult:
        labels = sorted(self.labels, key=lambda lb: lb.id)
        with (self.out_dir / LABELS_FILE).open("w") as out:
            for label in labels:
                out.write(label.to_json() + "\n")
        by_kind: dict[str, int] = {}
        for label in labels:
            by_kind[label.kind or label.family] = by_kind.get(label.kind or label.family, 0) + 1
        blocks = len(self.recorder.blocks)
        txs = sum(b.tx_count for b in self.recorder.blocks.values())
        result = SessionResult(
            out_dir=self.out_dir, blocks=blocks, transactions=txs,
            records=self.recorder.records, labels=len(labels),
            reorgs_recorded=self.recorder.reorgs, seconds=seconds, by_kind=by_kind,
            warnings=(self.warnings[:50] + self.recorder.invalid[:10]
                      + [f"batch refused: {m}" for m in self.rpc.refused_batches[:10]]),
        )
        session = {
            "config": asdict(self.c), "gas_limit": self.c.gas_limit, "node": NODE,
            "chain_id": self.chain_id, "seed": self.c.seed,
            "blocks": blocks, "transactions": txs, "records": self.recorder.records,
            "record_counts": self.recorder.counts, "labels": len(labels), "by_kind": by_kind,
            "reorgs_recorded": self.recorder.reorgs, "seconds": round(seconds, 1),
            "txs_sent": self.sent, "txs_resubmitted": self.resubmitted,
            "txs_underpriced": len(self.underpriced), "txs_lost": self.lost_at_end,
            "txs_unmined": len(self.unmined), "warnings": result.warnings,
            "notes": list(SIMULATION_NOTES),
        }
        (self.out_dir / SESSION_FILE).write_text(json.dumps(session, indent=2, sort_keys=True))
        return result


def run_session(config: ScenarioConfig, out_dir: Path,
                progress: Callable[[str], None] | None = None) -> SessionResult:
    """Run one recorded, labelled session on a fresh local anvil."""
    return ScenarioRunner(config, out_dir, progress).run()


# --- `chainwatch evaluate` ----------------------------------------------------------------


def evaluate_recording(directory: Path) -> tuple[Evaluation, dict[str, Any]]:
    """Replay a saved recording through the detector and score it against its labels."""
    from detector.evaluation import evaluate, replay
    from detector.training import History, read_jsonl

    records_path, labels_path = directory / RECORDS_FILE, directory / LABELS_FILE
    for path in (records_path, labels_path):
        if not path.is_file():
            raise ChainwatchError(f"no recording in {directory}: {path.name} is missing")
    labels = read_labels(labels_path)  # a bad line: one-line LabelError
    history = History()
    run = replay(read_jsonl(records_path, history))
    session_path = directory / SESSION_FILE
    session: dict[str, Any] = {}
    if session_path.is_file():
        with contextlib.suppress(ValueError):
            session = json.loads(session_path.read_text())
    session["invalid_lines"] = history.invalid_count
    session["invalid_samples"] = history.invalid[:20]
    return evaluate(run, labels), session


def run_evaluate(*, out: Path, record: Path | None, quick: bool, from_recording: Path | None,
                 seed: int | None = None,
                 progress: Callable[[str], None] | None = None) -> str:
    """Run the scenarios (or reuse a recording), evaluate, write the markdown report."""
    from detector.evaluation import render_markdown

    say = progress or (lambda _m: None)
    if out.is_dir():
        raise ConfigError(f"--out {out} is a directory: give the report's file name")
    output_directory(out.parent, "--out")
    if record is not None and from_recording is None:
        output_directory(record, "--record")
    if from_recording is not None:
        directory = from_recording
    else:
        config = ScenarioConfig.quick() if quick else ScenarioConfig()
        if seed is not None:
            config = ScenarioConfig(**{**asdict(config), "seed": seed})
        directory = record or Path(".cache/scenarios") / ("quick" if quick else "full")
        result = run_session(config, directory, say)
        say(result.summary())
    say(f"replaying {directory / RECORDS_FILE} through the detector")
    evaluation, session = evaluate_recording(directory)
    for line in session["invalid_samples"]:
        say(f"skipped {line}")
    flags = " --quick" if session.get("config", {}).get("name") == "quick" else ""
    seed_flag = f" --seed {session['seed']}" if "seed" in session else ""
    command = (
        f"chainwatch evaluate{flags}{seed_flag} --record {directory} --out {out}\n"
        f"# or, without anvil, on the saved recording:\n"
        f"chainwatch evaluate --from-recording {directory} --out {out}"
    )
    text = render_markdown(evaluation, command=command, session=session,
                           notes=session.get("notes", SIMULATION_NOTES))
    try:
        out.write_text(text)  # its directory was made (and checked) before the run
    except OSError as exc:
        raise written(out, exc) from None
    overall = evaluation.overall
    recall = "-" if overall.recall is None else f"{overall.recall:.2f}"
    return (
        f"evaluated {evaluation.blocks} blocks ({evaluation.normal_blocks} normal), "
        f"{len(evaluation.outcomes)} labels: {overall.detected} detected (recall {recall}), "
        f"{overall.false_findings} false findings"
        + (f", {session['invalid_lines']} invalid record lines skipped"
           if session["invalid_lines"] else "")
        + f" -> {out}"
    )
