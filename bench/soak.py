"""Soak: the distributed pipeline for minutes at several times mainnet rates.

    .venv/bin/python -m bench.soak [--minutes 10] [--tx-rate 120] [--block-time 1]
                                   [--interval 5] [--warmup-minutes 3] [--json FILE]

Starts a real Kafka broker and an anvil on 127.0.0.1 (tests/servers.py, as the integration
tests do), then `chainwatch collect` and `chainwatch detect` as processes, exactly as in
production. anvil mines a block every --block-time seconds (mainnet: 12 s) and the harness
sends --tx-rate pending transactions a second (mainnet: 15-20) from 50 senders; each block
includes what is pending, so blocks carry ~tx-rate x block-time transactions.

Every --interval seconds it samples the RSS and CPU of both processes and the detector
group's consumer lag (end offsets minus committed offsets over the topics it reads).
When the time is up it stops the traffic and mining, waits for the pipeline to drain,
reads every topic back from offset 0 and accounts for each block and transaction.

Verdict (printed at the end):
- RSS flat: after the warm-up (--warmup-minutes, default 5, or half of a shorter run: by
  then, at 1 block/s, the block model has made its first fit at 200 blocks, the collector
  remembers its full 256 recent blocks and the tx model has fitted after 2,000 txs), the
  highest RSS of each process is within 10% of its RSS at the end of the warm-up. The
  slope after the warm-up (MB/min) is printed beside it: bounded structures that are
  still filling (the detector's 200,000 event ids, 50,000 tx rows) show there.
- lag bounded: after the warm-up the lag never exceeds --lag-bound records (default: 30 s
  of the traffic) and it is 0 within 60 s of the traffic stopping.
- delivered == produced: every height on the blocks topic with the node's hash and seen
  once by the detector; every sent tx on the mempool topic, or inside a delivered block
  (announced after its block was delivered), or counted as dropped; the detector
  processed each distinct record exactly once.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
import uuid
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from bench.pipeline import machine_info, percentile, print_machine, print_table
from chainwatch.local.anvil import Anvil
from chainwatch.local.procs import free_port, spawn, stop_pid
from tests.servers import running_anvil, running_kafka

CHAIN = "31337"
NODE = "soak"
SENDERS = 50


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# -- the node and its traffic --------------------------------------------------------------


def batch_rpc(url: str, calls: list[tuple[str, list[Any]]], timeout: float = 30) -> list[Any]:
    body = json.dumps([{"jsonrpc": "2.0", "id": i, "method": m, "params": p}
                       for i, (m, p) in enumerate(calls)]).encode()
    request = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=timeout) as response:
        return sorted(json.loads(response.read()), key=lambda r: r["id"])


def rpc(url: str, method: str, params: list[Any]) -> Any:
    [answer] = batch_rpc(url, [(method, params)])
    if "error" in answer:
        raise RuntimeError(f"{method}: {answer['error']}")
    return answer["result"]


class Traffic(threading.Thread):
    """`rate` pending transactions a second, in ten batches a second, round-robin senders."""

    def __init__(self, node: Anvil, rate: float) -> None:
        super().__init__(daemon=True, name="traffic")
        self.url = node.http_url
        self.rate = rate
        self.accounts: list[str] = rpc(self.url, "eth_accounts", [])
        self.sent: list[str] = []
        self.rejected = 0
        self.halt = threading.Event()

    def run(self) -> None:
        tick, i, carry = 0.1, 0, 0.0
        next_at = time.monotonic()
        while not self.halt.is_set():
            carry += self.rate * tick
            calls = []
            while carry >= 1:
                carry -= 1
                sender = self.accounts[i % len(self.accounts)]
                i += 1
                calls.append(("eth_sendTransaction", [{"from": sender, "to": sender,
                                                       "value": "0x1"}]))
            with contextlib.suppress(OSError):
                for answer in batch_rpc(self.url, calls) if calls else []:
                    if "result" in answer:
                        self.sent.append(answer["result"])
                    else:
                        self.rejected += 1
            next_at += tick
            self.halt.wait(max(0.0, next_at - time.monotonic()))


# -- measuring -------------------------------------------------------------------------------


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def metric(port: int, name: str, labels: dict[str, str]) -> float | None:
    from prometheus_client.parser import text_string_to_metric_families

    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
            text = resp.read().decode()
    except OSError:
        return None
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                return float(s.value)
    return None


class Lag:
    """The detector group's lag: end offsets minus committed offsets, summed."""

    def __init__(self, bootstrap: str, group: str, topics: list[str]) -> None:
        from kafka import KafkaAdminClient, KafkaConsumer

        self.group = group
        self.topics = topics
        self.admin = KafkaAdminClient(bootstrap_servers=[bootstrap])
        self.consumer = KafkaConsumer(bootstrap_servers=[bootstrap], enable_auto_commit=False)

    def __call__(self) -> int | None:
        from kafka import TopicPartition

        try:
            tps = [TopicPartition(t, p) for t in self.topics
                   for p in self.consumer.partitions_for_topic(t) or ()]
            ends = self.consumer.end_offsets(tps)
            done = self.admin.list_group_offsets({self.group: None})[self.group]
        except Exception:  # a sample is skipped, never the run
            return None
        return sum(max(end - (done[tp].offset if tp in done else 0), 0)
                   for tp, end in ends.items())

    def close(self) -> None:
        self.admin.close()
        self.consumer.close()


