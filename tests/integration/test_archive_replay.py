"""`chainwatch archive` against the real broker: killed mid-way and restarted, every
message is archived exactly once; `chainwatch replay kafka://` gives the same findings as
replaying the archive directory, and reads only the offsets or times asked for."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path

import polars as pl
import pytest

from bench.synthetic import generate
from chainwatch.bus import Topics
from chainwatch.bus.kafka import KafkaBus, KafkaConfig
from chainwatch.local.kafka import KafkaBroker
from chainwatch.schema import PeerSnapshot, Reorg, encode
from replay.archive import CHECKPOINT

pytestmark = pytest.mark.integration


def _publish(kafka: KafkaBroker, prefix: str, blocks: int) -> int:
    """Blocks of two nodes (so two keys spread over partitions), a reorg, peer snapshots."""
    bus = KafkaBus(KafkaConfig(bootstrap_servers=kafka.bootstrap, partitions=3))
    topics = Topics(prefix)
    bus.ensure_topics(topics.all())
    sent = 0
    history = generate(blocks, 20, seed=5)
    for node in ("a", "b"):
        for b in history:
            block = b.model_copy(update={"node": node,
                                         "event_id": b.id_for(1, node, b.hash)})
            bus.publish(topics.blocks, block.stream_key(), encode(block))
            sent += 1
            if b.number % 50 == 0:
                peers = PeerSnapshot(chain_id=1, node=node, observed_at=b.observed_at + 0.5,
                                     event_id=PeerSnapshot.id_for(1, node, b.observed_at + 0.5),
                                     peer_count=25, detailed=False)
                bus.publish(topics.peers, peers.stream_key(), encode(peers))
                sent += 1
        reorg = Reorg(chain_id=1, node=node, observed_at=history[-1].observed_at + 1,
                      event_id=Reorg.id_for(1, node, "0xold", "0xnew"), old_head_number=5,
                      old_head_hash="0xold", new_head_number=5, new_head_hash="0xnew",
                      common_ancestor_number=2, depth=3)
        bus.publish(topics.blocks, reorg.stream_key(), encode(reorg))
        sent += 1
    bus.publish(topics.blocks, "1:a", b"not a record")  # poison: archived with its error
    sent += 1
    bus.flush()
    bus.close()
    return sent


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "chainwatch.cli", *args]


def _archived(out: Path) -> pl.DataFrame:
    return pl.read_parquet(sorted(out.glob("chain_id=*/day=*/*.parquet")))


def test_archive_killed_midway_resumes_without_duplicates(
    kafka: KafkaBroker, tmp_path: Path
) -> None:
    prefix = f"cw-{uuid.uuid4().hex[:8]}"
    sent = _publish(kafka, prefix, 1500)
    out = tmp_path / "archive"
    args = _cli("archive", "--kafka", kafka.bootstrap, "--topic-prefix", prefix, "--out", str(out),
                "--flush-records", "100", "--flush-seconds", "0.2")
    first = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 60
        progress = 0
        while time.monotonic() < deadline:
            if (out / CHECKPOINT).exists():
                try:
                    offsets = json.loads((out / CHECKPOINT).read_text())["next_offsets"]
                except ValueError:
                    continue
                progress = sum(offsets.values())
                if progress >= 300:
                    break
            time.sleep(0.01)
        first.kill()  # SIGKILL: no clean shutdown, possibly in the middle of a flush
        first.wait(timeout=10)
    finally:
        if first.poll() is None:
            first.kill()
    assert 0 < progress < sent, f"the first run was not stopped mid-way ({progress}/{sent})"

    second = subprocess.run([*args, "--until-end"], capture_output=True, text=True, timeout=120)
    assert second.returncode == 0, second.stderr[-2000:]
    rows = _archived(out)
    assert rows.height == sent
    assert rows.select("topic", "partition", "offset").is_unique().all()
    valid = rows.filter(pl.col("type") != "invalid")
    assert valid["event_id"].is_unique().all()
    assert set(valid["type"].unique()) == {"block", "reorg", "peer_snapshot"}
    poison = rows.filter(pl.col("type") == "invalid")
    assert poison.height == 1
    assert poison["error"][0].startswith(("undecodable record", "invalid record"))
    assert not list(out.rglob("*.tmp"))

    # a third run finds nothing new and writes nothing twice
    third = subprocess.run([*args, "--until-end"], capture_output=True, text=True, timeout=120)
    assert third.returncode == 0, third.stderr[-2000:]
    assert _archived(out).height == sent


def test_replay_of_kafka_source_matches_replay_of_archive(
    kafka: KafkaBroker, tmp_path: Path
) -> None:
    prefix = f"cw-{uuid.uuid4().hex[:8]}"
    _publish(kafka, prefix, 400)
    archive = tmp_path / "archive"
    done = subprocess.run(
        _cli("archive", "--kafka", kafka.bootstrap, "--topic-prefix", prefix, "--out",
             str(archive), "--until-end"),
        capture_output=True, text=True, timeout=120,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    results = {}
    emit_prefix = f"{prefix}-replayed"
    for name, source in (("kafka", f"kafka://{kafka.bootstrap}"), ("dir", str(archive))):
        out = tmp_path / name
        emit = ["--emit", kafka.bootstrap] if name == "dir" else []
        run = subprocess.run(
            _cli("replay", source, "--topic-prefix", prefix if name == "kafka" else emit_prefix,
                 "--out", str(out), "--no-progress", "--warmup-blocks", "50", *emit),
            capture_output=True, text=True, timeout=300,
        )
        assert run.returncode == 0, run.stderr[-2000:]
        assert "1 invalid rows skipped" in run.stdout, run.stdout
        results[name] = out
    kafka_findings = (results["kafka"] / "findings.jsonl").read_bytes()
    assert kafka_findings == (results["dir"] / "findings.jsonl").read_bytes()
    found = [json.loads(line) for line in kafka_findings.splitlines()]
    assert any(f["detector"] == "reorg_depth" for f in found)
    summary = json.loads((results["kafka"] / "summary.json").read_text())
    assert summary["records_by_type"]["block"] == 800

    # --emit re-published every finding, acknowledged, to the findings topic
    bus = KafkaBus(KafkaConfig(bootstrap_servers=kafka.bootstrap))
    consumer = bus.consumer([Topics(emit_prefix).findings], f"check-{uuid.uuid4().hex[:6]}")
    emitted: list[bytes] = []
    deadline = time.monotonic() + 30
    while len(emitted) < len(found) and time.monotonic() < deadline:
        emitted += [m.value for m in consumer.poll(1.0, 1000)]
    consumer.close()
    bus.close()
    assert sorted(emitted) == sorted(kafka_findings.splitlines())


def _replayed_blocks(kafka: KafkaBroker, prefix: str, out: Path, *bounds: str) -> list[int]:
    run = subprocess.run(
        _cli("replay", f"kafka://{kafka.bootstrap}", "--topic-prefix", prefix, "--out", str(out),
             "--no-progress", "--warmup-blocks", "50", *bounds),
        capture_output=True, text=True, timeout=300,
    )
    assert run.returncode == 0, run.stderr[-2000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["filtered_out"] == 0  # the range was applied at the broker, not after
    return [summary["first_block"], summary["last_block"], summary["records_by_type"]["block"]]


def test_replay_of_kafka_source_by_offsets_and_times(kafka: KafkaBroker, tmp_path: Path) -> None:
    """--from/--to as Kafka offsets and as times (offsets_for_times on the messages'
    timestamps) read only that part of the topic."""
    prefix = f"cw-{uuid.uuid4().hex[:8]}"
    bus = KafkaBus(KafkaConfig(bootstrap_servers=kafka.bootstrap, partitions=1))
    topics = Topics(prefix)
    bus.ensure_topics(topics.all())
    history = generate(400, 10, seed=3)
    for block in history[:200]:
        bus.publish(topics.blocks, block.stream_key(), encode(block))
    bus.flush()
    before = time.time()
    time.sleep(1.5)  # message timestamps are the producer's clock: a clear gap between halves
    after = time.time()
    for block in history[200:]:
        bus.publish(topics.blocks, block.stream_key(), encode(block))
    bus.flush()
    bus.close()
    mark = (before + after) / 2
    iso = datetime.fromtimestamp(mark, UTC).isoformat().replace("+00:00", "Z")

    assert _replayed_blocks(kafka, prefix, tmp_path / "o", "--from", "offset:50",
                            "--to", "offset:149") == [50, 149, 100]
    assert _replayed_blocks(kafka, prefix, tmp_path / "t1", "--from", iso) == [200, 399, 200]
    assert _replayed_blocks(kafka, prefix, tmp_path / "t2", "--to", f"@{mark:.3f}") == [
        0, 199, 200]

    def replay(*bounds: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            _cli("replay", f"kafka://{kafka.bootstrap}", "--topic-prefix", prefix,
                 "--no-progress", "--warmup-blocks", "50", *bounds),
            capture_output=True, text=True, timeout=300,
        )

    # offsets and block numbers together: the broker cuts, then the driver
    mixed = replay("--from", "offset:390", "--to", "395")
    assert mixed.returncode == 0, mixed.stderr[-2000:]
    assert "replayed 6 records (6 blocks" in mixed.stdout, mixed.stdout
    empty = replay("--from", "2100-01-01T00:00:00Z")  # after every message
    assert empty.returncode == 2 and empty.stderr.strip() == (
        "chainwatch: error: nothing to replay: the topics hold no message between --from "
        "and --to")


def test_archive_takes_up_partitions_added_while_it_runs(
    kafka: KafkaBroker, tmp_path: Path
) -> None:
    """The archive re-reads the topics' partitions every `refresh_seconds`: one added
    meanwhile is archived from its first message. (kafka-python answers partitions from
    its cached metadata, up to 5 min old: the refresh must fetch it anew.)"""
    from kafka import KafkaAdminClient, KafkaProducer
    from kafka.admin import NewPartitions

    from chainwatch.settings import Settings
    from replay.app import run_archive
    from replay.archive import ArchiveConfig

    prefix = f"cw-{uuid.uuid4().hex[:8]}"
    topics = Topics(prefix)
    bus = KafkaBus(KafkaConfig(bootstrap_servers=kafka.bootstrap, partitions=1))
    bus.ensure_topics(topics.all())
    first, second = generate(2, 1, seed=11)
    bus.publish(topics.blocks, first.stream_key(), encode(first))
    bus.flush()
    bus.close()
    out = tmp_path / "archive"
    config = ArchiveConfig(flush_seconds=0.2, refresh_seconds=1.0)
    archiving = threading.Thread(target=run_archive, args=(
        Settings(topic_prefix=prefix), kafka.bootstrap, out), kwargs={
        "duration": 12.0, "config": config, "echo": lambda _: None})
    archiving.start()
    try:
        deadline = time.monotonic() + 30
        while not list(out.glob("chain_id=*/day=*/*.parquet")) and time.monotonic() < deadline:
            time.sleep(0.1)  # the first block archived: the archive runs, on partition 0
        admin = KafkaAdminClient(bootstrap_servers=[kafka.bootstrap])
        try:
            admin.create_partitions({topics.blocks: NewPartitions(total_count=2)})
        finally:
            admin.close()
        producer = KafkaProducer(bootstrap_servers=[kafka.bootstrap])  # metadata anew
        try:
            producer.send(topics.blocks, encode(second), partition=1).get(timeout=10)
        finally:
            producer.close()
    finally:
        archiving.join(timeout=60)
    rows = _archived(out).filter(pl.col("topic") == topics.blocks).sort("partition")
    assert rows.select("partition", "event_id").rows() == [
        (0, first.event_id), (1, second.event_id)]
