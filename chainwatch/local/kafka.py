"""Run a real single-node Apache Kafka (KRaft) broker on 127.0.0.1.

Used by integration tests and `chainwatch demo`: we promise Kafka, so we test against the
real broker jars fetched by scripts/install-kafka.sh, not a look-alike. The data dir
outlives ``stop()`` so a test can restart the broker on the same ports and see that
acknowledged messages survived; ``close()`` removes it.
"""

from __future__ import annotations

import base64
import os
import shutil
import subprocess
import tempfile
import time
import uuid
import weakref
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

from chainwatch.local.procs import (
    LOCALHOST,
    ServerStartError,
    cache_dir,
    free_port,
    spawn,
    stop_pid,
    wait_for_port,
)

ENV_LIBS = "CHAINWATCH_KAFKA_LIBS"

# Root INFO keeps startup errors explainable from the file; the request/state-change
# loggers are the chatty ones on a busy test broker.
_LOG4J2 = """\
status = warn
appender.file.type = File
appender.file.name = file
appender.file.fileName = {log_file}
appender.file.layout.type = PatternLayout
appender.file.layout.pattern = [%d] %p %m (%c)%n
rootLogger.level = INFO
rootLogger.appenderRef.file.ref = file
logger.request.name = kafka.request.logger
logger.request.level = WARN
logger.state.name = state.change.logger
logger.state.level = WARN
logger.cleaner.name = kafka.log.LogCleaner
logger.cleaner.level = WARN
"""


def kafka_libs() -> Path:
    """The broker jars: $CHAINWATCH_KAFKA_LIBS, else .cache/kafka/libs from the script."""
    override = os.environ.get(ENV_LIBS)
    libs = Path(override) if override else cache_dir() / "kafka" / "libs"
    if not any(libs.glob("kafka_2.13-*.jar")):
        where = f"{ENV_LIBS}={override}" if override else str(libs)
        raise FileNotFoundError(
            f"Kafka broker jars not found in {where}: run scripts/install-kafka.sh"
        )
    return libs


def java_binary() -> Path:
    """java from $JAVA_HOME, else PATH; Kafka 4.x needs Java 17 or newer."""
    java_home = os.environ.get("JAVA_HOME")
    if java_home:
        candidate = Path(java_home) / "bin" / "java"
        if candidate.is_file():
            return candidate
    found = shutil.which("java")
    if found:
        return Path(found)
    raise FileNotFoundError("java not found on PATH or in $JAVA_HOME (Kafka 4.x needs Java 17+)")


def random_cluster_id() -> str:
    """A Kafka cluster id: 16 random bytes as 22 chars of unpadded base64url.

    Kafka's own generator avoids a leading '-', which its CLI would read as an option.
    """
    while True:
        cid = base64.urlsafe_b64encode(uuid.uuid4().bytes).rstrip(b"=").decode()
        if not cid.startswith("-"):
            return cid