@dataclass
class Sample:
    t: float  # s since traffic started
    collect_rss_mb: float
    detect_rss_mb: float
    collect_cpu_pct: float
    detect_cpu_pct: float
    lag: int | None
    node_head: int
    detector_head: int | None
    txs_sent: int


# -- reading everything back -----------------------------------------------------------------


def read_topic(bootstrap: str, topic: str) -> list[dict[str, Any]]:
    """Every message of `topic` (JSON records), offset 0 to the current end."""
    from kafka import KafkaConsumer, TopicPartition

    consumer = KafkaConsumer(bootstrap_servers=[bootstrap], enable_auto_commit=False,
                             max_poll_records=5000)
    try:
        tps = [TopicPartition(topic, p) for p in consumer.partitions_for_topic(topic) or ()]
        consumer.assign(tps)
        consumer.seek_to_beginning(*tps)
        ends = consumer.end_offsets(tps)
        out: list[dict[str, Any]] = []
        while any(consumer.position(tp) < ends[tp] for tp in tps):
            for tp, messages in consumer.poll(timeout_ms=1000).items():
                out += [json.loads(m.value) for m in messages if m.offset < ends[tp]]
        return out
    finally:
        consumer.close()


def account(bootstrap: str, prefix: str, node: Anvil, sent: list[str], detect_port: int,
            collect_drops: dict[str, float]) -> dict[str, Any]:
    """Produced vs delivered, from the topics and the detector's counters."""
    blocks = read_topic(bootstrap, f"{prefix}.blocks")
    mempool = read_topic(bootstrap, f"{prefix}.mempool")
    head = int(rpc(node.http_url, "eth_blockNumber", []), 16)
    canonical: dict[int, str] = {}
    for first in range(0, head + 1, 200):
        calls = [("eth_getBlockByNumber", [hex(n), False])
                 for n in range(first, min(first + 200, head + 1))]
        for n, answer in zip(range(first, head + 1), batch_rpc(node.http_url, calls),
                             strict=False):
            canonical[n] = answer["result"]["hash"]
    delivered: dict[int, set[str]] = {}
    in_blocks: set[str] = set()
    for r in blocks:
        if r["type"] == "block":
            delivered.setdefault(r["number"], set()).add(r["hash"])
            in_blocks.update(t["hash"] for t in r["transactions"])
    missing_heights = [n for n, h in canonical.items() if h not in delivered.get(n, set())]
    pending = {r["hash"] for r in mempool if r["type"] == "pending_tx"}
    sent_set = set(sent)
    late = sent_set - pending
    unaccounted = late - in_blocks
    copies: Counter[str] = Counter()
    ids: dict[str, set[str]] = {}
    for r in blocks + mempool:
        copies[r["type"]] += 1
        ids.setdefault(r["type"], set()).add(r["event_id"])
    per_type = {}
    for t in sorted(copies):
        seen = metric(detect_port, "chainwatch_events_processed_total", {"type": t}) or 0
        dups = metric(detect_port, "chainwatch_duplicate_events_total", {"type": t}) or 0
        per_type[t] = {"copies": copies[t], "distinct": len(ids[t]),
                       "processed": int(seen), "duplicates_seen": int(dups)}
    observed = metric(detect_port, "chainwatch_blocks_observed_total",
                      {"chain_id": CHAIN, "node": NODE})
    return {
        "heights_produced": head + 1,
        "heights_delivered": head + 1 - len(missing_heights),
        "missing_heights": missing_heights[:20],
        "blocks_observed_by_detector": observed,
        "txs_sent": len(sent_set),
        "txs_pending_on_topic": len(pending & sent_set),
        "txs_only_in_blocks": len(late & in_blocks),
        "txs_unaccounted": len(unaccounted),
        "dropped_counted": collect_drops,
        "per_type": per_type,
    }


# -- the run ---------------------------------------------------------------------------------


