"""Kafka over SASL_SSL on a real broker: the pipeline works, bad credentials fail fast in
one line, and no secret (RPC key, SASL password) reaches any output.

The broker is a real KRaft Kafka with a SASL_SSL client listener on 127.0.0.1, a CA and
broker certificate made for this run by keytool (chainwatch.local.kafka.make_test_tls),
and SCRAM-SHA-256 users created at format time; one PLAIN broker checks the other
mechanism. chainwatch gets the settings the way an operator gives them: CHAINWATCH_KAFKA_*
environment variables.
"""

from __future__ import annotations

import base64
import json
import re
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from chainwatch.local.anvil import Anvil
from chainwatch.local.kafka import KafkaBroker, SaslSsl, TlsMaterial, make_test_tls
from tests.integration.conftest import free_port, metric, wait_until
from tests.integration.test_spine import LABELS, assert_reorg_of_depth_3_is_seen

pytestmark = pytest.mark.integration

USER = "chainwatch"
PASSWORD = "sasl-pw-SECRET-7f3a9c"  # every output is searched for this
RPC_SECRET = "SECRET-TOKEN-123"  # and for this API key in the RPC and WebSocket URLs


@pytest.fixture(scope="module")
def tls(tmp_path_factory: pytest.TempPathFactory) -> TlsMaterial:
    return make_test_tls(tmp_path_factory.mktemp("tls"))


@pytest.fixture(scope="module")
def secure_kafka(tls: TlsMaterial) -> Iterator[KafkaBroker]:
    broker = KafkaBroker(
        num_partitions=3,
        sasl_ssl=SaslSsl(tls, {USER: PASSWORD}, mechanism="SCRAM-SHA-256"),
    )
    try:
        broker.start()
        yield broker
    finally:
        broker.close()


def kafka_env(broker: KafkaBroker, **changes: str) -> dict[str, str]:
    """The CHAINWATCH_KAFKA_* settings an operator would export for this broker."""
    assert broker.sasl_ssl is not None
    env = {
        "CHAINWATCH_KAFKA_SECURITY_PROTOCOL": "SASL_SSL",
        "CHAINWATCH_KAFKA_SASL_MECHANISM": broker.sasl_ssl.mechanism,
        "CHAINWATCH_KAFKA_SASL_USERNAME": USER,
        "CHAINWATCH_KAFKA_SASL_PASSWORD": PASSWORD,
        "CHAINWATCH_KAFKA_SSL_CAFILE": str(broker.sasl_ssl.tls.ca_file),
    }
    return {**env, **changes}


def read_all(broker: KafkaBroker, topic: str, expect: int = 0, timeout: float = 20) -> list[Any]:
    """Every message of ``topic`` (as the broker's user), waiting for at least ``expect``."""
    from kafka import KafkaConsumer

    consumer = KafkaConsumer(
        topic, **broker.client_config(), auto_offset_reset="earliest",
        group_id=f"reader-{uuid.uuid4().hex}", session_timeout_ms=6000,
        heartbeat_interval_ms=1000,
    )
    got: list[Any] = []
    try:
        deadline = time.monotonic() + timeout
        idle = 0
        while time.monotonic() < deadline:
            batch = [r for rs in consumer.poll(timeout_ms=500).values() for r in rs]
            got.extend(batch)
            idle = 0 if batch else idle + 1
            if len(got) >= expect and idle >= 4 and consumer.assignment():
                break
    finally:
        consumer.close()
    assert len(got) >= expect, f"{len(got)} message(s) on {topic}, expected {expect}"
    return got


def node_args(url: str, ws: str, state_dir: Path) -> list[str]:
    return ["--rpc", url, "--ws", ws, "--node", "anvil1", "--state-dir", str(state_dir),
            "--poll-interval", "1", "--start-block", "0"]


def start_pair(chainwatch_procs, broker: KafkaBroker, prefix: str, rpc_url: str, ws_url: str,
               state_dir: Path, *, log_level: str = "INFO") -> tuple[Any, Any, int, int]:
    """`chainwatch detect` and `chainwatch collect` on the secure broker."""
    detect_port, collect_port = free_port(), free_port()
    env = kafka_env(broker)
    detect = chainwatch_procs(
        "detect", "detect", "--kafka", broker.bootstrap, "--metrics-port", str(detect_port),
        "--metrics-host", "127.0.0.1", "--topic-prefix", prefix, "--group", f"g-{prefix}",
        "--log-level", log_level, env=env,
    )
    collect = chainwatch_procs(
        "collect", "collect", *node_args(rpc_url, ws_url, state_dir), "--kafka",
        broker.bootstrap, "--topic-prefix", prefix, "--metrics-port", str(collect_port),
        "--metrics-host", "127.0.0.1", "--log-level", log_level, env=env,
    )
    return detect, collect, detect_port, collect_port


