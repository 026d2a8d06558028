"""Wiring for `chainwatch replay` and `chainwatch archive`: sources, detector, sinks, report.

The detector is built from the same settings as `chainwatch detect` (models, warm-up,
thresholds), with a fresh Metrics registry and the replayed clock.
"""

from __future__ import annotations

import contextlib
import json
import logging
import signal
import tempfile
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from chainwatch.bus import Topics
from chainwatch.exceptions import ConfigError
from chainwatch.labels import Label, read_labels
from chainwatch.metrics import Metrics
from chainwatch.paths import output_directory, written
from chainwatch.schema import Finding, encode
from chainwatch.settings import Settings
from chainwatch.stopping import raise_if_stopped
from detector.engine import Detector, DetectorConfig
from detector.evaluation import Evaluation, RunRecorder, evaluate
from detector.fit_ahead import load_model_libraries, start_worker
from detector.models import usable_cpus
from detector.training import load_models
from detector.warm_up import compile_kernels, load_kernels
from replay.archive import (
    ArchiveConfig,
    ArchiveSource,
    ArchiveWriter,
    archive_topics,
    is_archive,
)
from replay.driver import POLL_SECONDS, ReplayClock, ReplayConfig, Replayer, ReplayStats
from replay.exceptions import ReplayError
from replay.positions import Position, check_range
from replay.progress import Progress
from replay.report_data import ReportData
from replay.rows import Defaults, InvalidRows
from replay.sources import JsonlSource, Source, TableSource, find_tables

log = logging.getLogger("chainwatch.replay")

# blocks scored in one call by the block model and the tx family when nothing watches when
# findings come out (`Detector.run_blocks`); below the tx family's memory of blocks seen
# (10,000)
RUN_BLOCKS = 8_192


def make_detector(settings: Settings, clock: ReplayClock) -> Detector:
    """The live detector, configured as `chainwatch detect` would be, on the replayed clock.
    With two CPUs or more, live models refit in a worker process while the replay goes
    on (the same findings); on one, the worker would only take turns with the replay.
    Trained models (--models) never refit: no worker then."""
    fit_ahead = usable_cpus() >= 2 and not settings.models
    if fit_ahead:
        load_model_libraries()  # what the first (inline) fit would import, ~1 s
        start_worker()  # boots while the replay opens its source and warms up
    pretrained = load_models(settings.models) if settings.models else None
    # the kernels loaded (numba's start-up too): counted in the start-up, not spread over
    # the replay's first batches; live models fit forests anyway (scikit-learn)
    if pretrained:
        load_kernels(pretrained.values())
    else:
        compile_kernels()
    return Detector(
        replace(DetectorConfig.from_settings(settings), fit_ahead=fit_ahead),
        Metrics(),
        clock=clock,
        pretrained=pretrained,
        clock_follows_records=True,
    )


def kafka_config(settings: Settings, bootstrap: str) -> Any:
    from chainwatch.bus.kafka import KafkaConfig

    return KafkaConfig(
        bootstrap_servers=bootstrap,
        security_protocol=settings.kafka_security_protocol,
        sasl_mechanism=settings.kafka_sasl_mechanism,
        sasl_username=settings.kafka_sasl_username,
        sasl_password=settings.kafka_sasl_password,
        ssl_cafile=settings.kafka_ssl_cafile,
        client_id="chainwatch-archive",
    )


def archive_consumer(settings: Settings, bootstrap: str) -> Any:
    """A group-less KafkaConsumer: the archive positions it from its own checkpoint."""
    from kafka import KafkaConsumer
    from kafka.errors import KafkaError, KafkaTimeoutError

    try:
        return KafkaConsumer(
            **kafka_config(settings, bootstrap).common(),
            group_id=None,
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            fetch_max_bytes=32 * 1024 * 1024,
            max_partition_fetch_bytes=8 * 1024 * 1024,
        )
    except KafkaTimeoutError:
        raise ReplayError(f"cannot reach Kafka at {bootstrap}") from None
    except KafkaError as exc:
        raise ReplayError(f"Kafka consumer failed to start: {type(exc).__name__}") from None


