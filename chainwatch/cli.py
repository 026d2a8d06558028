"""The `chainwatch` command. Every option also reads CHAINWATCH_<OPTION> from the environment.

Errors users can fix (bad flag, unreachable node or Kafka) print one line and exit
non-zero; they never show a traceback.
"""

from __future__ import annotations

import gc
import logging
import os
import sys
from pathlib import Path
from typing import Annotated

import typer

from chainwatch import __version__
from chainwatch.exceptions import ChainwatchError
from chainwatch.logs import setup_logging
from chainwatch.settings import Settings, load_settings

log = logging.getLogger(__name__)

app = typer.Typer(
    name="chainwatch",
    help="Anomaly monitoring for Ethereum/EVM nodes.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

Rpc = Annotated[str | None, typer.Option("--rpc", help="Node HTTP JSON-RPC URL [CHAINWATCH_RPC]")]
Ws = Annotated[str | None, typer.Option("--ws", help="Node WebSocket URL [CHAINWATCH_WS]")]
Nodes = Annotated[
    Path | None, typer.Option("--nodes", help="YAML file listing the nodes to follow")
]
BlockTime = Annotated[
    float | None,
    typer.Option("--expected-block-time", help="Seconds between blocks (single node)"),
]
Node = Annotated[str | None, typer.Option("--node", help="Name of the node in metrics and records")]
Kafka = Annotated[
    str | None, typer.Option("--kafka", help="Kafka bootstrap servers HOST:PORT[,HOST:PORT]")
]
MetricsPort = Annotated[
    int | None, typer.Option("--metrics-port", help="Port for /metrics, /healthz, /readyz")
]
MetricsHost = Annotated[str | None, typer.Option("--metrics-host", help="Address to bind")]
StateDir = Annotated[
    Path | None, typer.Option("--state-dir", help="Where collector checkpoints are kept")
]
TopicPrefix = Annotated[str | None, typer.Option("--topic-prefix", help="Kafka topic prefix")]
Group = Annotated[str | None, typer.Option("--group", help="Detector consumer group")]
StartBlock = Annotated[
    int | None, typer.Option("--start-block", help="First block when there is no checkpoint")
]
PollInterval = Annotated[
    float | None, typer.Option("--poll-interval", help="Seconds between head polls")
]
Warmup = Annotated[
    int | None, typer.Option("--warmup-blocks", help="Blocks seen before the model first fits")
]
Duration = Annotated[float | None, typer.Option("--duration", help="Stop after this many seconds")]
Alertmanager = Annotated[
    str | None,
    typer.Option("--alertmanager", help="Push findings to this Alertmanager (v2 API)"),
]
AlertSeverity = Annotated[
    str | None,
    typer.Option("--alertmanager-severity", help="Lowest severity pushed: info, warning, critical"),
]
LogLevel = Annotated[str | None, typer.Option("--log-level", help="DEBUG, INFO, WARNING, ERROR")]


def _settings(**flags: object) -> Settings:
    settings = load_settings(**flags)
    setup_logging(settings.log_level, settings.log_json)
    return settings


@app.command()
def collect(
    nodes: Nodes = None,
    rpc: Rpc = None,
    ws: Ws = None,
    node: Node = None,
    expected_block_time: BlockTime = None,
    kafka: Kafka = None,
    metrics_port: MetricsPort = None,
    metrics_host: MetricsHost = None,
    state_dir: StateDir = None,
    topic_prefix: TopicPrefix = None,
    start_block: StartBlock = None,
    poll_interval: PollInterval = None,
    duration: Duration = None,
    log_level: LogLevel = None,
) -> None:
    """Follow a node and publish its blocks and reorgs to Kafka."""
    from chainwatch.bootstrap import run_collect

    if metrics_port is None and "CHAINWATCH_METRICS_PORT" not in os.environ:
        metrics_port = 9109  # beside a detector on 9108 on the same host

    settings = _settings(
        nodes=nodes,
        rpc=rpc,
        ws=ws,
        node=node,
        kafka=kafka,
        metrics_port=metrics_port,
        metrics_host=metrics_host,
        state_dir=state_dir,
        topic_prefix=topic_prefix,
        start_block=start_block,
        poll_interval=poll_interval,
        log_level=log_level,
        expected_block_time=expected_block_time,
    )
    if not settings.kafka:
        raise ChainwatchError(
            "collect publishes to Kafka: give --kafka HOST:PORT "
            "(or use `chainwatch run` for the embedded mode)"
        )
    run_collect(settings, duration=duration)


@app.command()
def detect(
    kafka: Kafka = None,
    metrics_port: MetricsPort = None,
    metrics_host: MetricsHost = None,
    topic_prefix: TopicPrefix = None,
    group: Group = None,
    warmup_blocks: Warmup = None,
    alertmanager: Alertmanager = None,
    alertmanager_severity: AlertSeverity = None,
    models: Models = None,
    model: ModelKind = None,
    duration: Duration = None,
    log_level: LogLevel = None,
) -> None:
    """Consume blocks from Kafka, export metrics and publish findings."""
    from chainwatch.bootstrap import run_detect

    settings = _settings(
        kafka=kafka,
        metrics_port=metrics_port,
        metrics_host=metrics_host,
        topic_prefix=topic_prefix,
        group=group,
        warmup_blocks=warmup_blocks,
        log_level=log_level,
        alertmanager=alertmanager,
        alertmanager_severity=alertmanager_severity,
        models=models,
        model_kind=model,
    )
    if not settings.kafka:
        raise ChainwatchError("detect consumes from Kafka: give --kafka HOST:PORT")
    run_detect(settings, duration=duration)


@app.command()
def run(
    nodes: Nodes = None,
    rpc: Rpc = None,
    ws: Ws = None,
    node: Node = None,
    expected_block_time: BlockTime = None,
    kafka: Kafka = None,
    metrics_port: MetricsPort = None,
    metrics_host: MetricsHost = None,
    state_dir: StateDir = None,
    topic_prefix: TopicPrefix = None,
    start_block: StartBlock = None,
    poll_interval: PollInterval = None,
    warmup_blocks: Warmup = None,
    alertmanager: Alertmanager = None,
    alertmanager_severity: AlertSeverity = None,
    models: Models = None,
    model: ModelKind = None,
    duration: Duration = None,
    log_level: LogLevel = None,
) -> None:
    """Collector and detector in one process (embedded bus; --kafka switches to Kafka)."""
    from chainwatch.bootstrap import run_all

    settings = _settings(
        nodes=nodes,
        rpc=rpc,
        ws=ws,
        node=node,
        kafka=kafka,
        metrics_port=metrics_port,
        metrics_host=metrics_host,
        state_dir=state_dir,
        topic_prefix=topic_prefix,
        start_block=start_block,
        poll_interval=poll_interval,
        warmup_blocks=warmup_blocks,
        log_level=log_level,
        expected_block_time=expected_block_time,
        alertmanager=alertmanager,
        alertmanager_severity=alertmanager_severity,
        models=models,
        model_kind=model,
    )
    run_all(settings, duration=duration)


Models = Annotated[
    Path | None, typer.Option("--models", help="Directory of models from `chainwatch train`")
]
ModelKind = Annotated[
    str | None,
    typer.Option("--model", help="Model kind: iforest, hbos, ecod, copod, sk_iforest"),
]


@app.command()
def train(
    out: Annotated[Path, typer.Option("--out", help="Directory to write the models to")],
    input_files: Annotated[
        list[Path] | None,
        typer.Option("--input", help="History to learn from, as `replay` reads it: JSONL "
                     "records, an archive or ethereum-etl table directory, blocks.csv"),
    ] = None,
    kafka: Kafka = None,
    topic_prefix: TopicPrefix = None,
    model: ModelKind = None,
    log_level: LogLevel = None,
) -> None:
    """Fit the detectors' models from history (files and archives, or the Kafka topics)."""
    from chainwatch.bootstrap import run_train

    settings = _settings(
        kafka=kafka, topic_prefix=topic_prefix, model_kind=model, log_level=log_level
    )
    typer.echo(run_train(settings, list(input_files or []), out))


@app.command()
def archive(
    out: Annotated[Path, typer.Option("--out", help="Archive directory (Parquet)")],
    kafka: Kafka = None,
    topic_prefix: TopicPrefix = None,
    until_end: Annotated[
        bool, typer.Option("--until-end", help="Stop once the topics' current end is archived")
    ] = False,
    flush_records: Annotated[
        int, typer.Option("--flush-records", help="Write a file set every N records")
    ] = 20_000,
    flush_seconds: Annotated[
        float, typer.Option("--flush-seconds", help="... or every N seconds")
    ] = 5.0,
    duration: Duration = None,
    log_level: LogLevel = None,
) -> None:
    """Archive the chainwatch topics into Parquet by chain and day (resumable, no duplicates)."""
    from replay.app import run_archive
    from replay.archive import ArchiveConfig

    settings = _settings(kafka=kafka, topic_prefix=topic_prefix, log_level=log_level)
    if not settings.kafka:
        raise ChainwatchError("archive consumes from Kafka: give --kafka HOST:PORT")
    if flush_records < 1 or flush_seconds <= 0:
        raise ChainwatchError("--flush-records and --flush-seconds must be positive")
    config = ArchiveConfig(flush_records=flush_records, flush_seconds=flush_seconds,
                           until_end=until_end)
    run_archive(settings, settings.kafka, out, duration=duration, config=config,
                echo=typer.echo)


@app.command()
def replay(
    source: Annotated[
        str,
        typer.Argument(
            help="JSONL of records, an archive or table directory (replay format or "
            "ethereum-etl blocks.csv + transactions.csv), or kafka://HOST:PORT"
        ),
    ],
    out: Annotated[
        Path | None, typer.Option("--out", help="Write findings (Parquet, CSV) and the report")
    ] = None,
    from_: Annotated[
        str | None,
        typer.Option("--from", help="Start: a block number (19000000), a time "
                     "(2026-11-23T10:00:00Z, @1700000000) or a Kafka offset (offset:N)"),
    ] = None,
    to: Annotated[
        str | None, typer.Option("--to", help="End, inclusive: same forms as --from")
    ] = None,
    speed: Annotated[
        float | None,
        typer.Option("--speed", help="Real-time pacing factor (default: as fast as possible)"),
    ] = None,
    labels: Annotated[
        Path | None, typer.Option("--labels", help="JSONL labels: adds precision/recall/latency")
    ] = None,
    chain_id: Annotated[
        int, typer.Option("--chain-id", help="Chain id for tables without a chain_id column")
    ] = 1,
    node: Annotated[
        str, typer.Option("--node", help="Node name for tables without a node column")
    ] = "replay",
    emit: Annotated[
        str | None, typer.Option("--emit", help="Re-publish findings to Kafka HOST:PORT")
    ] = None,
    metrics_port: Annotated[
        int | None, typer.Option("--metrics-port", help="Serve the replay's metrics on this port")
    ] = None,
    topic_prefix: TopicPrefix = None,
    warmup_blocks: Warmup = None,
    models: Models = None,
    model: ModelKind = None,
    per_block: Annotated[
        bool,
        typer.Option("--per-block", help="One batch per block, as `chainwatch evaluate` "
                     "replays (findings stamped at their block: exact times and latency; slower)"),
    ] = False,
    batch: Annotated[
        int | None,
        typer.Option("--batch", help="Records per batch (default 500, the live consumer's "
                     "poll). Findings are stamped at the end of their batch: bigger is "
                     "faster on thin blocks, coarser in time"),
    ] = None,
    no_progress: Annotated[
        bool, typer.Option("--no-progress", help="No progress bar on stderr")
    ] = False,
    log_level: LogLevel = None,
) -> None:
    """Replay history through the live detectors; findings and a report, deterministically."""
    from chainwatch.exceptions import ConfigError
    from chainwatch.stopping import stops_quietly
    from replay.app import ReplayOptions, run_replay
    from replay.positions import parse_range

    start, stop = parse_range(from_, to)

    settings = _settings(
        topic_prefix=topic_prefix, warmup_blocks=warmup_blocks, models=models, model_kind=model,
        log_level=log_level or "WARNING",
    )
    options = ReplayOptions(
        out=out, start=start, stop=stop, speed=speed, labels=labels,
        chain_id=chain_id, node=node, emit=emit, metrics_port=metrics_port,
        progress=not no_progress, per_block=per_block,
        batch_records=ReplayOptions.batch_records if batch is None else batch,
    )
    if batch is not None and per_block:
        raise ConfigError("--batch and --per-block exclude each other: give one")
    with stops_quietly():
        run_replay(settings, source, options, echo=typer.echo)


@app.command()
def evaluate(
    out: Annotated[Path, typer.Option("--out", help="Markdown report to write")] = Path(
        "docs/quality.md"
    ),
    record: Annotated[
        Path | None,
        typer.Option("--record", help="Directory to save the recording in (records + labels)"),
    ] = None,
    quick: Annotated[bool, typer.Option("--quick", help="The ~2 minute session")] = False,
    from_recording: Annotated[
        Path | None,
        typer.Option("--from-recording", help="Evaluate a saved recording (no anvil needed)"),
    ] = None,
    seed: Annotated[int | None, typer.Option("--seed", help="Scenario seed")] = None,
    log_level: LogLevel = None,
) -> None:
    """Run labelled scenarios on a local anvil, score the detectors, write docs/quality.md."""
    from chainwatch.scenarios import run_evaluate

    if from_recording is not None and (record is not None or quick or seed is not None):
        raise ChainwatchError("--from-recording replays a saved session: drop --record, "
                              "--quick and --seed")
    setup_logging(log_level or "WARNING", json_logs=False)
    typer.echo(run_evaluate(out=out, record=record, quick=quick, from_recording=from_recording,
                            seed=seed, progress=lambda m: typer.echo(m, err=True)))


@app.command()
def demo(
    duration: Annotated[float, typer.Option("--duration", help="Seconds to run")] = 60.0,
    metrics_port: MetricsPort = None,
) -> None:
    """Start a local anvil, send traffic, inject a reorg, and watch chainwatch catch it."""
    from chainwatch.demo import run_demo

    setup_logging("ERROR", json_logs=False)
    run_demo(duration=duration, metrics_port=metrics_port)


@app.command()
def version() -> None:
    """Print the version."""
    typer.echo(__version__)


def main() -> None:
    """Entry point: one-line errors instead of tracebacks for problems users can fix."""
    try:
        _run_command()
    finally:
        # the process ends here: at exit the cyclic collector would walk every object of
        # every library loaded (sklearn, scipy, numba, matplotlib: ~0.6 s); frozen, they
        # are left to the process's end (atexit hooks and weakref finalizers still run)
        gc.freeze()


def _run_command() -> None:
    try:
        # typer, not standalone, turns Ctrl-C (and `typer.Exit(n)`) into a returned code
        code = app(standalone_mode=False)
    except ChainwatchError as exc:
        typer.echo(f"chainwatch: error: {exc}", err=True)
        sys.exit(2)
    except KeyboardInterrupt:
        sys.exit(130)
    except typer.Abort:
        sys.exit(1)
    except Exception as exc:
        # click's usage errors (typer vendors click) arrive here in non-standalone mode
        format_message = getattr(exc, "format_message", None)
        if format_message is None:
            raise
        typer.echo(f"chainwatch: error: {format_message()}", err=True)
        sys.exit(getattr(exc, "exit_code", 2))
    if isinstance(code, int) and code != 0:
        sys.exit(code)


if __name__ == "__main__":
    main()