# --- (a) the pipeline over SASL_SSL --------------------------------------------------------


def test_reorg_is_seen_through_a_sasl_ssl_broker_by_separate_collector_and_detector(
    anvil: Anvil, secure_kafka: KafkaBroker, chainwatch_procs, tmp_path: Path
) -> None:
    from chainwatch.schema import Finding, decode

    prefix = f"s{uuid.uuid4().hex[:8]}"
    _, _, port, _ = start_pair(chainwatch_procs, secure_kafka, prefix, anvil.http_url,
                               anvil.ws_url, tmp_path / "state")
    assert_reorg_of_depth_3_is_seen(anvil, port)
    findings = [decode(m.value) for m in read_all(secure_kafka, f"{prefix}.findings", 1)]
    assert any(isinstance(f, Finding) and f.detector == "reorg_depth" for f in findings)


def test_kafka_bus_produces_and_consumes_records_over_sasl_ssl_with_plain(
    tls: TlsMaterial,
) -> None:
    """The other mechanism (PLAIN over TLS), through the bus adapter itself."""
    from pydantic import SecretStr

    from chainwatch.bus.kafka import KafkaBus, KafkaConfig
    from chainwatch.schema import NodeStatus, decode, encode

    broker = KafkaBroker(sasl_ssl=SaslSsl(tls, {USER: PASSWORD}, mechanism="PLAIN"))
    try:
        broker.start()
        bus = KafkaBus(KafkaConfig(
            broker.bootstrap, security_protocol="SASL_SSL", sasl_mechanism="PLAIN",
            sasl_username=USER, sasl_password=SecretStr(PASSWORD),
            ssl_cafile=str(tls.ca_file), partitions=1,
        ))
        records = [
            NodeStatus(chain_id=1, node="n", event_id=f"e{i}", observed_at=float(i),
                       reachable=True, head_number=i, expected_block_time_seconds=12.0)
            for i in range(50)
        ]
        try:
            bus.ensure_topics(["secure.status"])
            for record in records:
                bus.publish("secure.status", record.stream_key(), encode(record))
            bus.flush()
            consumer = bus.consumer(["secure.status"], "g-plain")
            got: list[Any] = []
            deadline = time.monotonic() + 30
            while len(got) < len(records) and time.monotonic() < deadline:
                got.extend(decode(m.value) for m in consumer.poll(1.0))
            consumer.commit()
            consumer.close()
        finally:
            bus.close()
        assert got == records
    finally:
        broker.close()


# --- (b) wrong credentials: one line, bounded time ----------------------------------------


@pytest.mark.parametrize(
    ("case", "changes", "leak"),
    [
        ("wrong password", {"CHAINWATCH_KAFKA_SASL_PASSWORD": "wrong-pw-LEAKCHECK-1"},
         "wrong-pw-LEAKCHECK-1"),
        ("unknown user", {"CHAINWATCH_KAFKA_SASL_USERNAME": "mallory"}, PASSWORD),
        ("untrusted CA", {"CHAINWATCH_KAFKA_SSL_CAFILE": "/etc/ssl/certs/ca-certificates.crt"},
         PASSWORD),
        ("plaintext client", {"CHAINWATCH_KAFKA_SECURITY_PROTOCOL": "PLAINTEXT"}, PASSWORD),
    ],
)
def test_a_refused_session_is_one_error_line_in_bounded_time(
    secure_kafka: KafkaBroker, tmp_path: Path, case: str, changes: dict[str, str], leak: str
) -> None:
    if case == "untrusted CA" and not Path(changes["CHAINWATCH_KAFKA_SSL_CAFILE"]).is_file():
        pytest.skip("no system CA bundle to stand in for an unrelated CA")
    failed_auth = re.compile(r"Failed authentication with /127\.0\.0\.1")
    before = len(failed_auth.findall(secure_kafka.log_file.read_text(errors="replace")))
    started = time.monotonic()
    result = subprocess.run(
        [sys.executable, "-m", "chainwatch.cli", "detect", "--kafka", secure_kafka.bootstrap,
         "--metrics-port", "0", "--metrics-host", "127.0.0.1", "--topic-prefix", "refused"],
        env={**_base_env(), **kafka_env(secure_kafka, **changes)},
        capture_output=True, text=True, timeout=90, stdin=subprocess.DEVNULL,
    )
    elapsed = time.monotonic() - started
    time.sleep(0.5)  # the broker logs the last attempt asynchronously
    attempts = len(failed_auth.findall(secure_kafka.log_file.read_text(errors="replace")))
    attempts -= before
    output = result.stdout + result.stderr
    print(f"{case}: exit {result.returncode} after {elapsed:.1f} s, {attempts} failed "
          f"authentications logged by the broker: {result.stderr.strip()}")
    assert result.returncode != 0
    assert "Traceback" not in output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("chainwatch: error: "), output[-2000:]
    if case == "plaintext client":
        assert "SECURITY_PROTOCOL" in lines[0]
    else:
        assert "refused the session" in lines[0] and "SASL" in lines[0]
    assert leak not in output and PASSWORD not in output
    assert elapsed < 30
    assert attempts <= 10  # kafka-python retries with backoff until the bootstrap timeout