class KafkaBroker:
    """One KRaft broker+controller process in a private temp dir.

    Lifecycle: ``start()`` (formats storage on first start), ``stop()`` (process only,
    data kept), ``start()`` again on the same ports and data, ``close()`` (stop and remove
    the temp dir). As a context manager it starts on enter and closes on exit.
    """

    def __init__(
        self,
        num_partitions: int = 1,
        extra_config: Mapping[str, str | int | bool] | None = None,
        libs: Path | None = None,
        heap: str = "512m",
        startup_timeout: float = 60.0,
        format_args: Sequence[str] = (),
    ) -> None:
        """``format_args`` go to StorageTool format (e.g. ``--add-scram ...``)."""
        self._num_partitions = num_partitions
        self._extra_config = dict(extra_config or {})
        self._libs = libs
        self._heap = heap
        self._startup_timeout = startup_timeout
        self._format_args = tuple(format_args)
        self._dir: Path | None = None
        self._port: int | None = None
        self._controller_port: int | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._cluster_id: str | None = None
        self._cleanup: weakref.finalize[Any, Any] | None = None

    # -- paths and config ------------------------------------------------------------------

    @property
    def workdir(self) -> Path:
        if self._dir is None:
            raise RuntimeError("broker has no work dir: call start() first")
        return self._dir

    @property
    def data_dir(self) -> Path:
        return self.workdir / "data"

    @property
    def log_file(self) -> Path:
        """The broker's log4j output (stdout/stderr go to ``stdout.log`` beside it)."""
        return self.workdir / "broker.log"

    def _config(self) -> dict[str, str]:
        assert self._port is not None and self._controller_port is not None
        plain = f"PLAINTEXT://{LOCALHOST}:{self._port}"
        config: dict[str, str] = {
            "process.roles": "broker,controller",
            "node.id": "1",
            "listeners": f"{plain},CONTROLLER://{LOCALHOST}:{self._controller_port}",
            "advertised.listeners": plain,
            "inter.broker.listener.name": "PLAINTEXT",
            "controller.listener.names": "CONTROLLER",
            "listener.security.protocol.map": "PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT",
            "controller.quorum.bootstrap.servers": f"{LOCALHOST}:{self._controller_port}",
            "log.dirs": str(self.data_dir),
            "num.partitions": str(self._num_partitions),
            "default.replication.factor": "1",
            "min.insync.replicas": "1",
            "offsets.topic.replication.factor": "1",
            "offsets.topic.num.partitions": "1",
            "transaction.state.log.replication.factor": "1",
            "transaction.state.log.min.isr": "1",
            "share.coordinator.state.topic.replication.factor": "1",
            "share.coordinator.state.topic.min.isr": "1",
            "group.initial.rebalance.delay.ms": "0",
            "auto.create.topics.enable": "true",
        }
        for key, value in self._extra_config.items():
            config[key] = str(value).lower() if isinstance(value, bool) else str(value)
        return config

    def _write_config(self) -> Path:
        path = self.workdir / "server.properties"
        lines = [f"{key}={value}" for key, value in self._config().items()]
        path.write_text("\n".join(lines) + "\n")
        (self.workdir / "log4j2.properties").write_text(_LOG4J2.format(log_file=self.log_file))
        return path

    def _java(self, main: str, *args: str, heap: str | None = None) -> list[str]:
        libs = self._libs or kafka_libs()
        cmd = [str(java_binary())]
        if heap:
            cmd.append(f"-Xmx{heap}")
        cmd += [
            "-XX:+ExitOnOutOfMemoryError",
            "-Djava.awt.headless=true",
            f"-Dlog4j2.configurationFile={self.workdir / 'log4j2.properties'}",
            f"-Dkafka.logs.dir={self.workdir}",
            "-cp",
            f"{libs}/*",
            main,
            *args,
        ]
        return cmd

    def _format(self, config: Path) -> None:
        """Format KRaft storage once; a restart must reuse the existing metadata."""
        if (self.data_dir / "meta.properties").exists():
            return
        self._cluster_id = random_cluster_id()
        cmd = self._java(
            "kafka.tools.StorageTool",
            "format",
            "-t",
            self._cluster_id,
            "-c",
            str(config),
            "--standalone",
            *self._format_args,
            heap="256m",
        )
        result = subprocess.run(
            cmd, capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL
        )
        if result.returncode != 0:
            raise ServerStartError(
                f"kafka storage format failed ({result.returncode}):\n"
                f"{result.stdout}{result.stderr}".rstrip()
            )

    # -- lifecycle -------------------------------------------------------------------------

    def start(self) -> KafkaBroker:
        """Start the broker and wait until it serves metadata; returns self for chaining."""
        if self.running:
            raise RuntimeError(f"broker already running (pid {self.pid})")
        if self._dir is None:
            self._dir = Path(tempfile.mkdtemp(prefix="chainwatch-kafka-"))
            # Removes the dir even when close() is never called (a crashed test run).
            self._cleanup = weakref.finalize(self, shutil.rmtree, self._dir, ignore_errors=True)
        if self._port is None:
            self._port = free_port()
            self._controller_port = free_port()
            while self._controller_port == self._port:
                self._controller_port = free_port()
        config = self._write_config()
        self._format(config)

        with open(self.workdir / "stdout.log", "ab") as out:
            self._proc = spawn(
                self._java("kafka.Kafka", str(config), heap=self._heap),
                stdout=out,
                stderr=subprocess.STDOUT,
                cwd=self.workdir,
            )
        started = time.monotonic()
        try:
            wait_for_port(LOCALHOST, self._port, self._startup_timeout, proc=self._proc)
            remaining = self._startup_timeout - (time.monotonic() - started)
            self._wait_ready(max(remaining, 5.0))
        except (TimeoutError, ServerStartError) as exc:
            tail = self.tail()
            self.stop()
            raise ServerStartError(f"kafka broker did not start: {exc}\n{tail}") from exc
        return self

    def _wait_ready(self, timeout: float) -> None:
        """An open port is not a ready broker: wait until it answers a metadata request."""
        try:
            from kafka import KafkaAdminClient  # optional: the package works without it
        except ImportError:
            return
        deadline = time.monotonic() + timeout
        last: Exception | None = None
        while time.monotonic() < deadline:
            if self._proc is None or self._proc.poll() is not None:
                code = None if self._proc is None else self._proc.returncode
                raise ServerStartError(f"broker exited with code {code}")
            admin: Any = None
            try:
                admin = KafkaAdminClient(
                    bootstrap_servers=self.bootstrap,
                    request_timeout_ms=5000,
                    client_id="chainwatch-local-ready",
                )
                admin.list_topics()
                return
            except Exception as exc:  # any client error means "not yet"
                last = exc
                time.sleep(0.2)
            finally:
                if admin is not None:
                    admin.close()
        raise TimeoutError(f"broker did not answer metadata requests: {last!r}")

    def restart(self) -> KafkaBroker:
        """Stop the process and start it again on the same ports and data."""
        self.stop()
        return self.start()

    def stop(self, timeout: float = 20.0, remove_data: bool = False) -> None:
        """Stop the broker by PID (its whole process group).

        Keeps the data dir and ports for a later ``start()`` unless ``remove_data``.
        """
        proc, self._proc = self._proc, None
        if proc is not None:
            stop_pid(proc.pid, timeout=timeout)
        if remove_data and self._dir is not None:
            if self._cleanup is not None:
                self._cleanup()
            shutil.rmtree(self._dir, ignore_errors=True)
            self._dir = self._cleanup = None
            self._port = self._controller_port = None

    def close(self) -> None:
        """Stop and remove everything the broker wrote."""
        self.stop(remove_data=True)

    def __enter__(self) -> KafkaBroker:
        if not self.running:
            self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # -- access ----------------------------------------------------------------------------

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    @property
    def pid(self) -> int:
        if self._proc is None:
            raise RuntimeError("broker is not running")
        return self._proc.pid

    @property
    def port(self) -> int:
        if self._port is None:
            raise RuntimeError("broker has not started yet")
        return self._port

    @property
    def bootstrap(self) -> str:
        return f"{LOCALHOST}:{self.port}"

    def tail(self, lines: int = 40) -> str:
        """The end of the broker's log and stdout, for error messages."""
        parts: list[str] = []
        if self._dir is None:
            return ""
        for name in ("broker.log", "stdout.log"):
            path = self._dir / name
            if path.exists():
                text = path.read_text(errors="replace").splitlines()[-lines:]
                if text:
                    parts.append(f"--- {name} (last {len(text)} lines) ---")
                    parts.extend(text)
        return "\n".join(parts)
