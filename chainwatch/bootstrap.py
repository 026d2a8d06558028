"""The one place where adapters are wired: bus, node RPC, metrics server, loops.

`collect`, `detect` and `run` are the same pieces in different arrangements:
- run (embedded): collector + detector in one process on the in-process bus;
- collect / detect: the two halves as separate services joined by Kafka.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from chainwatch.alertmanager import AlertmanagerSink
from chainwatch.bus import Bus, EmbeddedBus, Topics
from chainwatch.exceptions import ConfigError, InvalidRecord
from chainwatch.httpserver import Health, serve
from chainwatch.logs import redact_url
from chainwatch.metrics import Metrics
from chainwatch.nodes import NodeConfig, load_nodes
from chainwatch.paths import output_directory, written
from chainwatch.schema import AnyRecord, Finding
from chainwatch.settings import Settings
from collector.checkpoint import FileCheckpointStore
from collector.mempool_service import MempoolCollector, MempoolConfig
from collector.peer_service import PeerCollector
from collector.rpc import NodeRpc, check_url
from collector.service import BlockCollector, CollectorConfig
from detector.engine import Detector, DetectorConfig
from detector.service import DetectorService
from detector.training import (
    History,
    gather,
    load_models,
    read_jsonl,
    train_block_model,
    train_tx_model,
)
from detector.warm_up import compile_in_background

log = logging.getLogger("chainwatch")


@dataclass
class Runtime:
    """What a running process holds; handy for the demo and for tests."""

    settings: Settings
    bus: Bus
    metrics: Metrics = field(default_factory=Metrics)
    health: Health = field(default_factory=lambda: Health(time.time))
    topics: Topics = field(default_factory=Topics)
    detector: Detector | None = None
    metrics_url: str = ""
    metrics_address: str = ""  # host:port; logged instead of the URL, which scrub() redacts


def make_bus(settings: Settings) -> Bus:
    if not settings.kafka:
        return EmbeddedBus()
    from chainwatch.bus.kafka import KafkaBus, KafkaConfig  # only Kafka mode imports kafka

    bus = KafkaBus(
        KafkaConfig(
            bootstrap_servers=settings.kafka,
            security_protocol=settings.kafka_security_protocol,
            sasl_mechanism=settings.kafka_sasl_mechanism,
            sasl_username=settings.kafka_sasl_username,
            sasl_password=settings.kafka_sasl_password,
            ssl_cafile=settings.kafka_ssl_cafile,
            partitions=settings.kafka_partitions,
            replication_factor=settings.kafka_replication_factor,
        )
    )
    bus.ensure_topics(Topics(settings.topic_prefix).all())  # fails fast if unreachable
    return bus


def make_runtime(settings: Settings, bus: Bus | None = None) -> Runtime:
    return Runtime(
        settings=settings,
        bus=bus if bus is not None else make_bus(settings),
        topics=Topics(settings.topic_prefix),
    )


def start_http(rt: Runtime, chain_view: Callable[[], object] | None = None) -> None:
    s = rt.settings
    server = serve(s.metrics_host, s.metrics_port, rt.metrics.registry, rt.health, chain_view)
    host = "127.0.0.1" if s.metrics_host in ("0.0.0.0", "") else s.metrics_host
    rt.metrics_address = f"{host}:{server.server_address[1]}"
    rt.metrics_url = f"http://{rt.metrics_address}/metrics"


def make_detector_service(rt: Runtime, sinks: list[Callable[[Finding], None]]) -> DetectorService:
    s = rt.settings
    if s.alertmanager:
        check_url(s.alertmanager, ("http", "https"), "Alertmanager URL")
        sinks = [
            *sinks,
            AlertmanagerSink(
                s.alertmanager,
                rt.metrics,
                min_severity=s.alertmanager_severity,
                ttl=s.alertmanager_ttl,
            ),
        ]
    pretrained = load_models(s.models) if s.models else None
    compile_in_background()  # meanwhile: the first batch would wait ~10 s for it otherwise
    rt.detector = Detector(DetectorConfig.from_settings(s), rt.metrics, pretrained=pretrained)
    return DetectorService(rt.bus, rt.topics, rt.detector, rt.health, group=s.group, sinks=sinks)


def node_configs(settings: Settings) -> list[NodeConfig]:
    """The nodes to follow, validated before connecting to anything."""
    if settings.nodes is not None:
        if settings.rpc is not None:
            raise ConfigError("give either --nodes FILE or --rpc URL, not both")
        nodes = load_nodes(settings.nodes)
    else:
        if settings.rpc is None:
            raise ConfigError("no node to follow: give --rpc URL or --nodes FILE")
        nodes = [
            NodeConfig(
                name=settings.node,
                rpc=settings.rpc,
                ws=settings.ws,
                expected_block_time=settings.expected_block_time,
            )
        ]
    for node in nodes:
        what = f"node {node.name!r}"
        check_url(node.rpc.get_secret_value(), ("http", "https"), f"RPC URL of {what}")
        if node.ws is not None:
            check_url(node.ws.get_secret_value(), ("ws", "wss"), f"WebSocket URL of {what}")
    return nodes


@dataclass
class NodeAgents:
    """Everything that follows one node; they share its RPC connection."""

    blocks: BlockCollector
    others: list[MempoolCollector | PeerCollector]

    @property
    def rpc(self) -> NodeRpc:
        return self.blocks.rpc

    async def run(self, stop: asyncio.Event) -> None:
        await asyncio.gather(self.blocks.run(stop), *(o.run(stop) for o in self.others))


def make_agents(rt: Runtime, node: NodeConfig) -> NodeAgents:
    s = rt.settings
    blocks = make_collector(rt, node)
    others: list[MempoolCollector | PeerCollector] = []
    ws_url = node.ws.get_secret_value() if node.ws else None
    if node.mempool and s.mempool:
        mempool = MempoolCollector(
            blocks.rpc,
            rt.bus,
            rt.topics,
            rt.metrics,
            MempoolConfig(
                poll_interval=s.mempool_poll_interval,
                snapshot_interval=s.mempool_snapshot_interval,
                reconcile_interval=s.mempool_reconcile_interval,
                drop_grace=s.mempool_drop_grace,
                max_outbox=s.mempool_max_outbox,
                save_interval=s.mempool_save_interval,
            ),
            ws_url=ws_url,
            state=FileCheckpointStore(s.state_dir, prefix="mempool"),
        )
        mempool.outbox.on_drop = _count_drop(rt.metrics)
        blocks.listeners.append(mempool.on_chain)
        others.append(mempool)
    if node.peers and s.peers:
        peers = PeerCollector(blocks.rpc, rt.bus, rt.topics, rt.metrics, interval=s.peer_interval)
        peers.outbox.on_drop = _count_drop(rt.metrics)
        others.append(peers)
    return NodeAgents(blocks, others)


def _count_drop(metrics: Metrics) -> Callable[[AnyRecord, str], None]:
    """An outbox's drop hook: chainwatch_collector_records_dropped_total, by type and reason."""
    dropped = metrics.collector_dropped

    def count(record: AnyRecord, reason: str) -> None:
        dropped.labels(str(record.chain_id), record.node, record.type, reason).inc()

    return count


