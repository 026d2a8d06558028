"""Pipeline benchmarks: blocks/s (embedded bus, Kafka) and new-head -> metric latency (anvil).

    .venv/bin/python -m bench.pipeline embedded [--blocks 10000] [--txs 150] [--profile]
    .venv/bin/python -m bench.pipeline kafka    [--blocks 10000] [--txs 150]
    .venv/bin/python -m bench.pipeline latency  [--samples 200] [--poll-samples 40]
    .venv/bin/python -m bench.pipeline all      [--json]

Every mode runs the project's real code: BlockCollector (ChainFollower, encode, publish,
flush, checkpoint) and DetectorService (poll, decode, Detector.process, commit); only
the node is replaced by an in-memory, mainnet-shaped history (bench.synthetic) for the
throughput modes. Figures are printed, with the machine they were taken on; see
docs/performance.md for what they mean.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import cProfile
import gc
import io
import json
import multiprocessing
import os
import platform
import pstats
import random
import resource
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from importlib import metadata
from multiprocessing.queues import Queue as MpQueue
from multiprocessing.synchronize import Event as MpEvent
from pathlib import Path
from typing import Any, cast

from bench.synthetic import MemoryNode, generate
from chainwatch.bus import Bus, Consumer, EmbeddedBus, Message, Topics
from chainwatch.httpserver import Health
from chainwatch.metrics import Metrics
from chainwatch.schema import AnyRecord, Block, Finding, decode, encode
from collector.chain import ChainFollower, ChainTracker
from collector.checkpoint import FileCheckpointStore
from collector.rpc import NodeRpc
from collector.service import BlockCollector, CollectorConfig
from detector.engine import Detector, DetectorConfig
from detector.service import DetectorService

Result = dict[str, Any]
BATCH_SIZE = 100  # collector blocks per step (CollectorConfig default)
DETECTOR_BATCH = 500  # DetectorService max_batch default


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# -- machine and process facts ---------------------------------------------------------


def machine_info() -> dict[str, Any]:
    cpu = platform.processor() or "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    mem_gb = 0.0
    with contextlib.suppress(OSError, ValueError, IndexError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                mem_gb = int(line.split()[1]) / 1024 / 1024
    # CHAINWATCH_BENCH_COMMIT names the commit when running from an exported snapshot
    commit = os.environ.get("CHAINWATCH_BENCH_COMMIT", "unknown")
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        root = Path(__file__).resolve().parents[1]
        commit = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            timeout=5,
            check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=5,
            check=True,
        ).stdout.strip()
        commit += "+dirty" if dirty else ""
    versions = {}
    for dist in ("pydantic", "polars", "pyod", "scikit-learn", "kafka-python", "web3"):
        with contextlib.suppress(metadata.PackageNotFoundError):
            versions[dist] = metadata.version(dist)
    return {
        "date": time.strftime("%Y-%m-%d %H:%M %Z"),
        "cpu": cpu,
        "cores": os.cpu_count(),
        "usable_cores": len(os.sched_getaffinity(0)),
        "memory_gb": round(mem_gb, 1),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "commit": commit,
        "load_at_start": " ".join(f"{x:.2f}" for x in os.getloadavg()),
        "versions": versions,
    }


def rss_mb() -> float:
    """Current resident set size (MB)."""
    with contextlib.suppress(OSError, ValueError, IndexError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def peak_rss_mb() -> float:
    """Peak resident set size of this process so far (MB; ru_maxrss is in KB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def percentile(values: Sequence[float], p: float) -> float:
    """Nearest-rank percentile (p in 0..100)."""
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    rank = max(int(-(-p * len(ordered) // 100)), 1)  # ceil(p/100 * n), at least 1
    return ordered[min(rank, len(ordered)) - 1]


def print_table(title: str, rows: Sequence[tuple[str, str]]) -> None:
    width = max(len(k) for k, _ in rows)
    print(f"\n== {title} ==")
    for key, value in rows:
        print(f"  {key.ljust(width)}  {value}")
    sys.stdout.flush()


def print_machine(info: dict[str, Any]) -> None:
    versions = ", ".join(f"{k} {v}" for k, v in info["versions"].items())
    print_table(
        "machine",
        [
            ("date", info["date"]),
            ("cpu", f"{info['cpu']} ({info['cores']} cores, {info['usable_cores']} usable)"),
            ("memory", f"{info['memory_gb']} GB"),
            ("python", f"{info['python']} on {info['platform']}"),
            ("commit", info["commit"]),
            ("load average", f"{info['load_at_start']} (1/5/15 min, at start)"),
            ("libraries", versions),
        ],
    )


# -- instrumented pieces (subclasses: the application code is unchanged) ----------------


class CountingDetector(Detector):
    """The real Detector (default DetectorConfig) that also says when it has seen
    `target` blocks of one node, and adds up the CPU time spent in `process`."""

    def __init__(self, metrics: Metrics, target: int, chain_id: int, node: str) -> None:
        super().__init__(DetectorConfig(), metrics)
        self.target = target
        self.key = (chain_id, node)
        self.done = threading.Event()
        self.process_cpu = 0.0
        self.batches = 0
        self.findings_total = 0

    def process(self, records: Sequence[AnyRecord], txs: Any = None) -> list[Finding]:
        started = time.thread_time()
        findings = super().process(records, txs)
        self.process_cpu += time.thread_time() - started
        self.batches += 1
        self.findings_total += len(findings)
        if self.blocks_done >= self.target:
            self.done.set()
        return findings

    @property
    def blocks_done(self) -> int:
        state = self.state.nodes.get(self.key)
        return state.blocks_observed if state is not None else 0


class TimedDetectorService(DetectorService):
    """DetectorService that adds up the CPU time of `handle` (decode + process)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.handle_cpu = 0.0

    def handle(self, messages: list[Message]) -> list[Finding]:
        started = time.thread_time()
        try:
            return super().handle(messages)
        finally:
            self.handle_cpu += time.thread_time() - started


def make_collector(
    node: MemoryNode, bus: Bus, topics: Topics, metrics: Metrics, health: Health, state_dir: Path
) -> BlockCollector:
    """The real BlockCollector, following the in-memory node from block 0."""
    return BlockCollector(
        cast(NodeRpc, node),  # MemoryNode answers every NodeRpc call the collector makes
        bus,
        topics,
        FileCheckpointStore(state_dir),
        metrics,
        health,
        CollectorConfig(batch_size=BATCH_SIZE, start_block=0),
    )


async def collect_all(collector: BlockCollector) -> None:
    """start() then catch_up(): step, publish, flush and checkpoint until the head."""
    await collector.start()
    await collector.catch_up()


@dataclass
class ThreadOutcome:
    wall: float = 0.0
    cpu: float = 0.0
    error: BaseException | None = None


def run_collector_thread(collector: BlockCollector, outcome: ThreadOutcome) -> None:
    started, cpu = time.perf_counter(), time.thread_time()
    try:
        asyncio.run(collect_all(collector))
    except BaseException as exc:  # reported by the main thread
        outcome.error = exc
    outcome.wall = time.perf_counter() - started
    outcome.cpu = time.thread_time() - cpu


def wait_for_detector(
    detector: CountingDetector,
    started: float,
    *,
    what: str,
    timeout: float,
    consumer: Consumer | None = None,
    alive: Callable[[], BaseException | None] = lambda: None,
) -> int:
    """Block until the detector has seen every block; log progress; return max lag seen."""
    max_lag = 0
    next_log = started + 5
    deadline = started + timeout
    while not detector.done.wait(0.25):
        now = time.perf_counter()
        if consumer is not None:
            lag = consumer.lag()
            max_lag = max(max_lag, lag or 0)
        error = alive()
        if error is not None:
            raise RuntimeError(f"{what}: collector failed: {error!r}") from error
        if now > deadline:
            raise TimeoutError(f"{what}: detector saw {detector.blocks_done} blocks in {timeout}s")
        if now >= next_log:
            next_log += 5
            done = detector.blocks_done
            log(
                f"  {what}: {done}/{detector.target} blocks "
                f"({done / (now - started):.0f} blocks/s so far)"
            )
    return max_lag


# -- stage costs, one thread, no bus (also the profile target) -------------------------


async def sequential_stages(blocks: Sequence[Block]) -> dict[str, float]:
    """Follower, encode, decode and detector in one thread: seconds per stage."""
    node = MemoryNode(blocks)
    follower = ChainFollower(
        node,
        ChainTracker(64),
        chain_id=blocks[0].chain_id,
        node=node.node,
        batch_size=BATCH_SIZE,
        start_block=0,
    )
    detector = Detector(DetectorConfig(), Metrics())
    costs = {"follow": 0.0, "encode": 0.0, "decode": 0.0, "detect": 0.0}
    pending: list[bytes] = []

    def drain() -> None:
        t0 = time.perf_counter()
        records = [decode(p) for p in pending]
        t1 = time.perf_counter()
        detector.process(records)
        costs["decode"] += t1 - t0
        costs["detect"] += time.perf_counter() - t1
        pending.clear()

    while True:
        t0 = time.perf_counter()
        records = await follower.step()
        t1 = time.perf_counter()
        if not records:
            break
        pending.extend(encode(r) for r in records)
        costs["follow"] += t1 - t0
        costs["encode"] += time.perf_counter() - t1
        if len(pending) >= DETECTOR_BATCH:
            drain()
    if pending:
        drain()
    return costs


def profile_sequential(blocks: Sequence[Block], top: int = 25) -> str:
    profiler = cProfile.Profile()
    profiler.enable()
    asyncio.run(sequential_stages(blocks))
    profiler.disable()
    out = io.StringIO()
    stats = pstats.Stats(profiler, stream=out).strip_dirs()
    stats.sort_stats("tottime").print_stats(top)
    stats.sort_stats("cumulative").print_stats(top)
    return out.getvalue()


# -- embedded --------------------------------------------------------------------------


def bench_embedded(blocks: list[Block], *, profile: bool) -> Result:
    n = len(blocks)
    txs = sum(b.tx_count for b in blocks)
    chain_id, node_name = blocks[0].chain_id, blocks[0].node
    rss_before = rss_mb()

    metrics, health, topics = Metrics(), Health(time.time), Topics("bench")
    bus = EmbeddedBus()  # what bootstrap.make_bus gives `chainwatch run` without Kafka
    detector = CountingDetector(metrics, n, chain_id, node_name)
    service = TimedDetectorService(bus, topics, detector, health)
    consumer = service.subscribe()  # before the collector publishes (bootstrap's order)
    stop = threading.Event()
    outcome = ThreadOutcome()
    with tempfile.TemporaryDirectory(prefix="chainwatch-bench-") as state_dir:
        collector = make_collector(
            MemoryNode(blocks), bus, topics, metrics, health, Path(state_dir)
        )
        detector_thread = threading.Thread(target=service.run, args=(stop,), name="detector")
        collector_thread = threading.Thread(
            target=run_collector_thread, args=(collector, outcome), name="collector"
        )
        log(f"embedded: {n} blocks, {txs} txs through EmbeddedBus")
        started = time.perf_counter()
        detector_thread.start()
        collector_thread.start()
        try:
            max_lag = wait_for_detector(
                detector,
                started,
                what="embedded",
                timeout=3600,
                consumer=consumer,
                alive=lambda: outcome.error,
            )
            elapsed = time.perf_counter() - started
        finally:
            stop.set()
            detector_thread.join(timeout=60)
            collector_thread.join(timeout=60)
    peak = peak_rss_mb()

    log("embedded: stage costs, one thread, no bus")
    costs = asyncio.run(sequential_stages(blocks))
    result: Result = {
        "mode": "embedded",
        "blocks": n,
        "txs": txs,
        "seconds": elapsed,
        "blocks_per_s": n / elapsed,
        "txs_per_s": txs / elapsed,
        "collector_wall_s": outcome.wall,
        "collector_cpu_s": outcome.cpu,
        "detector_handle_cpu_s": service.handle_cpu,
        "detector_process_cpu_s": detector.process_cpu,
        "detector_decode_cpu_s": service.handle_cpu - detector.process_cpu,
        "detector_batches": detector.batches,
        "findings": detector.findings_total,
        "model_fits": sum(m.fits for m in detector.models.values()),
        "max_queue_messages": max_lag,
        "stage_ms_per_block": {k: v / n * 1000 for k, v in costs.items()},
        "rss_before_mb": rss_before,
        "peak_rss_mb": peak,
    }
    if profile:
        log("embedded: profiling the one-thread path with cProfile")
        result["profile"] = profile_sequential(blocks)
    return result


def report_embedded(r: Result) -> None:
    n = r["blocks"]
    st = r["stage_ms_per_block"]
    serial = sum(st.values())
    print_table(
        f"embedded: collector -> EmbeddedBus -> detector ({n} blocks, {r['txs']} txs)",
        [
            (
                "end to end",
                f"{r['blocks_per_s']:,.0f} blocks/s   {r['txs_per_s']:,.0f} txs/s"
                f"   ({r['seconds']:.1f} s, generation excluded)",
            ),
            (
                "collector thread",
                f"done after {r['collector_wall_s']:.1f} s wall, "
                f"{r['collector_cpu_s'] / n * 1000:.3f} ms CPU/block "
                "(follow + encode + checkpoint)",
            ),
            ("detector decode", f"{r['detector_decode_cpu_s'] / n * 1000:.3f} ms CPU/block"),
            (
                "detector process",
                f"{r['detector_process_cpu_s'] / n * 1000:.3f} ms CPU/block "
                f"({r['detector_batches']} batches, {r['model_fits']} model "
                f"fits, {r['findings']} findings)",
            ),
            ("max queued", f"{r['max_queue_messages']} messages in the embedded queue"),
            ("stage costs", "one thread, no bus, ms per block:"),
            ("  follow", f"{st['follow']:.3f}"),
            ("  encode", f"{st['encode']:.3f}"),
            ("  decode", f"{st['decode']:.3f}"),
            ("  detect", f"{st['detect']:.3f}"),
            ("  sum", f"{serial:.3f} ms/block = {1000 / serial:,.0f} blocks/s on one core"),
            (
                "RSS",
                f"{r['rss_before_mb']:,.0f} MB after generating the history, "
                f"peak {r['peak_rss_mb']:,.0f} MB",
            ),
        ],
    )
    if "profile" in r:
        print("\n== cProfile of the one-thread path (top by tottime, then cumulative) ==")
        print(r["profile"])


# -- kafka -----------------------------------------------------------------------------


def kafka_collector_process(
    bootstrap: str,
    prefix: str,
    blocks: int,
    txs: float,
    seed: int,
    ready: MpEvent,
    go: MpEvent,
    results: MpQueue[Result],
) -> None:
    """Child process: the `chainwatch collect` half, over the in-memory history."""
    from chainwatch.bus.kafka import KafkaBus, KafkaConfig

    try:
        history = generate(blocks, txs, seed)
        gc.freeze()  # see main(): the history is the harness's, not the collector's
        bus = KafkaBus(KafkaConfig(bootstrap_servers=bootstrap, client_id="bench-collector"))
        with tempfile.TemporaryDirectory(prefix="chainwatch-bench-") as state_dir:
            collector = make_collector(
                MemoryNode(history),
                bus,
                Topics(prefix),
                Metrics(),
                Health(time.time),
                Path(state_dir),
            )
            ready.set()
            go.wait()
            started, cpu = time.perf_counter(), time.process_time()
            asyncio.run(collect_all(collector))
            elapsed = time.perf_counter() - started
            results.put(
                {
                    "ok": True,
                    "seconds": elapsed,
                    "cpu_s": time.process_time() - cpu,
                    "txs": sum(b.tx_count for b in history),
                    "bytes": sum(len(encode(b)) for b in history[:200]) / min(len(history), 200),
                    "peak_rss_mb": peak_rss_mb(),
                }
            )
            bus.close()
    except BaseException as exc:
        ready.set()
        results.put({"ok": False, "error": f"{type(exc).__name__}: {exc}"})
        raise


def wait_for_assignment(consumer: Consumer, timeout: float = 30.0) -> None:
    """Join the group before the clock starts (polls an empty topic)."""
    inner = getattr(consumer, "_consumer", None)  # kafka-python's KafkaConsumer
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if consumer.poll(0.5, 1):
            raise RuntimeError("the benchmark topic was not empty")
        if inner is None or inner.assignment():
            return
    raise TimeoutError("detector consumer got no partitions")


def proc_cpu_seconds(pid: int) -> float:
    """utime + stime of a process (and its reaped children) from /proc, in seconds."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return 0.0
    ticks = sum(int(f) for f in fields[11:15])  # utime, stime, cutime, cstime
    return ticks / os.sysconf("SC_CLK_TCK")


def kafka_crc32c() -> str:
    """Which CRC-32C kafka-python uses: the `crc32c` C extension if importable, else Python."""
    from kafka.record import util

    return "C extension (crc32c package)" if util.crc32c_c is not None else "pure Python"


def bench_kafka(n: int, txs: float, seed: int) -> Result:
    from chainwatch.bus.kafka import KafkaBus, KafkaConfig
    from chainwatch.local.kafka import KafkaBroker

    broker = KafkaBroker()
    ctx = multiprocessing.get_context("spawn")
    child: multiprocessing.process.BaseProcess | None = None
    bus: KafkaBus | None = None
    try:
        log("kafka: starting a local broker")
        broker.start()
        prefix = f"bench-{uuid.uuid4().hex[:12]}"
        topics = Topics(prefix)
        bus = KafkaBus(KafkaConfig(bootstrap_servers=broker.bootstrap, client_id="bench-detector"))
        bus.ensure_topics(topics.all())

        ready, go = ctx.Event(), ctx.Event()
        results: MpQueue[Result] = ctx.Queue()
        child = ctx.Process(
            target=kafka_collector_process,
            args=(broker.bootstrap, prefix, n, txs, seed, ready, go, results),
            name="bench-collector",
        )
        child.start()

        metrics, health = Metrics(), Health(time.time)
        detector = CountingDetector(metrics, n, 1, "bench")
        service = TimedDetectorService(
            bus, topics, detector, health, group=f"bench-{uuid.uuid4().hex[:12]}"
        )
        consumer = service.subscribe()
        wait_for_assignment(consumer)
        log(f"kafka: collector process generating {n} blocks")
        while not ready.wait(1.0):
            if not child.is_alive():
                raise RuntimeError("collector process died during generation")
        stop = threading.Event()
        detector_thread = threading.Thread(target=service.run, args=(stop,), name="detector")
        detector_thread.start()
        log("kafka: go")
        broker_cpu = proc_cpu_seconds(broker.pid)
        own_cpu = time.process_time()
        started = time.perf_counter()
        go.set()
        producer: Result = {}

        def child_error() -> BaseException | None:
            if not producer and not results.empty():
                producer.update(results.get())
            if producer and not producer.get("ok"):
                return RuntimeError(producer.get("error"))
            if not producer and child is not None and not child.is_alive():
                return RuntimeError(f"collector process exited with {child.exitcode}")
            return None

        try:
            wait_for_detector(detector, started, what="kafka", timeout=3600, alive=child_error)
            elapsed = time.perf_counter() - started
            own_cpu = time.process_time() - own_cpu
            broker_cpu = proc_cpu_seconds(broker.pid) - broker_cpu
        finally:
            stop.set()
            detector_thread.join(timeout=60)
        if not producer:
            producer.update(results.get(timeout=120))
        child.join(timeout=60)
        if not producer.get("ok"):
            raise RuntimeError(f"collector process failed: {producer.get('error')}")
        return {
            "mode": "kafka",
            "blocks": n,
            "txs": producer["txs"],
            "message_bytes": producer["bytes"],
            "seconds": elapsed,
            "blocks_per_s": n / elapsed,
            "txs_per_s": producer["txs"] / elapsed,
            "producer_seconds": producer["seconds"],
            "producer_blocks_per_s": n / producer["seconds"],
            "producer_mb_per_s": n * producer["bytes"] / producer["seconds"] / 1e6,
            "producer_cpu_s": producer["cpu_s"],
            "detector_decode_cpu_s": service.handle_cpu - detector.process_cpu,
            "detector_process_cpu_s": detector.process_cpu,
            "detector_batches": detector.batches,
            "detector_cpu_s": own_cpu,
            "broker_cpu_s": broker_cpu,
            "partitions": 6,
            "crc32c": kafka_crc32c(),
            "detector_peak_rss_mb": peak_rss_mb(),
            "collector_peak_rss_mb": producer["peak_rss_mb"],
        }
    finally:
        if bus is not None:
            with contextlib.suppress(Exception):
                bus.close()
        if child is not None and child.is_alive():
            child.terminate()
            child.join(timeout=10)
        broker.close()  # stops the broker by PID and removes its data dir


def report_kafka(r: Result) -> None:
    n = r["blocks"]
    print_table(
        f"kafka: collector process -> Kafka broker -> detector ({n} blocks, {r['txs']} txs)",
        [
            (
                "end to end",
                f"{r['blocks_per_s']:,.0f} blocks/s   {r['txs_per_s']:,.0f} txs/s"
                f"   ({r['seconds']:.1f} s, generation excluded)",
            ),
            (
                "producer only",
                f"{r['producer_blocks_per_s']:,.0f} blocks/s   "
                f"{r['producer_mb_per_s']:.1f} MB/s acknowledged "
                f"({r['producer_seconds']:.1f} s; publish + flush per "
                f"{BATCH_SIZE} blocks, acks=all)",
            ),
            ("producer CPU", f"{r['producer_cpu_s'] / n * 1000:.3f} ms/block (whole process)"),
            ("message size", f"{r['message_bytes'] / 1024:.1f} KiB per block record"),
            ("kafka-python CRC", r["crc32c"]),
            ("detector decode", f"{r['detector_decode_cpu_s'] / n * 1000:.3f} ms CPU/block"),
            (
                "detector process",
                f"{r['detector_process_cpu_s'] / n * 1000:.3f} ms CPU/block "
                f"({r['detector_batches']} batches)",
            ),
            (
                "detector CPU",
                f"{r['detector_cpu_s'] / n * 1000:.3f} ms/block (whole process: "
                "poll/fetch + decode + process)",
            ),
            ("broker CPU", f"{r['broker_cpu_s'] / n * 1000:.3f} ms/block (java, same machine)"),
            (
                "peak RSS",
                f"collector {r['collector_peak_rss_mb']:,.0f} MB (incl. its history), "
                f"detector {r['detector_peak_rss_mb']:,.0f} MB (process high-water marks)",
            ),
        ],
    )


# -- latency ---------------------------------------------------------------------------


def gauge_value(gauge: Any, labels: dict[str, str]) -> float | None:
    """One labelled sample of a prometheus_client metric (cheaper than the whole registry)."""
    for family in gauge.collect():
        for sample in family.samples:
            if sample.labels == labels:
                return float(sample.value)
    return None


@dataclass
class LatencySample:
    total: float  # evm_mine sent -> chainwatch_head_block_number updated
    mine: float  # evm_mine round trip
    delivered: float  # evm_mine sent -> collector checkpoint (bus acknowledged)


def bench_latency(
    samples: int, *, websocket: bool, warm_blocks: int, seed: int, gap: float = 0.25
) -> Result:
    from chainwatch.bootstrap import Runtime, run_all
    from chainwatch.local.anvil import Anvil
    from chainwatch.local.procs import free_port
    from chainwatch.settings import load_settings

    poll_interval = 2.0
    rng = random.Random(seed)
    anvil = Anvil()
    measured: list[LatencySample] = []
    failure: list[BaseException] = []
    mode = "websocket newHeads" if websocket else f"HTTP polling every {poll_interval:g} s"
    try:
        anvil.start(no_mining=True)
        if warm_blocks:
            anvil.rpc("anvil_mine", [hex(warm_blocks)])  # lets the detector fit its model
        with tempfile.TemporaryDirectory(prefix="chainwatch-bench-") as state_dir:
            settings = load_settings(
                rpc=anvil.http_url,
                ws=anvil.ws_url if websocket else None,
                node="anvil",
                metrics_host="127.0.0.1",
                metrics_port=free_port(),
                state_dir=state_dir,
                poll_interval=poll_interval,
                start_block=0,
            )
            labels = {"chain_id": str(int(anvil.rpc("eth_chainId"), 16)), "node": "anvil"}

            def measure(rt: Runtime) -> None:
                try:
                    head, checkpoint = rt.metrics.head_block_number, rt.metrics.collector_checkpoint
                    deadline = time.monotonic() + 120
                    while gauge_value(head, labels) != warm_blocks:
                        if time.monotonic() > deadline:
                            raise TimeoutError("chainwatch did not reach the warm-up head")
                        time.sleep(0.05)
                    height = warm_blocks
                    for i in range(samples):
                        # websocket: heads arrive while chainwatch is idle, as on a 12 s chain;
                        # polling: a random phase against the poll timer
                        time.sleep(
                            rng.uniform(gap / 5, gap)
                            if websocket
                            else rng.uniform(0, poll_interval)
                        )
                        height += 1
                        t0 = time.perf_counter()
                        anvil.rpc("evm_mine")
                        t_mined = time.perf_counter()
                        t_delivered = 0.0
                        limit = t0 + 30
                        while True:
                            now = time.perf_counter()
                            if not t_delivered and gauge_value(checkpoint, labels) == height:
                                t_delivered = now
                            if gauge_value(head, labels) == height:
                                break
                            if now > limit:
                                raise TimeoutError(f"head {height} not seen within 30 s")
                            time.sleep(0.0005)
                        measured.append(
                            LatencySample(now - t0, t_mined - t0, (t_delivered or now) - t0)
                        )
                        if (i + 1) % 50 == 0:
                            log(f"  latency ({mode}): {i + 1}/{samples} samples")
                except BaseException as exc:
                    failure.append(exc)
                finally:
                    os.kill(os.getpid(), signal.SIGTERM)  # run_all's own clean stop

            def ready(rt: Runtime) -> None:
                threading.Thread(target=measure, args=(rt,), name="measure", daemon=True).start()

            budget = 180 + samples * (poll_interval + 3)
            log(f"latency: anvil + `chainwatch run` ({mode}), {samples} samples")
            run_all(settings, sinks=[], duration=budget, on_ready=ready)
    finally:
        anvil.stop()
    if failure:
        raise RuntimeError(f"latency ({mode}) failed: {failure[0]!r}") from failure[0]
    total = [s.total * 1000 for s in measured]
    delivered = [s.delivered * 1000 for s in measured]
    mine = [s.mine * 1000 for s in measured]

    def stats(values: list[float]) -> dict[str, float]:
        return {
            "p50": percentile(values, 50),
            "p90": percentile(values, 90),
            "p99": percentile(values, 99),
            "max": max(values),
            "mean": sum(values) / len(values),
        }

    return {
        "mode": "latency",
        "transport": "websocket" if websocket else "poll",
        "poll_interval_s": poll_interval,
        "samples": len(measured),
        "warm_blocks": warm_blocks,
        "gap_s": gap if websocket else poll_interval,
        "total_ms": stats(total),
        "delivered_ms": stats(delivered),
        "evm_mine_ms": stats(mine),
        "over_1s": sum(v > 1000 for v in total),
    }


def report_latency(r: Result) -> None:
    def row(s: dict[str, float]) -> str:
        return (
            f"p50 {s['p50']:8.1f}   p90 {s['p90']:8.1f}   p99 {s['p99']:8.1f}   "
            f"max {s['max']:8.1f}   mean {s['mean']:8.1f}"
        )

    how = (
        f"newHeads over WebSocket, {r['gap_s']:g} s max idle gap"
        if r["transport"] == "websocket"
        else f"HTTP polling every {r['poll_interval_s']:g} s (no WebSocket)"
    )
    print_table(
        f"latency: new head at anvil -> chainwatch_head_block_number ({how}, "
        f"{r['samples']} samples, ms)",
        [
            ("head metric", row(r["total_ms"])),
            (
                "collector done",
                row(r["delivered_ms"]) + "   (checkpoint gauge: bus acked, checkpoint written)",
            ),
            ("evm_mine rtt", row(r["evm_mine_ms"]) + "   (included above)"),
            ("samples > 1 s", str(r["over_1s"])),
        ],
    )


# -- cli -------------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.pipeline",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("mode", choices=("embedded", "kafka", "latency", "all"))
    parser.add_argument("--blocks", type=int, default=10_000, help="history length")
    parser.add_argument("--txs", type=float, default=150, help="mean transactions per block")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--samples", type=int, default=200, help="latency samples (WebSocket)")
    parser.add_argument(
        "--poll-samples", type=int, default=40, help="latency samples without WebSocket (0 to skip)"
    )
    parser.add_argument(
        "--warm-blocks",
        type=int,
        default=300,
        help="blocks anvil mines before latency sampling (model warm-up)",
    )
    parser.add_argument(
        "--gap",
        type=float,
        default=0.25,
        help="latency (WebSocket): idle time before each new block is "
        "uniform in [gap/5, gap] seconds; 0 = back to back",
    )
    parser.add_argument(
        "--profile",
        action="store_true",
        help="embedded: also print a cProfile of the one-thread path",
    )
    parser.add_argument("--json", action="store_true", help="also print one JSON line per mode")
    args = parser.parse_args(argv)
    if args.blocks < 2:
        parser.error("--blocks must be at least 2")

    logging_quiet()
    info = machine_info()
    print_machine(info)
    results: list[Result] = []

    def emit(result: Result, report: Callable[[Result], None]) -> None:
        report(result)
        results.append(result)
        if args.json:
            print(json.dumps({"machine": info, **result}, default=str), flush=True)

    if args.mode in ("embedded", "all"):
        log(f"generating {args.blocks} blocks x ~{args.txs:g} txs (seed {args.seed})")
        started = time.perf_counter()
        history = generate(args.blocks, args.txs, args.seed, progress=True)
        # The pre-generated history (millions of objects a real node would hold, not
        # chainwatch) would otherwise be walked by every full garbage collection.
        gc.freeze()
        log(f"generated in {time.perf_counter() - started:.1f} s")
        emit(bench_embedded(history, profile=args.profile), report_embedded)
        del history
    if args.mode in ("kafka", "all"):
        emit(bench_kafka(args.blocks, args.txs, args.seed), report_kafka)
    if args.mode in ("latency", "all"):
        emit(
            bench_latency(
                args.samples,
                websocket=True,
                warm_blocks=args.warm_blocks,
                seed=args.seed,
                gap=args.gap,
            ),
            report_latency,
        )
        if args.poll_samples:
            emit(
                bench_latency(
                    args.poll_samples, websocket=False, warm_blocks=args.warm_blocks, seed=args.seed
                ),
                report_latency,
            )
    return 0


def logging_quiet() -> None:
    """Only errors from chainwatch's loggers: the figures are the output."""
    import logging

    logging.basicConfig(level=logging.ERROR, format="%(levelname)s %(name)s: %(message)s")


if __name__ == "__main__":
    sys.exit(main())