def run_archive(
    settings: Settings,
    bootstrap: str,
    out: Path,
    *,
    until_end: bool = False,
    duration: float | None = None,
    config: ArchiveConfig | None = None,
    echo: Callable[[str], None] = print,
) -> int:
    """Archive the chainwatch topics into `out` until stopped (SIGINT/SIGTERM) or the end."""
    topics = Topics(settings.topic_prefix)
    names = [topics.blocks, topics.mempool, topics.peers, topics.findings]
    writer = ArchiveWriter(output_directory(out))
    consumer = archive_consumer(settings, bootstrap)
    stop = threading.Event()
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda *_: stop.set())
    timer = threading.Timer(duration, stop.set) if duration is not None else None
    if timer is not None:
        timer.daemon = True
        timer.start()
    cfg = config or ArchiveConfig(until_end=until_end)
    log.info("archive", extra={"kafka": bootstrap, "out": str(out), "topics": names})
    try:
        total = archive_topics(
            consumer, names, writer, cfg, stop,
            on_flush=lambda n, total: log.info("archived", extra={"records": n, "total": total}),
        )
    finally:
        consumer.close()
        if timer is not None:
            timer.cancel()
    echo(f"archived {total} records into {out}")
    return total


@dataclass(frozen=True)
class ReplayOptions:
    out: Path | None = None
    start: Position | None = None  # --from: a block number, a time or a Kafka offset
    stop: Position | None = None  # --to (inclusive)
    speed: float | None = None
    labels: Path | None = None
    chain_id: int = 1
    node: str = "replay"
    emit: str | None = None  # Kafka bootstrap servers to re-publish findings to
    metrics_port: int | None = None
    progress: bool = True
    top_n: int = 20
    batch_records: int = 500
    per_block: bool = False  # one batch per block, as `chainwatch evaluate` replays

    def watched(self) -> bool:
        """Whether something follows when findings come out, not only what they say:
        pacing, re-publishing, a metrics port, or detection latency against labels."""
        return (self.speed is not None or self.emit is not None
                or self.metrics_port is not None or self.labels is not None or self.per_block)

    def blocks(self) -> tuple[int | None, int | None]:
        """(--from, --to) as block numbers, None where absent or of another kind."""
        first, last = (p.number if p is not None and p.kind == "block" else None
                       for p in (self.start, self.stop))
        return first, last

    def times(self) -> tuple[float | None, float | None]:
        """(--from, --to) as unix seconds, None where absent or of another kind."""
        first, last = (p.value if p is not None and p.kind == "time" else None
                       for p in (self.start, self.stop))
        return first, last


@contextlib.contextmanager
def open_source(
    spec: str, settings: Settings, invalid: InvalidRows, options: ReplayOptions
) -> Iterator[Source]:
    """SOURCE as given on the command line: kafka://, an archive, tables, or JSONL."""
    defaults = Defaults(chain_id=options.chain_id, node=options.node)
    if spec.startswith("kafka://"):
        bootstrap = spec.removeprefix("kafka://").strip("/")
        if not bootstrap:
            raise ConfigError("kafka:// source needs HOST:PORT, e.g. kafka://127.0.0.1:9092")
        config = ArchiveConfig(until_end=True, start=options.start, stop=options.stop)
        with tempfile.TemporaryDirectory(prefix="chainwatch-replay-") as tmp:
            if not run_archive(settings, bootstrap, Path(tmp), config=config, echo=log.info):
                bounded = options.start is not None or options.stop is not None
                raise ReplayError("nothing to replay: the topics hold no message"
                                  + (" between --from and --to" if bounded else ""))
            yield ArchiveSource(Path(tmp), invalid)
        return
    for position in (options.start, options.stop):
        if position is not None and position.kind == "offset":
            raise ConfigError(f"{position.text}: Kafka offsets apply to kafka:// sources only")
    path = Path(spec)
    if not path.exists():
        raise ReplayError(f"replay source not found: {spec}")
    if is_archive(path):
        yield ArchiveSource(path, invalid)
    elif path.is_dir() or path.name.startswith("blocks."):
        tables = find_tables(path)
        yield TableSource(tables, invalid, defaults, to_block=options.blocks()[1],
                          to_time=options.times()[1])
    elif path.suffix in (".jsonl", ".json", ".ndjson"):
        yield JsonlSource(path, invalid)
    else:
        raise ReplayError(
            f"unknown replay source {spec}: give a JSONL file, an archive or table directory, "
            "a blocks.csv/blocks.parquet, or kafka://HOST:PORT"
        )