def make_collector(rt: Runtime, node: NodeConfig) -> BlockCollector:
    s = rt.settings
    rpc_errors = rt.metrics.rpc_errors
    rpc = NodeRpc(
        node.rpc.get_secret_value(),
        node=node.name,
        timeout=s.rpc_timeout,
        on_error=lambda reason: rpc_errors.labels(node.name, reason).inc(),
    )
    return BlockCollector(
        rpc,
        rt.bus,
        rt.topics,
        FileCheckpointStore(s.state_dir),
        rt.metrics,
        rt.health,
        CollectorConfig(
            poll_interval=s.poll_interval,
            window=s.window,
            max_reorg_depth=s.max_reorg_depth,
            start_block=s.start_block,
            expected_block_time=node.expected_block_time,
            status_interval=s.status_interval,
        ),
        ws_url=node.ws.get_secret_value() if node.ws else None,
    )


def _install_signal_handlers(loop: asyncio.AbstractEventLoop, stop: asyncio.Event) -> None:
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError, RuntimeError):  # not the main thread
            loop.add_signal_handler(sig, stop.set)


async def _collect_until(
    agents: list[NodeAgents], *, fail_fast: bool, duration: float | None
) -> None:
    """Run every collector until SIGTERM/SIGINT or `duration`.

    fail_fast (one node from flags): an unreachable node is a one-line error at start.
    With a nodes file, a node that is down at start is retried like any later failure.
    """
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    _install_signal_handlers(loop, stop)
    try:
        if fail_fast:
            for agent in agents:
                await agent.blocks.start()
        if duration is not None:
            loop.call_later(duration, stop.set)
        await asyncio.gather(*(agent.run(stop) for agent in agents))
    finally:
        for agent in agents:
            await agent.rpc.close()


def _collect_blocking(rt: Runtime, agents: list[NodeAgents], duration: float | None) -> None:
    asyncio.run(_collect_until(agents, fail_fast=rt.settings.nodes is None, duration=duration))


def _describe(rt: Runtime, agents: list[NodeAgents]) -> dict[str, object]:
    return {
        "nodes": [a.blocks.node for a in agents],
        "rpc": [redact_url(a.rpc.url) for a in agents],
        "bus": rt.bus.name,
        "metrics": rt.metrics_address,
    }


def run_collect(settings: Settings, duration: float | None = None) -> None:
    nodes = node_configs(settings)
    rt = make_runtime(settings)
    agents = [make_agents(rt, node) for node in nodes]
    start_http(rt)
    log.info("collect", extra=_describe(rt, agents))
    try:
        _collect_blocking(rt, agents, duration)
    finally:
        rt.bus.close()