def chainwatch(args: list[str], log_path: Path, env: dict[str, str]) -> subprocess.Popen[Any]:
    with log_path.open("ab") as out:
        return spawn([sys.executable, "-m", "chainwatch.cli", *args], stdout=out,
                     stderr=subprocess.STDOUT, env={**os.environ, **env})


def wait(check: Any, timeout: float, what: str) -> float:
    """Seconds until `check()` is true; raises after `timeout`."""
    started = time.monotonic()
    while not check():
        if time.monotonic() - started > timeout:
            raise TimeoutError(f"gave up after {timeout:.0f} s waiting for {what}")
        time.sleep(1)
    return time.monotonic() - started


def soak(args: argparse.Namespace) -> dict[str, Any]:
    workdir = Path(tempfile.mkdtemp(prefix="chainwatch-soak-"))
    prefix, group = f"soak{uuid.uuid4().hex[:6]}", f"soak-{uuid.uuid4().hex[:6]}"
    detect_port, collect_port = free_port(), free_port()
    servers = contextlib.ExitStack()  # closed after the processes: anvil, then Kafka
    procs: dict[str, subprocess.Popen[Any]] = {}
    traffic: Traffic | None = None
    lag: Lag | None = None
    samples: list[Sample] = []
    try:
        log(f"starting Kafka and anvil (work dir {workdir})")
        broker = servers.enter_context(running_kafka(num_partitions=1))
        node = servers.enter_context(running_anvil(block_time=args.block_time,
                                                   extra_args=["--accounts", str(SENDERS)]))
        env = {"CHAINWATCH_LOG_JSON": "true", "PYTHONUNBUFFERED": "1"}
        common = ["--kafka", broker.bootstrap, "--topic-prefix", prefix,
                  "--metrics-host", "127.0.0.1"]
        procs["detect"] = chainwatch(["detect", *common, "--group", group, "--metrics-port",
                                      str(detect_port)], workdir / "detect.log", env)
        procs["collect"] = chainwatch(
            ["collect", "--rpc", node.http_url, "--ws", node.ws_url, "--node", NODE,
             "--state-dir", str(workdir / "state"), "--start-block", "0",
             "--expected-block-time", str(args.block_time), *common,
             "--metrics-port", str(collect_port)], workdir / "collect.log", env)
        wait(lambda: metric(detect_port, "chainwatch_head_block_number",
                            {"chain_id": CHAIN, "node": NODE}) is not None, 120,
             "the detector to see the first block")
        lag = Lag(broker.bootstrap, group, [f"{prefix}.{t}" for t in ("blocks", "mempool",
                                                                         "peers")])
        traffic = Traffic(node, args.tx_rate)
        traffic.start()
        started = time.monotonic()
        end = started + args.minutes * 60
        cpu_before = {k: (cpu_seconds(p.pid), started) for k, p in procs.items()}
        log(f"traffic: {args.tx_rate:g} tx/s, a block every {args.block_time:g} s, "
            f"for {args.minutes:g} min")
        while time.monotonic() < end:
            time.sleep(min(args.interval, max(end - time.monotonic(), 0)))
            now = time.monotonic()
            for name, p in procs.items():
                if p.poll() is not None:
                    raise RuntimeError(f"chainwatch {name} exited with {p.returncode}")
            cpu = {}
            for k, p in procs.items():
                used, at = cpu_seconds(p.pid), now
                cpu[k] = 100 * (used - cpu_before[k][0]) / max(at - cpu_before[k][1], 1e-9)
                cpu_before[k] = (used, at)
            head = metric(detect_port, "chainwatch_head_block_number",
                          {"chain_id": CHAIN, "node": NODE})
            samples.append(Sample(
                t=round(now - started, 1),
                collect_rss_mb=round(rss_mb(procs["collect"].pid), 1),
                detect_rss_mb=round(rss_mb(procs["detect"].pid), 1),
                collect_cpu_pct=round(cpu["collect"], 1), detect_cpu_pct=round(cpu["detect"], 1),
                lag=lag(), node_head=int(rpc(node.http_url, "eth_blockNumber", []), 16),
                detector_head=None if head is None else int(head), txs_sent=len(traffic.sent),
            ))
            s = samples[-1]
            log(f"t={s.t:6.0f}s  rss collect {s.collect_rss_mb:6.1f} MB  detect "
                f"{s.detect_rss_mb:6.1f} MB  lag {s.lag}  head {s.node_head}/{s.detector_head}"
                f"  txs {s.txs_sent}")

        traffic.halt.set()
        traffic.join(timeout=30)
        rpc(node.http_url, "evm_setIntervalMining", [0])  # the chain stops where it is
        rpc(node.http_url, "evm_mine", [])  # one last block with what is still pending
        head = int(rpc(node.http_url, "eth_blockNumber", []), 16)
        drain_s = wait(lambda: lag() == 0 and metric(
            detect_port, "chainwatch_head_block_number", {"chain_id": CHAIN, "node": NODE})
            == head, 120, "the pipeline to drain")
        drops = {t: metric(collect_port, "chainwatch_collector_records_dropped_total",
                           {"chain_id": CHAIN, "node": NODE, "type": t, "reason": "outbox_full"})
                 or 0.0 for t in ("pending_tx", "tx_lifecycle", "mempool_snapshot")}
        stop_pid(procs.pop("collect").pid)  # no more heartbeats or snapshots
        wait(lambda: lag() == 0, 60, "the detector to consume the collector's last records")
        log("reading every topic back for the accounting")
        accounting = account(broker.bootstrap, prefix, node, traffic.sent, detect_port, drops)
        return {"args": vars(args), "samples": [asdict(s) for s in samples],
                "drain_seconds": round(drain_s, 1), "accounting": accounting,
                "rejected_txs": traffic.rejected,
                "records_per_s": round(sum(v["copies"] for v in accounting["per_type"].values())
                                       / (args.minutes * 60), 1)}
    finally:
        if traffic is not None:
            traffic.halt.set()
        if lag is not None:
            lag.close()
        for p in procs.values():
            stop_pid(p.pid)
        servers.close()
        log(f"logs kept in {workdir}")


