"""The local real-server tooling works: tests and `chainwatch demo` build on it."""

from __future__ import annotations

import json
import socket
import urllib.request
import uuid

import pytest

from chainwatch.local import kafka as local_kafka
from chainwatch.local.anvil import Anvil
from chainwatch.local.kafka import KafkaBroker
from chainwatch.local.procs import pid_alive

pytestmark = pytest.mark.integration


def _block_number(url: str) -> int:
    body = json.dumps({"jsonrpc": "2.0", "id": 1, "method": "eth_blockNumber", "params": []})
    request = urllib.request.Request(
        url, data=body.encode(), headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=10) as response:
        return int(json.loads(response.read())["result"], 16)


def test_anvil_starts_answers_rpc_and_stops_by_pid() -> None:
    with Anvil() as node:
        pid = node.pid
        assert node.http_url == f"http://127.0.0.1:{node.port}"
        assert _block_number(node.http_url) == 0
        node.rpc("anvil_mine", ["0x3"])
        assert _block_number(node.http_url) == 3
    assert not pid_alive(pid)


def test_anvil_restarts_on_the_same_port() -> None:
    node = Anvil().start(no_mining=True)
    try:
        port, first_pid = node.port, node.pid
        node.restart()
        assert node.port == port
        assert node.pid != first_pid
        assert not pid_alive(first_pid)
        assert _block_number(node.http_url) == 0
    finally:
        node.stop()


def test_kafka_broker_round_trips_a_keyed_message_and_stops_by_pid() -> None:
    from kafka import KafkaConsumer, KafkaProducer

    topic = f"local-servers-{uuid.uuid4().hex}"
    with KafkaBroker() as broker:
        pid = broker.pid
        producer = KafkaProducer(bootstrap_servers=broker.bootstrap, acks="all")
        try:
            metadata = producer.send(topic, key=b"block-1", value=b"hello").get(timeout=30)
        finally:
            producer.close()
        assert metadata.offset == 0

        consumer = KafkaConsumer(
            topic,
            bootstrap_servers=broker.bootstrap,
            group_id=f"g-{uuid.uuid4().hex}",
            auto_offset_reset="earliest",
            session_timeout_ms=6000,
            heartbeat_interval_ms=1000,
            consumer_timeout_ms=20000,
        )
        try:
            records = [next(consumer)]
        finally:
            consumer.close()
        assert [(r.key, r.value) for r in records] == [(b"block-1", b"hello")]
        workdir = broker.workdir
    assert not pid_alive(pid)
    assert not workdir.exists()


def test_kafka_broker_keeps_acknowledged_data_across_a_restart() -> None:
    from kafka import KafkaConsumer, KafkaProducer

    topic = f"local-servers-{uuid.uuid4().hex}"
    with KafkaBroker() as broker:
        producer = KafkaProducer(bootstrap_servers=broker.bootstrap, acks="all")
        try:
            producer.send(topic, key=b"k", value=b"kept").get(timeout=30)
        finally:
            producer.close()
        port, first_pid = broker.port, broker.pid
        broker.stop()
        assert not pid_alive(first_pid)
        broker.start()
        assert broker.port == port

        consumer = KafkaConsumer(
            topic,
            bootstrap_servers=broker.bootstrap,
            auto_offset_reset="earliest",
            consumer_timeout_ms=20000,
        )
        try:
            record = next(consumer)
        finally:
            consumer.close()
        assert (record.key, record.value) == (b"k", b"kept")


@pytest.mark.parametrize("taken", ["client", "controller"])
def test_kafka_broker_whose_port_was_taken_before_it_bound_starts_on_new_ports(
    monkeypatch: pytest.MonkeyPatch, taken: str
) -> None:
    """`free_port` found a port free, then another socket's local end took it (bound,
    not listening, as a connection's is): the broker starts again on new ports, on the
    storage formatted for the first ones, and serves."""
    from kafka import KafkaConsumer, KafkaProducer

    holder = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    holder.bind(("127.0.0.1", 0))
    held = holder.getsockname()[1]
    real_free_port = local_kafka.free_port
    first_picks = iter([held] if taken == "client" else [real_free_port(), held])
    monkeypatch.setattr(local_kafka, "free_port", lambda: next(first_picks, 0) or real_free_port())
    topic = f"local-servers-{uuid.uuid4().hex}"
    try:
        with KafkaBroker() as broker:
            assert held not in (broker.port, broker._controller_port)
            assert "address already in use" in broker.log_file.read_text().lower()
            producer = KafkaProducer(bootstrap_servers=broker.bootstrap, acks="all")
            try:
                producer.send(topic, key=b"k", value=b"after a taken port").get(timeout=30)
            finally:
                producer.close()
            consumer = KafkaConsumer(topic, bootstrap_servers=broker.bootstrap,
                                     auto_offset_reset="earliest", consumer_timeout_ms=20000)
            try:
                record = next(consumer)
            finally:
                consumer.close()
            assert record.value == b"after a taken port"
    finally:
        holder.close()