def run_detect(settings: Settings, duration: float | None = None) -> None:
    rt = make_runtime(settings)
    service = make_detector_service(rt, sinks=[_log_finding])
    service.subscribe()
    start_http(rt, chain_view=lambda: rt.detector.state.describe() if rt.detector else [])
    log.info(
        "detect", extra={"bus": rt.bus.name, "group": settings.group, "metrics": rt.metrics_address}
    )
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    if duration is not None:
        threading.Timer(duration, stop.set).start()
    try:
        service.run(stop)
    finally:
        rt.bus.close()


def run_all(
    settings: Settings,
    *,
    sinks: list[Callable[[Finding], None]] | None = None,
    duration: float | None = None,
    on_ready: Callable[[Runtime], None] | None = None,
) -> Runtime:
    """Collector and detector in one process (embedded bus unless --kafka is set)."""
    nodes = node_configs(settings)
    rt = make_runtime(settings)
    agents = [make_agents(rt, node) for node in nodes]
    service = make_detector_service(rt, sinks=sinks if sinks is not None else [_log_finding])
    service.subscribe()  # before the collector publishes anything
    start_http(rt, chain_view=lambda: rt.detector.state.describe() if rt.detector else [])
    log.info("run", extra=_describe(rt, agents))
    detector_stop = threading.Event()
    thread = threading.Thread(target=service.run, args=(detector_stop,), name="detector")
    thread.start()
    if on_ready is not None:
        on_ready(rt)
    try:
        _collect_blocking(rt, agents, duration)
        # let the detector drain what the collector delivered before it stopped
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and (service.consumer and service.consumer.lag()):
            time.sleep(0.05)
    finally:
        detector_stop.set()
        thread.join(timeout=10)
        rt.bus.close()
    return rt


def _log_finding(finding: Finding) -> None:
    log.warning(
        "finding",
        extra={
            "chain_id": finding.chain_id,
            "node": finding.node,
            "detector": finding.detector,
            "severity": finding.severity,
            "score": round(finding.score, 3),
            "block": finding.block_number,
            "summary": finding.summary,
        },
    )


def run_train(settings: Settings, inputs: list[Path], out: Path, timeout: float = 60.0) -> str:
    """Fit the models from recorded history or the Kafka topics; save them under `out`.

    An input is anything `chainwatch replay` reads: a JSONL file of records, a
    `chainwatch archive` directory, ethereum-etl tables (blocks.csv + transactions.csv).
    """
    output_directory(out)
    history = History()
    if inputs:
        gather(_history_records(settings, inputs, history), history)
    elif settings.kafka:
        gather(_read_topic_to_end(settings, timeout), history)
    else:
        raise ConfigError("give --input SOURCE (JSONL records, an archive or table directory, "
                          "blocks.csv) or --kafka HOST:PORT")
    model = train_block_model(
        history, kind=settings.model_kind, contamination=settings.contamination, seed=42
    )
    tx_model = train_tx_model(
        history, kind=settings.model_kind, contamination=settings.contamination, seed=42
    )
    try:
        model.save(out / "block.joblib")
        if tx_model is not None:
            tx_model.save(out / "tx.joblib")
    except OSError as exc:
        raise written(out, exc) from None
    if tx_model is not None:
        tx_note = f"; {tx_model.version} on {tx_model.trained_rows} transactions"
    else:
        tx_note = "; too few transactions for a tx model (it will warm up live)"
    for line in history.invalid[:20]:
        log.warning("skipped invalid record", extra={"where": line})
    return (
        f"trained {model.version} on {model.trained_rows} blocks{tx_note} "
        f"({history.first_block}..{history.last_block}; {history.records} records read, "
        f"{history.duplicates} duplicates, {history.invalid_count} invalid skipped) -> {out}"
    )


def _history_records(
    settings: Settings, inputs: list[Path], history: History
) -> Iterator[AnyRecord]:
    """The records of each input, read by replay's sources; skipped rows into history."""
    from replay.app import ReplayOptions, open_source
    from replay.rows import InvalidRows

    for path in inputs:
        if path.is_file() and path.suffix in (".jsonl", ".json", ".ndjson"):
            yield from read_jsonl(path, history)  # line numbers as `file:line`
            continue
        invalid = InvalidRows()
        with open_source(str(path), settings, invalid, ReplayOptions(progress=False)) as source:
            yield from source.records()
        history.invalid.extend(f"{where}: {reason}" for where, reason in invalid.samples)
        history.invalid_unlisted += invalid.entries - len(invalid.samples)


def _read_topic_to_end(settings: Settings, timeout: float) -> Iterator[AnyRecord]:
    """Every record on the blocks topic, from the beginning to the current end."""
    from chainwatch.schema import decode

    bus = make_bus(settings)
    topics = Topics(settings.topic_prefix)
    consumer = bus.consumer([topics.blocks], f"chainwatch-train-{time.time_ns()}")
    deadline = time.monotonic() + timeout
    idle = 0
    try:
        while time.monotonic() < deadline:
            batch = consumer.poll(1.0, 5000)
            for message in batch:
                try:
                    yield decode(message.value)
                except InvalidRecord:
                    continue
            idle = 0 if batch else idle + 1
            if not batch and consumer.lag() == 0 and idle >= 2:
                return
    finally:
        consumer.close()
        bus.close()