def _base_env() -> dict[str, str]:
    import os

    return {k: v for k, v in os.environ.items() if not k.startswith("CHAINWATCH_")} | {
        "CHAINWATCH_LOG_JSON": "true", "PYTHONUNBUFFERED": "1",
    }


# --- (c) secret hygiene --------------------------------------------------------------------


def _get(url: str) -> str:
    try:
        with urllib.request.urlopen(url, timeout=5) as resp:
            return resp.read().decode(errors="replace")
    except OSError as exc:  # a 503 /readyz still has a body worth searching
        body = getattr(exc, "read", None)
        return body().decode(errors="replace") if body else ""


def test_no_secret_reaches_logs_metrics_records_or_state(
    anvil: Anvil, secure_kafka: KafkaBroker, chainwatch_procs, tmp_path: Path
) -> None:
    """RPC key and SASL password are everywhere in the config; nowhere in what comes out.

    Debug logging, a poison message (dead-letter path), a reorg (finding path) and the
    node going away (RPC and WebSocket error paths, which print URLs) all happen.
    """
    from kafka import KafkaAdminClient, KafkaProducer

    prefix = f"h{uuid.uuid4().hex[:8]}"
    rpc_url = f"{anvil.http_url}/?apikey={RPC_SECRET}"
    ws_url = f"{anvil.ws_url}/?apikey={RPC_SECRET}"
    state = tmp_path / "state"
    detect, collect, detect_port, collect_port = start_pair(
        chainwatch_procs, secure_kafka, prefix, rpc_url, ws_url, state, log_level="DEBUG"
    )
    wait_until(lambda: metric(detect_port, "chainwatch_build_info") == 1, 30, "the detector")
    producer = KafkaProducer(**secure_kafka.client_config(), acks="all")
    try:
        producer.send(f"{prefix}.blocks", key=b"31337:anvil1", value=b"\xffpoison")
        producer.flush()
    finally:
        producer.close()
    assert_reorg_of_depth_3_is_seen(anvil, detect_port)
    wait_until(lambda: metric(detect_port, "chainwatch_invalid_records_total",
                              {"topic": f"{prefix}.blocks"}) == 1, 20, "the poison message")

    pages = {
        f"{name} {path}": _get(f"http://127.0.0.1:{port}{path}")
        for name, port in (("detect", detect_port), ("collect", collect_port))
        for path in ("/metrics", "/healthz", "/readyz", "/api/v1/chain")
    }
    anvil.stop()  # the node goes away: the collector logs RPC and WebSocket errors
    wait_until(lambda: metric(detect_port, "chainwatch_node_state",
                              {**LABELS, "state": "unreachable"}) == 1, 30,
               "the node to be reported unreachable")
    pages |= {
        f"{name} /metrics (node down)": _get(f"http://127.0.0.1:{port}/metrics")
        for name, port in (("detect", detect_port), ("collect", collect_port))
    }
    admin = KafkaAdminClient(**secure_kafka.client_config())
    try:
        topics = sorted(t for t in admin.list_topics() if t.startswith(prefix))
    finally:
        admin.close()
    messages = {topic: read_all(secure_kafka, topic) for topic in topics}
    collect.stop()
    detect.stop()

    outputs: dict[str, str] = {
        "detect output": detect.output(),
        "collect output": collect.output(),
        **pages,
        **{f"topic {t}": "\n".join(repr(m.key) + " " + m.value.decode(errors="replace")
                                   for m in ms) for t, ms in messages.items()},
        **{f"state file {p.name}": p.read_text(errors="replace")
           for p in state.rglob("*") if p.is_file()},
    }
    # the run did what the search needs: records, a finding, a dead letter, logged URLs
    assert len(messages[f"{prefix}.findings"]) >= 1
    [dead] = messages[f"{prefix}.deadletter"]
    assert base64.b64decode(json.loads(dead.value)["payload_base64"]) == b"\xffpoison"
    assert len(messages[f"{prefix}.blocks"]) >= 10
    assert "/***" in outputs["collect output"]  # the URLs were logged, redacted
    assert len(outputs["collect output"].splitlines()) > 50  # debug logging was on
    leaks = {
        where: [secret for secret in (RPC_SECRET, PASSWORD, "apikey") if secret in text]
        for where, text in outputs.items()
    }
    sizes = {where: len(text) for where, text in outputs.items()}
    print(f"searched {len(outputs)} outputs, {sum(sizes.values())} characters: {sizes}")
    assert {w: s for w, s in leaks.items() if s} == {}