# -- the verdict -----------------------------------------------------------------------------


def verdict(result: dict[str, Any], warmup_s: float, lag_bound: int) -> list[tuple[str, str]]:
    samples = [s for s in result["samples"] if s["t"] >= warmup_s]
    rows: list[tuple[str, str]] = []
    ok = True
    if not samples:
        return [("verdict", f"FAIL: no sample after the {warmup_s:.0f} s warm-up")]
    for proc in ("collect", "detect"):
        base = samples[0][f"{proc}_rss_mb"]
        top = max(s[f"{proc}_rss_mb"] for s in samples)
        last = samples[-1][f"{proc}_rss_mb"]
        flat = top <= base * 1.10
        ok &= flat
        slope = rss_slope([(s["t"], s[f"{proc}_rss_mb"]) for s in samples])
        rows.append((f"RSS {proc}", f"{'PASS' if flat else 'FAIL'}: {base:.1f} MB at the end "
                     f"of warm-up, max {top:.1f} (+{100 * (top / base - 1):.1f}%), "
                     f"last {last:.1f} MB; slope {slope:+.2f} MB/min after warm-up"))
    lags = [s["lag"] for s in samples if s["lag"] is not None]
    bounded = bool(lags) and max(lags) <= lag_bound and result["drain_seconds"] <= 60
    ok &= bounded
    rows.append(("consumer lag", f"{'PASS' if bounded else 'FAIL'}: p50 {percentile(lags, 50)}, "
                 f"p95 {percentile(lags, 95)}, max {max(lags) if lags else 'n/a'} records "
                 f"(bound {lag_bound}); drained {result['drain_seconds']} s after traffic stopped"))
    a = result["accounting"]
    blocks_ok = (a["heights_delivered"] == a["heights_produced"]
                 == a["blocks_observed_by_detector"])
    dropped = int(sum(a["dropped_counted"].values()))
    # a tx neither on the mempool topic nor in a delivered block must be a counted drop
    txs_ok = a["txs_unaccounted"] <= a["dropped_counted"].get("pending_tx", 0)
    once = all(v["processed"] == v["distinct"] for v in a["per_type"].values())
    ok &= blocks_ok and txs_ok and once
    rows.append(("blocks", f"{'PASS' if blocks_ok else 'FAIL'}: {a['heights_produced']} "
                 f"produced, {a['heights_delivered']} on the topic with the node's hash, "
                 f"{a['blocks_observed_by_detector']:.0f} observed by the detector"))
    rows.append(("pending txs", f"{'PASS' if txs_ok else 'FAIL'}: {a['txs_sent']} sent, "
                 f"{a['txs_pending_on_topic']} on the mempool topic, {a['txs_only_in_blocks']} "
                 f"only in delivered blocks, {dropped} dropped (counted), "
                 f"{a['txs_unaccounted']} unaccounted"))
    rows.append(("detector", f"{'PASS' if once else 'FAIL'}: each distinct record processed "
                 "once: " + ", ".join(f"{t} {v['processed']}/{v['distinct']}"
                                      f" (+{v['copies'] - v['distinct']} copies)"
                                      for t, v in a["per_type"].items())))
    rows.append(("verdict", "PASS" if ok else "FAIL"))
    return rows


