"""Run a real single-node Apache Kafka (KRaft) broker on 127.0.0.1.

Used by integration tests and `chainwatch demo`: we promise Kafka, so we test against the
real broker jars fetched by scripts/install-kafka.sh, not a look-alike. The data dir
outlives ``stop()`` so a test can restart the broker on the same ports and see that
acknowledged messages survived; ``close()`` removes it.

``SaslSsl`` turns the client listener into SASL_SSL (PLAIN or SCRAM) with a throwaway
CA and broker certificate from ``make_test_tls``: the secure-transport tests run the
same code path a production cluster with TLS and passwords would.
"""

from __future__ import annotations

import base64
import contextlib
import os
import re
import secrets
import shutil
import signal
import subprocess
import tempfile
import time
import uuid
import weakref
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any, Literal

from chainwatch.local.procs import (
    LOCALHOST,
    ServerStartError,
    cache_dir,
    free_port,
    spawn,
    start_on_free_ports,
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


def keytool_binary() -> Path:
    """keytool beside the java that runs the broker (it ships with every JDK/JRE)."""
    beside = java_binary().resolve().parent / "keytool"
    if beside.is_file():
        return beside
    found = shutil.which("keytool")
    if found:
        return Path(found)
    raise FileNotFoundError("keytool not found beside java or on PATH")


@dataclass(frozen=True)
class TlsMaterial:
    """A throwaway CA and a broker certificate for one loopback host (tests only).

    ``ca_file`` (PEM) is what clients pass as ``ssl_cafile``; the broker reads its key and
    chain from ``keystore`` and trusts ``truststore`` (the CA) on its own inter-broker
    connections. Both stores are PKCS12 with ``password``.
    """

    ca_file: Path
    keystore: Path
    truststore: Path
    password: str


def make_test_tls(directory: Path, host: str = LOCALHOST, days: int = 2) -> TlsMaterial:
    """Generate a CA and a broker certificate for ``host`` with keytool.

    keytool, not openssl: it comes with the Java the broker needs anyway. The broker
    certificate names ``host`` as an IP (or DNS) subjectAltName, so clients can keep
    hostname checking on. Takes a few seconds (one JVM per step).
    """
    directory.mkdir(parents=True, exist_ok=True)
    password = secrets.token_hex(12)
    tool = str(keytool_binary())
    ca_store, keystore = directory / "ca.p12", directory / "broker.p12"
    truststore, ca_pem = directory / "truststore.p12", directory / "ca.pem"
    csr, crt = directory / "broker.csr", directory / "broker.crt"
    names = [f"IP:{host}" if re.fullmatch(r"[\d.]+|[0-9a-fA-F:]+", host) else f"DNS:{host}"]
    names += [] if host == "localhost" else ["DNS:localhost"]
    common = ["-storetype", "PKCS12", "-storepass", password, "-noprompt"]
    steps: list[list[str]] = [
        ["-genkeypair", "-alias", "ca", "-keyalg", "RSA", "-keysize", "2048",
         "-dname", "CN=chainwatch test CA", "-ext", "bc:c", "-ext", "KU:c=keyCertSign,cRLSign",
         "-validity", str(days), "-keystore", str(ca_store)],
        ["-exportcert", "-rfc", "-alias", "ca", "-keystore", str(ca_store), "-file", str(ca_pem)],
        ["-genkeypair", "-alias", "broker", "-keyalg", "RSA", "-keysize", "2048",
         "-dname", f"CN={host}", "-validity", str(days), "-keystore", str(keystore)],
        ["-certreq", "-alias", "broker", "-keystore", str(keystore), "-file", str(csr)],
        ["-gencert", "-rfc", "-alias", "ca", "-keystore", str(ca_store), "-infile", str(csr),
         "-outfile", str(crt), "-validity", str(days), "-ext", "SAN=" + ",".join(names),
         "-ext", "KU=digitalSignature,keyEncipherment", "-ext", "EKU=serverAuth,clientAuth"],
        ["-importcert", "-alias", "ca", "-keystore", str(keystore), "-file", str(ca_pem)],
        ["-importcert", "-alias", "broker", "-keystore", str(keystore), "-file", str(crt)],
        ["-importcert", "-alias", "ca", "-keystore", str(truststore), "-file", str(ca_pem)],
    ]
    for step in steps:
        result = subprocess.run(
            [tool, *step, *common], capture_output=True, text=True, timeout=60,
            stdin=subprocess.DEVNULL,
        )
        if result.returncode != 0:
            raise ServerStartError(
                f"keytool {step[0]} failed ({result.returncode}): "
                f"{(result.stdout + result.stderr).strip()}"
            )
    return TlsMaterial(ca_pem, keystore, truststore, password)


# Characters that would break the JAAS line or StorageTool's --add-scram syntax.
_UNSAFE_CREDENTIAL = re.compile(r'[\s"\\,\[\]=;]')
SaslMechanism = Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"]


@dataclass(frozen=True)
class SaslSsl:
    """Make the client listener SASL_SSL: TLS from ``tls``, and these users.

    PLAIN users live in the listener's JAAS line; SCRAM users are written into the KRaft
    metadata at format time (``--add-scram``), which is how KRaft bootstraps them. The
    broker talks to itself over the same listener as ``broker_user``.
    """

    tls: TlsMaterial
    users: Mapping[str, str]
    mechanism: SaslMechanism = "SCRAM-SHA-256"
    broker_user: str = "chainwatch-broker"
    broker_password: str = field(default_factory=lambda: secrets.token_hex(16))

    def __post_init__(self) -> None:
        if self.mechanism not in ("PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"):
            raise ValueError(f"unsupported SASL mechanism {self.mechanism!r}")
        for name, password in self.all_users().items():
            if not name or not password or _UNSAFE_CREDENTIAL.search(name + password):
                raise ValueError(
                    f"SASL user {name!r}: names and passwords must be non-empty, without "
                    'whitespace or any of " \\ , [ ] = ;'
                )

    def all_users(self) -> dict[str, str]:
        return {**self.users, self.broker_user: self.broker_password}

    def listener_config(self, listener: str) -> dict[str, str]:
        """server.properties entries for the SASL_SSL listener named ``listener``."""
        prefix = f"listener.name.{listener.lower()}.{self.mechanism.lower()}"
        if self.mechanism == "PLAIN":
            accepted = " ".join(f'user_{u}="{p}"' for u, p in self.all_users().items())
            jaas = (
                "org.apache.kafka.common.security.plain.PlainLoginModule required "
                f'username="{self.broker_user}" password="{self.broker_password}" {accepted};'
            )
        else:
            jaas = (
                "org.apache.kafka.common.security.scram.ScramLoginModule required "
                f'username="{self.broker_user}" password="{self.broker_password}";'
            )
        tls = self.tls
        return {
            "sasl.enabled.mechanisms": self.mechanism,
            "sasl.mechanism.inter.broker.protocol": self.mechanism,
            f"{prefix}.sasl.jaas.config": jaas,
            "ssl.keystore.type": "PKCS12",
            "ssl.keystore.location": str(tls.keystore),
            "ssl.keystore.password": tls.password,
            "ssl.key.password": tls.password,
            "ssl.truststore.type": "PKCS12",
            "ssl.truststore.location": str(tls.truststore),
            "ssl.truststore.password": tls.password,
            "ssl.client.auth": "none",
        }

    def format_args(self) -> list[str]:
        """StorageTool arguments that create the SCRAM users (none for PLAIN)."""
        if self.mechanism == "PLAIN":
            return []
        return [
            arg
            for user, password in self.all_users().items()
            for arg in ("--add-scram", f"{self.mechanism}=[name={user},password={password}]")
        ]

    def client_config(self, username: str, password: str) -> dict[str, Any]:
        """kafka-python keyword arguments for ``username`` on this listener."""
        return {
            "security_protocol": "SASL_SSL",
            "sasl_mechanism": self.mechanism,
            "sasl_plain_username": username,
            "sasl_plain_password": password,
            "ssl_cafile": str(self.tls.ca_file),
        }


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
        sasl_ssl: SaslSsl | None = None,
    ) -> None:
        """``format_args`` go to StorageTool format (e.g. ``--add-scram ...``).

        With ``sasl_ssl`` the client listener (the one ``bootstrap`` names) is SASL_SSL;
        the controller listener stays PLAINTEXT on 127.0.0.1.
        """
        self._sasl_ssl = sasl_ssl
        self._num_partitions = num_partitions
        self._extra_config = dict(extra_config or {})
        self._libs = libs
        self._heap = heap
        self._startup_timeout = startup_timeout
        self._format_args = tuple(format_args) + tuple(
            sasl_ssl.format_args() if sasl_ssl else ()
        )
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
        name = "SASL_SSL" if self._sasl_ssl else "PLAINTEXT"
        client = f"{name}://{LOCALHOST}:{self._port}"
        config: dict[str, str] = {
            "process.roles": "broker,controller",
            "node.id": "1",
            "listeners": f"{client},CONTROLLER://{LOCALHOST}:{self._controller_port}",
            "advertised.listeners": client,
            "inter.broker.listener.name": name,
            "controller.listener.names": "CONTROLLER",
            "listener.security.protocol.map": f"{name}:{name},CONTROLLER:PLAINTEXT",
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
        if self._sasl_ssl is not None:
            config.update(self._sasl_ssl.listener_config(name))
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
        """Start the broker and wait until it serves metadata; returns self for chaining.

        A first start whose port was taken between `free_port` and the JVM binding it
        (another socket's local end) starts again on new ports (the storage it formatted
        serves them as well: tested); a restart keeps its ports, known to clients by then.
        """
        if self.running:
            raise RuntimeError(f"broker already running (pid {self.pid})")
        if self._dir is None:
            self._dir = Path(tempfile.mkdtemp(prefix="chainwatch-kafka-"))
            # Removes the dir even when close() is never called (a crashed test run).
            self._cleanup = weakref.finalize(self, shutil.rmtree, self._dir, ignore_errors=True)
        first = self._port is None
        if first:
            self._pick_ports()
        start_on_free_ports(self._start_once, self.log_file,
                            self._pick_ports if first else None)
        return self

    def _pick_ports(self) -> None:
        self._port = free_port()
        self._controller_port = free_port()
        while self._controller_port == self._port:
            self._controller_port = free_port()

    def _start_once(self) -> None:
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
            wait_for_port(LOCALHOST, self.port, self._startup_timeout, proc=self._proc)
            remaining = self._startup_timeout - (time.monotonic() - started)
            self._wait_ready(max(remaining, 5.0))
        except (TimeoutError, ServerStartError) as exc:
            tail = self.tail()
            self.stop()
            raise ServerStartError(f"kafka broker did not start: {exc}\n{tail}") from exc

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
                    **self.client_config(),
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

    def kill(self) -> None:
        """SIGKILL the broker's process group, as a crash would: no clean shutdown, no
        final flush. Data dir and ports are kept for a later ``start()``."""
        proc, self._proc = self._proc, None
        if proc is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        stop_pid(proc.pid, timeout=10.0)  # reaps it, so the PID really disappears

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

    @property
    def sasl_ssl(self) -> SaslSsl | None:
        return self._sasl_ssl

    def client_config(
        self, username: str | None = None, password: str | None = None
    ) -> dict[str, Any]:
        """kafka-python keyword arguments to reach this broker.

        On a SASL_SSL broker: as ``username``/``password``, by default the broker's own
        user (used for the readiness check and by tests that read topics).
        """
        conf: dict[str, Any] = {"bootstrap_servers": [self.bootstrap]}
        if self._sasl_ssl is not None:
            sasl = self._sasl_ssl
            conf.update(
                sasl.client_config(
                    username or sasl.broker_user,
                    password if password is not None else sasl.broker_password,
                )
            )
        return conf

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