class _Emitter:
    """--emit: findings to the findings topic (acknowledged per batch)."""

    def __init__(self, settings: Settings, bootstrap: str) -> None:
        from chainwatch.bus.kafka import KafkaBus

        self.bus = KafkaBus(kafka_config(settings, bootstrap))
        self.topic = Topics(settings.topic_prefix).findings
        self.bus.ensure_topics([self.topic])

    def __call__(self, findings: list[Finding]) -> None:
        for f in findings:
            self.bus.publish(self.topic, f.stream_key(), encode(f))
        self.bus.flush()

    def close(self) -> None:
        self.bus.close()


FIT_WARN_FACTOR = 5  # a trained model flagging this many times its fitted share is warned of
FIT_WARN_MIN_FLAGGED = 10  # ... once it flagged at least this many rows (not chance)
_ROWS = {"block": "blocks", "tx": "transactions"}


def model_fit(detector: Detector) -> tuple[dict[str, Any], list[str]]:
    """summary.json's `models`: per family, the rows its model scored and flagged against
    the share it was fitted to flag (its contamination); and a warning for each trained
    model (`--models`) that flags far more than that, as one fitted to another chain or
    another market does (its findings then say more about the model than the history)."""
    fitted_share = {"block": detector.config.contamination,
                    "tx": detector.config.families.tx_contamination}
    out: dict[str, Any] = {}
    warnings: list[str] = []
    for family in sorted(detector.scored_rows):
        scored, flagged = detector.scored_rows[family], detector.flagged_rows[family]
        trained = detector.pretrained.get(family)
        expected = trained.contamination if trained is not None else fitted_share.get(family)
        share = flagged / scored if scored else 0.0
        out[family] = {"scored": scored, "flagged": flagged, "flagged_share": round(share, 6),
                       "fitted_share": expected, "trained": trained is not None,
                       "version": trained.version if trained is not None else None}
        if (trained is not None and expected and flagged >= FIT_WARN_MIN_FLAGGED
                and share > FIT_WARN_FACTOR * expected):
            warnings.append(
                f"the trained {family} model ({trained.version}) flagged {share:.2%} of the "
                f"{scored:,} {_ROWS.get(family, 'rows')} it scored, {share / expected:.0f}x "
                f"the {expected:.2%} it was fitted to flag: this history does not look like "
                "its training data; train on it (chainwatch train) or replay without --models")
    return out, warnings


def label_summary(ev: Evaluation, labels: list[Label]) -> dict[str, Any]:
    """summary.json's scores: per labelled family, and each label's outcome."""
    families = sorted({label.family for label in labels})
    rows = []
    for family in families:
        s = ev.family(family)
        assert s is not None
        rows.append({
            "family": family, "labels": s.labels, "detected": s.detected,
            "findings": s.findings, "true_findings": s.true_findings,
            "false_findings": s.false_findings, "excused": s.excused,
            "precision": s.precision, "recall": s.recall, "f1": s.f1,
            "latency_blocks_p50": s.latency.p50_blocks(),
            "latency_blocks_max": s.latency.max_blocks(),
            "latency_seconds_p50": s.latency.p50_seconds(),
        })
    outcomes = [
        {"id": o.label.id, "family": o.label.family, "kind": o.label.kind,
         "first_block": o.label.first_block, "detected_by": list(o.detected_by),
         "latency_blocks": o.latency_blocks, "latency_seconds": o.latency_seconds}
        for o in ev.outcomes
    ]
    return {"families": rows, "outcomes": outcomes}