def filling_note(args: argparse.Namespace) -> str:
    """When the run ends before the big bounded structures are full (RSS still rising)."""
    collector = 256 * args.block_time  # the mempool tracker's memory of recent blocks
    detector = 200_000 / max(args.tx_rate, 1e-9)  # its 200,000-entry maps of tx hashes
    return (f"collector: its 256 remembered blocks fill after {collector / 60:.1f} min; "
            f"detector: its 200,000-entry tx-hash maps (dedupe ids, pending txs, fee ranks, "
            f"inclusions) fill after {detector / 60:.0f} min at {args.tx_rate:g} tx/s; RSS "
            f"rises until then")


def rss_slope(points: list[tuple[float, float]]) -> float:
    """Least-squares slope of (seconds, MB) points, in MB per minute."""
    if len(points) < 2:
        return 0.0
    mean_t = sum(t for t, _ in points) / len(points)
    mean_m = sum(m for _, m in points) / len(points)
    var = sum((t - mean_t) ** 2 for t, _ in points)
    cov = sum((t - mean_t) * (m - mean_m) for t, m in points)
    return 60 * cov / var if var else 0.0


def print_samples(samples: list[dict[str, Any]], rows: int = 25) -> None:
    step = max(1, -(-len(samples) // rows))
    shown = samples[::step] + ([samples[-1]] if (len(samples) - 1) % step else [])
    print("\n== samples ==")
    print(f"  {'t (s)':>7}  {'collect MB':>10}  {'detect MB':>9}  {'collect %cpu':>12}  "
          f"{'detect %cpu':>11}  {'lag':>6}  {'head':>5}  {'det.':>5}  {'txs sent':>8}")
    for s in shown:
        print(f"  {s['t']:7.0f}  {s['collect_rss_mb']:10.1f}  {s['detect_rss_mb']:9.1f}  "
              f"{s['collect_cpu_pct']:12.0f}  {s['detect_cpu_pct']:11.0f}  "
              f"{s['lag'] if s['lag'] is not None else '-':>6}  {s['node_head']:5d}  "
              f"{s['detector_head'] if s['detector_head'] is not None else '-':>5}  "
              f"{s['txs_sent']:8d}")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.soak", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=10.0, help="traffic duration")
    parser.add_argument("--tx-rate", type=float, default=120.0, help="pending txs per second")
    parser.add_argument("--block-time", type=float, default=1.0, help="seconds between blocks")
    parser.add_argument("--interval", type=float, default=5.0, help="seconds between samples")
    parser.add_argument("--warmup-minutes", type=float, default=None,
                        help="excluded from the RSS and lag verdicts (default: 5, or half of "
                        "a shorter run)")
    parser.add_argument("--lag-bound", type=int, default=None,
                        help="records (default: 30 s of the traffic: 2 per tx + blocks)")
    parser.add_argument("--json", type=Path, default=None, help="write every sample and figure")
    args = parser.parse_args(argv)
    if args.minutes <= 0 or args.tx_rate < 0 or args.block_time <= 0 or args.interval <= 0:
        parser.error("--minutes, --block-time and --interval must be positive")
    warmup = (args.warmup_minutes if args.warmup_minutes is not None
              else min(5.0, 0.5 * args.minutes)) * 60
    lag_bound = args.lag_bound or int(30 * (2 * args.tx_rate + 1 / args.block_time))

    info = machine_info()
    print_machine(info)
    result = soak(args)
    print_samples(result["samples"])
    a = result["accounting"]
    print_table("run", [
        ("traffic", f"{args.tx_rate:g} tx/s, a block every {args.block_time:g} s, "
                    f"{args.minutes:g} min ({result['rejected_txs']} txs rejected by anvil)"),
        ("records on the topics", f"{result['records_per_s']} /s"),
        ("warm-up", f"first {warmup:.0f} s excluded from the RSS and lag verdicts"),
        ("bounded memory", filling_note(args)),
        ("per type", ", ".join(f"{t}: {v['copies']} copies, {v['distinct']} distinct, "
                                f"{v['processed']} processed, {v['duplicates_seen']} duplicates"
                                for t, v in a["per_type"].items())),
    ])
    rows = verdict(result, warmup, lag_bound)
    print_table("verdict", rows)
    if args.json is not None:
        args.json.write_text(json.dumps({"machine": info, **result, "verdict": dict(rows)},
                                        indent=1, default=str))
    return 0 if rows[-1][1] == "PASS" else 1


if __name__ == "__main__":
    sys.exit(main())