def run_replay(
    settings: Settings, spec: str, options: ReplayOptions, echo: Callable[[str], None] = print
) -> ReplayStats:
    invalid = InvalidRows()
    labels = read_labels(options.labels, on_error=invalid.add) if options.labels else None
    check_range(options.start, options.stop)
    if options.speed is not None and options.speed <= 0:
        raise ConfigError("--speed must be > 0 (recorded seconds per wall second)")
    if options.batch_records < 1:
        raise ConfigError(f"--batch must be at least 1 record, not {options.batch_records}")
    if options.out is not None:
        output_directory(options.out)
    clock = ReplayClock()
    detector = make_detector(settings, clock)
    if not options.watched():  # the same findings, the transactions scored in fewer calls
        detector.run_blocks = RUN_BLOCKS
    data = ReportData()
    recorder = (
        RunRecorder(detector, watch={h for label in labels for h in label.tx_hashes})
        if labels is not None else None
    )
    findings: list[Finding] = []
    failed = 0
    emitter = _Emitter(settings, options.emit) if options.emit else None
    server = None
    if options.metrics_port is not None:
        from chainwatch.httpserver import Health, serve

        server = serve(settings.metrics_host, options.metrics_port, detector.metrics.registry,
                       Health(clock))

    def sink(batch: list[Finding]) -> None:
        findings.extend(batch)
        if recorder is not None:
            recorder.sink(batch)
        if emitter is not None:
            emitter(batch)

    first_block, last_block = options.blocks()
    first_time, last_time = (None, None) if spec.startswith("kafka://") else options.times()
    config = ReplayConfig(batch_records=options.batch_records, per_block=options.per_block,
                          max_batch_seconds=POLL_SECONDS if options.per_block else None,
                          from_block=first_block, to_block=last_block, from_time=first_time,
                          to_time=last_time, speed=options.speed)
    try:
        with open_source(spec, settings, invalid, options) as source:
            progress = Progress(source.progress, enabled=options.progress)

            def on_batch(stats: ReplayStats, batch: list[Any]) -> None:
                nonlocal failed
                failed += len(detector.failed)  # reset by every process()
                data.observe(batch)
                progress.update(stats.records, stats.transactions)
                raise_if_stopped()  # a Ctrl-C that landed in a finalizer, dropped there

            source.columnar = True  # an archive's transactions go to the detector as frames
            replayer = Replayer(
                detector, clock, config, sink, on_batch=on_batch,
                before_batch=recorder.before_batch if recorder is not None else None,
                columns=source,
            )
            if any(v is not None for v in (first_block, last_block, first_time, last_time)):
                source.screen = replayer.screen  # an archive skips decoding what is outside
                source.block_window = replayer.range.block_window()  # ... and reading it
            stats = replayer.run(source.records())
            progress.close(stats.records, stats.transactions)
            description = source.description
    finally:
        if emitter is not None:
            emitter.close()
        if server is not None:
            server.shutdown()
    data.add_findings(findings)
    models, warnings = model_fit(detector)
    summary: dict[str, Any] = {
        **stats.as_dict(),
        "invalid_rows": invalid.count,
        "unreadable_files": invalid.files,
        "invalid_by_reason": dict(sorted(invalid.reasons.items())),
        "failed_in_detector": failed,
        "models": models,
        "warnings": warnings,
    }
    if recorder is not None and labels is not None:
        summary["labels"] = label_summary(evaluate(recorder.run, labels), labels)
    if options.out is not None:
        from replay.report import (  # matplotlib
            stamping_note,
            write_findings,
            write_invalid,
            write_report,
        )

        try:
            frame = write_findings(findings, options.out)
            write_invalid(invalid, options.out)
            (options.out / "summary.json").write_text(
                json.dumps(summary, indent=2, sort_keys=True))
            write_report(options.out, source=spec, summary=summary, data=data, findings=frame,
                         invalid=invalid, scores=summary.get("labels"), top_n=options.top_n,
                         batching=stamping_note(options.batch_records, options.per_block))
        except OSError as exc:
            raise written(options.out, exc) from None
    for where, reason in invalid.samples[:20]:
        echo(f"skipped {where}: {reason}")
    if invalid.entries > 20:
        echo(f"... {invalid.entries - 20} more skipped" +
             (f" (first {len(invalid.samples)} in invalid_rows.csv)" if options.out else ""))
    rate = stats.transactions / stats.wall_seconds if stats.wall_seconds > 0 else 0.0
    echo(
        f"replayed {stats.records} records ({stats.blocks} blocks, {stats.transactions} txs) "
        f"from {description} in {stats.wall_seconds:.1f}s ({rate:,.0f} tx/s): "
        f"{stats.findings} findings, {invalid.count} invalid rows skipped, "
        + (f"{invalid.files} unreadable archive files skipped (rows unknown), "
           if invalid.files else "")
        + f"{stats.filtered_out} outside --from/--to"
        + (f" -> {options.out}" if options.out else "")
    )
    for warning in warnings:
        echo(f"warning: {warning}")
    for row in summary["labels"]["families"] if "labels" in summary else []:
        p = "n/a" if row["precision"] is None else f"{row['precision']:.2f}"
        r = "n/a" if row["recall"] is None else f"{row['recall']:.2f}"
        lat = "n/a" if row["latency_blocks_p50"] is None else f"{row['latency_blocks_p50']:g}"
        echo(f"labels {row['family']}: precision {p}, recall {r} "
             f"({row['detected']}/{row['labels']} detected), latency p50 {lat} blocks")
    return stats
