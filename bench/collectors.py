"""Collector benchmarks on real servers: mempool flood throughput and CPU per followed node.

    .venv/bin/python -m bench.collectors mempool [--txs 20000] [--rate 0] [--profile]
    .venv/bin/python -m bench.collectors nodes   [--nodes 10] [--seconds 60] [--modes collect,run]
    .venv/bin/python -m bench.collectors all     [--json]

mempool: a real Kafka broker, a real anvil (`--no-mining`, so the pool only grows) and a
real `chainwatch collect` process (the CLI, in a subprocess). N EIP-1559 transfers from
many funded accounts are signed first (timed apart), then submitted as fast as possible
(or at `--rate` tx/s) in JSON-RPC batches of eth_sendRawTransaction. Measured: the
generator's submission rate, the rate at which pending_tx records reach
`<prefix>.mempool` (broker LogAppendTime: the topic is created with it before the
collector starts), the time until all N are there, which of the N hashes are missing,
and the CPU of every process involved (from /proc/<pid>/stat).

nodes: 10 anvils with `--block-time 1` and a light load (`--tx-rate` tx/s each), one
`chainwatch collect` following them all through a `--nodes` file (ws, mempool on) into a
real Kafka; after `--warmup` seconds, its CPU seconds over `--seconds`, its RSS, blocks
published and the collector lag, read from its /metrics. Then the same with
`chainwatch run` (collector and detector in one process, embedded bus).

Also printed: the cost of one txpool_content reconciliation over the full pool (the
collector does one every 30 s while subscribed), measured in this process with the
collector's own code. Options: `--rate` paces the generator; `--burst` stops the
collector (SIGSTOP) while the node is flooded and continues it after, so it drains a
backlog with the node idle (its own ceiling); `--witness` adds a second raw subscriber
that tells node-side from collector-side loss; `--sign-cache DIR` keeps the signed
transactions between runs (signing 20,000 takes about a minute on 2 cores).

`--profile` attaches py-spy (if installed) to the chainwatch process during the
measurement and prints where its CPU goes; figures from a profiled run carry py-spy's
sampling overhead, so take the figures from a run without it.
Everything binds 127.0.0.1, every wait has a timeout, every server is stopped by PID.
See docs/performance.md ("Collectors") for the figures and what they mean.
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
import uuid
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any

from chainwatch.local.anvil import Anvil, anvil_binary
from chainwatch.local.kafka import KafkaBroker
from chainwatch.local.procs import LOCALHOST, free_port, spawn, stop_pid, wait_for_port

Result = dict[str, Any]
CHAIN_ID = 31337  # anvil's default
GWEI = 10**9
CLK_TCK = os.sysconf("SC_CLK_TCK")


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# -- machine and process facts ---------------------------------------------------------


def machine_info() -> Result:
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
                mem_gb = round(int(line.split()[1]) / 1024 / 1024, 1)

    def version(pkg: str) -> str:
        try:
            return metadata.version(pkg)
        except metadata.PackageNotFoundError:
            return "-"

    anvil = "-"
    with contextlib.suppress(OSError, subprocess.SubprocessError, FileNotFoundError):
        out = subprocess.run([str(anvil_binary()), "--version"], capture_output=True,
                             text=True, timeout=10).stdout
        anvil = out.splitlines()[0].replace("anvil Version: ", "") if out else "-"
    return {
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "cpu": cpu,
        "cores": os.cpu_count() or 0,
        "memory_gb": mem_gb,
        "python": platform.python_version(),
        "os": f"{platform.system()} {platform.release()}",
        "load_avg_1m_at_start": round(os.getloadavg()[0], 2),
        "versions": {p: version(p) for p in ("web3", "kafka-python", "pydantic", "websockets",
                                             "eth-account")} | {"anvil": anvil},
    }


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process (all its threads), in seconds."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    fields = stat.rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def memory_mb(pid: int) -> tuple[float, float]:
    """(VmRSS, VmHWM) in MiB."""
    rss = hwm = 0.0
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            rss = int(line.split()[1]) / 1024
        elif line.startswith("VmHWM:"):
            hwm = int(line.split()[1]) / 1024
    return rss, hwm


def machine_busy() -> tuple[float, float]:
    """(busy, total) jiffies of all cores since boot, from /proc/stat."""
    values = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    total = sum(values[:8])  # guest time is already counted in user
    idle = values[3] + values[4]
    return float(total - idle), float(total)


@dataclass
class Sample:
    at: float  # wall clock (comparable with the broker's LogAppendTime)
    cpu: dict[str, float]  # process role -> cpu seconds
    busy: float
    total: float


class Sampler:
    """Samples the CPU of named processes (and the whole machine) every `interval` s."""

    def __init__(self, pids: dict[str, list[int]], interval: float = 0.5) -> None:
        self.pids = pids
        self.interval = interval
        self.samples: list[Sample] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="sampler", daemon=True)

    def take(self) -> Sample:
        cpu: dict[str, float] = {}
        for role, pids in self.pids.items():
            total = 0.0
            for pid in pids:
                with contextlib.suppress(OSError, IndexError, ValueError):
                    total += cpu_seconds(pid)
            cpu[role] = total
        busy, total_j = machine_busy()
        return Sample(time.time(), cpu, busy, total_j)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.samples.append(self.take())
            self._stop.wait(self.interval)

    def __enter__(self) -> Sampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=10)
        self.samples.append(self.take())

    def window(self, start: float, end: float) -> tuple[Sample, Sample]:
        """The samples that bracket [start, end] most tightly (start at or before)."""
        before = [s for s in self.samples if s.at <= start] or self.samples[:1]
        after = [s for s in self.samples if s.at >= end] or self.samples[-1:]
        return before[-1], after[0]

    def cores(self, start: float, end: float) -> tuple[dict[str, float], float, float]:
        """Cores used per role over [start, end], machine busy share, and the real span."""
        a, b = self.window(start, end)
        span = max(b.at - a.at, 1e-9)
        cores = {role: (b.cpu[role] - a.cpu[role]) / span for role in a.cpu}
        busy = (b.busy - a.busy) / max(b.total - a.total, 1e-9)
        return cores, busy, span


# -- servers and chainwatch processes ----------------------------------------------------


def rpc(url: str, method: str, params: Sequence[Any] = (), timeout: float = 10.0) -> Any:
    body = json.dumps({"jsonrpc": "2.0", "id": 1, "method": method, "params": list(params)})
    request = urllib.request.Request(url, data=body.encode(),
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=timeout) as response:
        reply = json.loads(response.read())
    if "error" in reply:
        raise RuntimeError(f"{method}: {reply['error']}")
    return reply.get("result")


def scrape(port: int) -> dict[str, list[tuple[dict[str, str], float]]]:
    """All samples of a chainwatch /metrics page by name ({} when unreachable)."""
    from prometheus_client.parser import text_string_to_metric_families

    try:
        with urllib.request.urlopen(f"http://{LOCALHOST}:{port}/metrics", timeout=5) as resp:
            text = resp.read().decode()
    except OSError:
        return {}
    out: dict[str, list[tuple[dict[str, str], float]]] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out.setdefault(s.name, []).append((dict(s.labels), float(s.value)))
    return out


def metric_sum(page: dict[str, list[tuple[dict[str, str], float]]], name: str) -> float:
    return sum(v for _, v in page.get(name, []))


def metric_max(page: dict[str, list[tuple[dict[str, str], float]]], name: str) -> float | None:
    values = [v for _, v in page.get(name, [])]
    return max(values) if values else None


def ready(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://{LOCALHOST}:{port}/readyz", timeout=2) as resp:
            return resp.status == 200
    except OSError:
        return False


def wait_until(check: Callable[[], Any], timeout: float, what: str,
               proc: subprocess.Popen[bytes] | None = None, interval: float = 0.2) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process exited with code {proc.returncode} while waiting "
                               f"for {what}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(interval)


class Chainwatch:
    """A `chainwatch` CLI process (python -m chainwatch.cli ...), output to a log file."""

    def __init__(self, args: list[str], workdir: Path, name: str,
                 env: dict[str, str] | None = None) -> None:
        self.args = args
        self.log_path = workdir / f"{name}.log"
        self.env = env or {}
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> Chainwatch:
        env = {**os.environ, "CHAINWATCH_LOG_JSON": "true", "PYTHONUNBUFFERED": "1", **self.env}
        with self.log_path.open("ab") as out:
            self.proc = spawn([sys.executable, "-m", "chainwatch.cli", *self.args],
                              stdout=out, stderr=subprocess.STDOUT, env=env)
        return self

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            stop_pid(self.proc.pid, timeout=15)

    def tail(self, lines: int = 30) -> str:
        if not self.log_path.exists():
            return ""
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    def warnings(self) -> list[str]:
        """Distinct WARNING/ERROR messages it logged (JSON lines), node names folded."""
        seen: Counter[str] = Counter()
        if not self.log_path.exists():
            return []
        for line in self.log_path.read_text(errors="replace").splitlines():
            try:
                entry = json.loads(line)
            except ValueError:
                if "Traceback" in line or "Error" in line:
                    seen[line[:200]] += 1
                continue
            level = str(entry.get("level", "")).upper() if isinstance(entry, dict) else ""
            if level in ("WARNING", "ERROR"):
                text = f"{level} {entry.get('msg', entry.get('message'))} " + " ".join(
                    f"{k}={entry[k]}" for k in ("kind", "error", "detector", "severity")
                    if k in entry)
                node = str(entry.get("node", ""))
                if node:
                    text = text.replace(f"'{node}'", "'<node>'")
                seen[text[:300]] += 1
        return [f"{text} (x{n})" if n > 1 else text for text, n in seen.items()]


class PySpy:
    """py-spy record on a PID (raw collapsed stacks), stopped with SIGINT by PID.

    --gil: only samples of the thread holding the GIL, i.e. the Python work that competes
    for the one core a CPython process can use (idle waits are not counted).
    """

    def __init__(self, pid: int, out: Path, rate: int = 100) -> None:
        self.out = out
        exe = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
        self.available = Path(exe).is_file()
        self.proc: subprocess.Popen[bytes] | None = None
        self.cmd = [exe, "record", "--pid", str(pid), "--rate", str(rate), "--format", "raw",
                    "--output", str(out), "--nonblocking", "--gil"]

    def __enter__(self) -> PySpy:
        if self.available:
            with self.out.with_suffix(".stderr").open("wb") as err:
                self.proc = subprocess.Popen(self.cmd, stdout=subprocess.DEVNULL, stderr=err,
                                             start_new_session=True)
        else:
            log("py-spy not found: no profile (pip install py-spy into the venv)")
        return self

    def __exit__(self, *exc: object) -> None:
        if self.proc is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.proc.pid, signal.SIGINT)
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            stop_pid(self.proc.pid, timeout=5)

    def report(self, top: int = 18) -> Result:
        if not self.out.exists():
            errors = self.out.with_suffix(".stderr")
            err = errors.read_text(errors="replace")[-300:] if errors.exists() else ""
            return {"error": f"no py-spy output {err}".strip()} if self.available else {}
        return summarize_stacks(self.out.read_text(errors="replace"), top)


_CATEGORIES = (  # a sample goes to the innermost frame that matches; first key wins
    ("websockets", "websockets (frames, socket reads)"),
    ("/Crypto/", "web3 (provider, request processor, formatters)"),  # keccak: checksums
    ("/eth_hash/", "web3 (provider, request processor, formatters)"),
    ("/web3/", "web3 (provider, request processor, formatters)"),
    ("/eth_utils/", "web3 (provider, request processor, formatters)"),
    ("/hexbytes/", "web3 (provider, request processor, formatters)"),
    ("/eth_abi/", "web3 (provider, request processor, formatters)"),
    ("/kafka/", "kafka-python (producer, protocol)"),
    ("/pydantic", "pydantic (records, validation, JSON encoding)"),
    ("/aiohttp/", "aiohttp (HTTP JSON-RPC)"),
    ("/json/", "json (stdlib)"),
    ("/asyncio/", "asyncio (event loop)"),
    ("/selectors.py", "asyncio (event loop)"),
    ("/prometheus_client/", "prometheus_client"),
    ("/collector/", "chainwatch collector code"),
    ("/chainwatch/", "chainwatch core"),
    ("/detector/", "chainwatch detector"),
    ("/polars/", "detector libraries (polars, numpy, sklearn, pyod)"),
    ("/numpy/", "detector libraries (polars, numpy, sklearn, pyod)"),
    ("/sklearn/", "detector libraries (polars, numpy, sklearn, pyod)"),
    ("/pyod/", "detector libraries (polars, numpy, sklearn, pyod)"),
    ("/threading.py", "threads (to_thread, locks)"),
    ("/concurrent/", "threads (to_thread, locks)"),
    ("/queue.py", "threads (to_thread, locks)"),
    ("/socket.py", "sockets (stdlib)"),
    ("/ssl.py", "sockets (stdlib)"),
    ("/logging/", "logging"),
)


def _frame_name(frame: str) -> tuple[str, str]:
    """'func (path/to/file.py:123)' -> ('func (file.py)', path)."""
    func, _, where = frame.partition(" (")
    path = where.rstrip(")").rsplit(":", 1)[0]
    short = "/".join(Path(path).parts[-2:]) if path else "?"
    return f"{func} ({short})", path


def summarize_stacks(raw: str, top: int) -> Result:
    """Self time by library and inclusive time by function from py-spy's collapsed stacks."""
    total = 0
    by_category: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    leaf: Counter[str] = Counter()
    for line in raw.splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        frames = [f for f in stack.split(";") if f.strip()]
        if not frames:
            continue
        total += count
        names = [_frame_name(f) for f in frames]
        leaf[names[-1][0]] += count
        category = "other"
        for _, path in reversed(names):  # innermost first: abc, typing... count for caller
            found = next((c for key, c in _CATEGORIES if key in "/" + path), None)
            if found is not None:
                category = found
                break
        by_category[category] += count
        for name in {n for n, _ in names}:
            inclusive[name] += count
    if not total:
        return {"samples": 0}

    def pct(counter: Counter[str], n: int) -> list[tuple[str, float]]:
        return [(k, round(100 * v / total, 1)) for k, v in counter.most_common(n)]

    wanted = ("collector/", "chainwatch/", "detector/", "web3/", "kafka/", "websockets/",
              "pydantic", "aiohttp/")
    skip = ("chainwatch/cli.py", "chainwatch/bootstrap.py")  # the whole process: no news
    ours = Counter({k: v for k, v in inclusive.items()
                    if any(w in k for w in wanted) and not any(x in k for x in skip)})
    return {
        "samples": total,
        "by_library": pct(by_category, 20),
        "self_by_function": pct(leaf, top),
        "inclusive_by_function": pct(ours, top),
    }


@contextlib.contextmanager
def kafka_broker() -> Iterator[KafkaBroker]:
    broker = KafkaBroker(num_partitions=1)
    try:
        log("starting Kafka broker ...")
        broker.start()
        yield broker
    finally:
        broker.close()


def create_topic(bootstrap: str, topic: str, configs: dict[str, str]) -> None:
    from kafka import KafkaAdminClient

    admin = KafkaAdminClient(bootstrap_servers=[bootstrap], request_timeout_ms=10_000)
    try:
        admin.create_topics({topic: {"num_partitions": 1, "replication_factor": 1,
                                     "configs": configs}}, wait_for_metadata=True)
    finally:
        admin.close()


# -- mempool: one node flooded by a load generator ---------------------------------------


def bench_keys(count: int, salt: str) -> list[str]:
    from eth_utils import keccak

    return ["0x" + keccak(f"chainwatch-bench-{salt}-{i}".encode()).hex() for i in range(count)]


def _sign_account(key: str, nonces: int, chain_id: int) -> list[tuple[str, str]]:
    """Sign `nonces` transfers (nonce 0..n-1) from one key: [(hash, raw), ...]."""
    from eth_account import Account

    account = Account.from_key(key)
    out: list[tuple[str, str]] = []
    for nonce in range(nonces):
        signed = account.sign_transaction({
            "type": 2, "chainId": chain_id, "nonce": nonce, "to": account.address,
            "value": 1, "gas": 21_000, "maxFeePerGas": 100 * GWEI,
            "maxPriorityFeePerGas": GWEI + nonce % 7,
        })
        out.append(("0x" + bytes(signed.hash).hex(), "0x" + bytes(signed.raw_transaction).hex()))
    return out


@dataclass
class Signed:
    by_account: list[list[tuple[str, str]]]  # per account, in nonce order
    addresses: list[str]
    seconds: float
    workers: int

    @property
    def count(self) -> int:
        return sum(len(txs) for txs in self.by_account)


def sign_all(keys: list[str], txs: int, workers: int, cache: Path | None = None) -> Signed:
    """Sign in `workers` processes; with `cache`, reuse transactions signed before (the
    keys, nonces and chain are deterministic, and every run starts a fresh anvil)."""
    from eth_account import Account

    addresses = [Account.from_key(k).address for k in keys]
    path = cache / f"signed-{len(keys)}-{txs}-{CHAIN_ID}.json" if cache is not None else None
    if path is not None and path.exists():
        started = time.perf_counter()
        by_account = [[(h, r) for h, r in a] for a in json.loads(path.read_text())]
        return Signed(by_account, addresses, time.perf_counter() - started, 0)
    per = [txs // len(keys) + (1 if i < txs % len(keys) else 0) for i in range(len(keys))]
    started = time.perf_counter()
    with ProcessPoolExecutor(max_workers=workers) as pool:
        futures = [pool.submit(_sign_account, k, n, CHAIN_ID) for k, n in zip(keys, per,
                                                                             strict=True)]
        by_account = [f.result(timeout=1800) for f in futures]
    seconds = time.perf_counter() - started
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(by_account))
    return Signed(by_account, addresses, seconds, workers)


Batch = list[tuple[str, str]]  # (hash, raw)


def thread_batches(signed: Signed, threads: int, batch: int) -> list[list[Batch]]:
    """Per thread, its batches of txs. Each account belongs to one thread and its txs
    go in nonce order (nonce-major across the thread's accounts), so every tx is
    executable when it arrives and the node announces it at once."""
    out: list[list[Batch]] = []
    for t in range(threads):
        accounts = signed.by_account[t::threads]
        ordered: Batch = []
        depth = max((len(a) for a in accounts), default=0)
        for nonce in range(depth):
            ordered.extend(a[nonce] for a in accounts if nonce < len(a))
        out.append([ordered[i:i + batch] for i in range(0, len(ordered), batch)])
    return out


@dataclass
class SubmitStats:
    started: float = 0.0
    ended: float = 0.0
    sent: int = 0
    errors: int = 0
    first_error: str | None = None
    progress: list[tuple[float, int]] = field(default_factory=list)  # (time, sent so far)
    accepted_at: dict[str, float] = field(default_factory=dict)  # hash -> node answered
    resumed: float = 0.0  # --burst: when the stopped collector was continued
    lock: threading.Lock = field(default_factory=threading.Lock)


def submit(port: int, batches: list[Batch], stats: SubmitStats, rate_share: float,
           t0: float, timeout: float) -> None:
    """Send batches of eth_sendRawTransaction over one keep-alive HTTP connection."""
    conn = http.client.HTTPConnection(LOCALHOST, port, timeout=timeout)
    sent_here = 0
    try:
        for batch in batches:
            if rate_share > 0:  # paced: this thread's share of the target rate
                due = t0 + sent_here / rate_share
                delay = due - time.time()
                if delay > 0:
                    time.sleep(delay)
            body = json.dumps([
                {"jsonrpc": "2.0", "id": i, "method": "eth_sendRawTransaction", "params": [raw]}
                for i, (_, raw) in enumerate(batch)
            ])
            conn.request("POST", "/", body=body, headers={"Content-Type": "application/json"})
            replies = json.loads(conn.getresponse().read())
            answered = time.time()
            if not isinstance(replies, list):
                replies = [replies]
            bad = [r for r in replies if "error" in r]
            ok = {r.get("id") for r in replies if "error" not in r}
            sent_here += len(batch)
            with stats.lock:
                stats.sent += len(ok)
                stats.errors += len(batch) - len(ok)
                stats.progress.append((answered, stats.sent + stats.errors))
                stats.accepted_at.update((h, answered) for i, (h, _) in enumerate(batch)
                                         if i in ok)
                if bad and stats.first_error is None:
                    stats.first_error = json.dumps(bad[0].get("error", bad[0]))[:200]
    finally:
        conn.close()


def _witness(ws_url: str, out: str, ready: Any, stop: Any, timeout: float) -> None:
    """A second subscriber in its own process: records every pending tx the node
    announces (full objects, like chainwatch), to tell node-side from collector-side loss."""
    from websockets.sync.client import connect

    hashes: list[str] = []
    deadline = time.monotonic() + timeout
    with connect(ws_url, max_size=None, open_timeout=10) as ws:
        ws.send(json.dumps({"jsonrpc": "2.0", "id": 1, "method": "eth_subscribe",
                            "params": ["newPendingTransactions", True]}))
        ws.recv(timeout=10)
        ready.set()
        while not stop.is_set() and time.monotonic() < deadline:
            try:
                message = json.loads(ws.recv(timeout=0.5))
            except TimeoutError:
                continue
            res = message.get("params", {}).get("result")
            hashes.append(str(res.get("hash") if isinstance(res, dict) else res).lower())
    Path(out).write_text("\n".join(hashes))


class Witness:
    def __init__(self, ws_url: str, out: Path, timeout: float) -> None:
        import multiprocessing

        ctx = multiprocessing.get_context("spawn")
        self.out = out
        self.ready, self.stop = ctx.Event(), ctx.Event()
        self.proc = ctx.Process(target=_witness, name="witness",
                                args=(ws_url, str(out), self.ready, self.stop, timeout))

    def __enter__(self) -> Witness:
        self.proc.start()
        if not self.ready.wait(30):
            raise TimeoutError("the witness subscriber did not connect within 30 s")
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.proc.join(timeout=20)
        if self.proc.is_alive() and self.proc.pid is not None:
            stop_pid(self.proc.pid, timeout=5)

    def hashes(self) -> set[str]:
        return set(self.out.read_text().split()) if self.out.exists() else set()


class MempoolWatch:
    """Reads `<prefix>.mempool`: end offsets while the flood runs, then every record."""

    def __init__(self, bootstrap: str, topic: str) -> None:
        from kafka import KafkaConsumer, TopicPartition

        self.topic = topic
        self.consumer = KafkaConsumer(bootstrap_servers=[bootstrap], enable_auto_commit=False,
                                      group_id=None, consumer_timeout_ms=1000,
                                      request_timeout_ms=15_000,
                                      fetch_max_bytes=32 * 1024 * 1024)
        parts = self.consumer.partitions_for_topic(topic) or {0}
        self.tps = [TopicPartition(topic, p) for p in sorted(parts)]
        self.consumer.assign(self.tps)
        self.consumer.seek_to_beginning(*self.tps)
        self.arrivals: dict[str, float] = {}  # pending tx hash -> broker append time (s)
        self.duplicates = 0
        self.other_types: Counter[str] = Counter()

    def end_offset(self) -> float:
        try:
            return float(sum(self.consumer.end_offsets(self.tps).values()))
        except Exception:  # a progress figure only
            return -1.0

    def read_available(self, max_seconds: float = 5.0) -> int:
        """Consume what is there now (bounded); returns records read."""
        read = 0
        deadline = time.monotonic() + max_seconds
        while time.monotonic() < deadline:
            batches = self.consumer.poll(timeout_ms=300, max_records=5000)
            if not batches:
                break
            for records in batches.values():
                for r in records:
                    read += 1
                    self._record(r.value, r.timestamp / 1000.0)
        return read

    def _record(self, value: bytes, at: float) -> None:
        try:
            entry = json.loads(value)
        except ValueError:
            self.other_types["undecodable"] += 1
            return
        kind = entry.get("type", "?") if isinstance(entry, dict) else "?"
        if kind != "pending_tx":
            self.other_types[kind] += 1
            return
        tx_hash = str(entry.get("hash", "")).lower()
        if tx_hash in self.arrivals:
            self.duplicates += 1
        else:
            self.arrivals[tx_hash] = at

    def close(self) -> None:
        self.consumer.close()


def run_mempool(args: argparse.Namespace) -> Result:
    accounts = max(1, args.accounts)
    keys = bench_keys(accounts + 1, salt=str(args.txs))  # the last one sends the probe
    workers = args.sign_workers or os.cpu_count() or 1
    log(f"signing {args.txs} EIP-1559 transfers from {accounts} accounts "
        f"({workers} processes) ...")
    signed = sign_all(keys[:-1], args.txs, workers, args.sign_cache)
    probe_hash, probe_raw = _sign_account(keys[-1], 1, CHAIN_ID)[0]
    log(f"signed {signed.count} in {signed.seconds:.1f}s")
    batches = thread_batches(signed, args.threads, args.batch)
    signed_hashes = {h for txs in signed.by_account for h, _ in txs}

    workdir = Path(tempfile.mkdtemp(prefix="chainwatch-bench-"))
    prefix = f"b{uuid.uuid4().hex[:10]}"
    topic = f"{prefix}.mempool"
    result: Result = {
        "txs": signed.count, "accounts": accounts, "threads": args.threads,
        "batch": args.batch, "target_rate": args.rate or None,
        "signing_seconds": round(signed.seconds, 2),
        "signing_tx_per_s": round(signed.count / signed.seconds),
        "signing_workers": signed.workers,
    }
    anvil_proc: subprocess.Popen[bytes] | None = None
    cw: Chainwatch | None = None
    watch: MempoolWatch | None = None
    try:
        with kafka_broker() as broker:
            # anvil with --quiet: its per-request log lines would cost it CPU on a flood;
            # --quiet hides "Listening on", so the port is chosen here (loopback, racy)
            port = free_port()
            log_file = (workdir / "anvil.log").open("wb")
            anvil_proc = spawn([str(anvil_binary()), "--host", LOCALHOST, "--port", str(port),
                                "--no-mining", "--quiet"], stdout=log_file,
                               stderr=subprocess.STDOUT)
            log_file.close()
            wait_for_port(LOCALHOST, port, 30, proc=anvil_proc)
            http_url, ws_url = f"http://{LOCALHOST}:{port}", f"ws://{LOCALHOST}:{port}"
            from eth_account import Account

            funded = [*signed.addresses, Account.from_key(keys[-1]).address]
            for address in funded:
                rpc(http_url, "anvil_setBalance", [address, hex(10**21)])
            create_topic(broker.bootstrap, topic, {"message.timestamp.type": "LogAppendTime"})

            metrics_port = free_port()
            cw = Chainwatch(
                ["collect", "--rpc", http_url, "--ws", ws_url, "--node", "flood",
                 "--kafka", broker.bootstrap, "--topic-prefix", prefix,
                 "--metrics-port", str(metrics_port), "--metrics-host", LOCALHOST,
                 "--state-dir", str(workdir / "state")],
                workdir, "collect").start()
            assert cw.proc is not None
            wait_until(lambda: ready(metrics_port), 60, "collect /readyz", proc=cw.proc)
            time.sleep(3)  # the newPendingTransactions subscription connects
            watch = MempoolWatch(broker.bootstrap, topic)
            rpc(http_url, "eth_sendRawTransaction", [probe_raw])

            def probe_seen() -> bool:
                assert watch is not None
                watch.read_available(1.0)
                return probe_hash in watch.arrivals

            wait_until(probe_seen, 30, "the probe transaction in Kafka", proc=cw.proc)
            watch.arrivals.pop(probe_hash)
            log("collector live (probe transaction arrived); flooding ...")

            pids = {"collect": [cw.pid], "anvil": [anvil_proc.pid], "kafka": [broker.pid],
                    "generator (this process)": [os.getpid()]}
            stats = SubmitStats()
            profile = PySpy(cw.pid, workdir / "mempool.pyspy.txt") if args.profile else None
            witness = (Witness(ws_url, workdir / "witness.txt", args.timeout * 2)
                       if args.witness else None)
            with Sampler(pids, 0.25) as sampler, \
                    profile or contextlib.nullcontext(), witness or contextlib.nullcontext():
                if args.burst:  # the collector reads nothing until every tx is in the node
                    os.kill(cw.pid, signal.SIGSTOP)
                stats.started = time.time()
                share = args.rate / args.threads if args.rate else 0.0
                threads = [threading.Thread(target=submit, name=f"submit-{i}",
                                            args=(port, b, stats, share, stats.started, 60.0))
                           for i, b in enumerate(batches)]
                for t in threads:
                    t.start()
                for t in threads:
                    t.join(timeout=args.timeout)
                stats.ended = time.time()
                if args.burst:
                    time.sleep(1.0)  # the node finishes announcing
                    stats.resumed = time.time()
                    os.kill(cw.pid, signal.SIGCONT)
                log(f"submitted {stats.sent} ({stats.errors} rejected) in "
                    f"{stats.ended - stats.started:.1f}s; waiting for Kafka ...")
                wanted = set(stats.accepted_at)  # the loss check: what the node accepted
                result["not_submitted"] = len(signed_hashes - wanted) - stats.errors
                missing = _wait_for_arrivals(watch, wanted, args.timeout)
            tx_pool = rpc(http_url, "txpool_status")
            result.update(_mempool_figures(stats, watch, wanted, missing, sampler, tx_pool))
            cw.proc.send_signal(signal.SIGSTOP)  # keep the collector's own reconcile out
            try:
                result["reconcile"] = reconcile_cost(http_url)
            finally:
                cw.proc.send_signal(signal.SIGCONT)
            result["burst"] = bool(args.burst)
            if witness is not None:
                seen = witness.hashes()
                late = {h for h in wanted if h in watch.arrivals and h in stats.accepted_at
                        and watch.arrivals[h] - stats.accepted_at[h] > 10}
                result["witness"] = {
                    "announced_by_node": len(seen & wanted),
                    "not_announced": len(wanted - seen),
                    "late_or_missing_in_chainwatch": len(late | missing),
                    "of_those_announced_by_node": len((late | missing) & seen),
                }
            rss, hwm = memory_mb(cw.pid)
            result["collect_rss_mb"], result["collect_peak_rss_mb"] = round(rss), round(hwm)
            page = scrape(metrics_port)
            result["collector_errors"] = metric_sum(page, "chainwatch_collector_errors_total")
            result["collect_warnings"] = cw.warnings()[:10]
            if profile is not None:
                result["profile"] = profile.report()
    finally:
        if watch is not None:
            watch.close()
        if cw is not None:
            if args.burst and cw.proc is not None and cw.proc.poll() is None:
                os.kill(cw.pid, signal.SIGCONT)
            cw.stop()
        if anvil_proc is not None:
            stop_pid(anvil_proc.pid)
        if args.keep:
            log(f"kept {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    return result


def reconcile_cost(http_url: str) -> Result:
    """One txpool reconciliation as the collector does it every 30 s (MempoolCollector.
    _poll_txpool: txpool_content through NodeRpc, parse, map every entry, compare), run
    in this process against the full pool, with its wall and CPU time."""
    import asyncio

    from collector.mempool import MempoolTracker, map_pending_tx, parse_txpool_content
    from collector.rpc import NodeRpc

    async def once() -> Result:
        rpc_ = NodeRpc(http_url, node="reconcile", timeout=120)
        try:
            wall0, cpu0 = time.perf_counter(), time.process_time()
            raw = await rpc_.call("txpool_content", [])
            wall1, cpu1 = time.perf_counter(), time.process_time()
            pending, _ = parse_txpool_content(raw)
            tracker = MempoolTracker(CHAIN_ID, "reconcile", max_tracked=10**6)
            now = time.time()
            for tx in pending:
                tracker.on_pending(map_pending_tx(tx, chain_id=CHAIN_ID, node="reconcile",
                                                  first_seen_at=now))
            tracker.on_pool_contents({str(t.get("hash", "")).lower() for t in pending}, now)
            wall2, cpu2 = time.perf_counter(), time.process_time()
        finally:
            await rpc_.close()
        return {"pending": len(pending), "fetch_wall_s": round(wall1 - wall0, 2),
                "fetch_cpu_s": round(cpu1 - cpu0, 2), "map_cpu_s": round(cpu2 - cpu1, 2),
                "total_wall_s": round(wall2 - wall0, 2)}

    return asyncio.run(once())


def _wait_for_arrivals(watch: MempoolWatch, wanted: set[str], timeout: float) -> set[str]:
    """Read the topic until every submitted hash arrived, the log end stopped moving for
    30 s, or `timeout`; returns the missing hashes."""
    expected = len(wanted) + 1  # +1: the probe
    deadline = time.monotonic() + timeout
    last_end, last_change, last_log = -1.0, time.monotonic(), 0.0
    while time.monotonic() < deadline:
        now = time.monotonic()
        end = watch.end_offset()
        if end != last_end:
            last_end, last_change = end, now
        if now - last_log > 5:
            log(f"  {end:.0f} records in {watch.topic}")
            last_log = now
        if end >= expected or now - last_change > 10:  # cheap check before reading it all
            watch.read_available(10.0)
            if wanted <= watch.arrivals.keys():
                return set()
            if now - last_change > 30:
                break
        time.sleep(0.5)
    watch.read_available(10.0)
    return wanted - watch.arrivals.keys()


def _mempool_figures(stats: SubmitStats, watch: MempoolWatch, wanted: set[str],
                     missing: set[str], sampler: Sampler, tx_pool: Any) -> Result:
    arrived = [watch.arrivals[h] for h in wanted if h in watch.arrivals]
    arrived.sort()
    submit_s = stats.ended - stats.started
    out: Result = {
        "submitted": stats.sent,
        "rejected_by_node": stats.errors,
        "first_rejection": stats.first_error,
        "submit_seconds": round(submit_s, 2),
        "generator_tx_per_s": round(stats.sent / submit_s) if submit_s > 0 else None,
        "arrived": len(arrived),
        "missing": len(missing),
        "missing_examples": sorted(missing)[:5],
        "duplicates": watch.duplicates,
        "other_records": dict(watch.other_types),
        "node_pool": tx_pool,
    }
    if len(arrived) < 2:
        return out
    first, last = arrived[0], arrived[-1]
    out["kafka_first_after_submit_start_s"] = round(first - stats.started, 2)
    out["kafka_all_after_submit_start_s"] = round(last - stats.started, 2)
    out["kafka_last_after_submit_end_s"] = round(last - stats.ended, 2)
    out["collector_tx_per_s"] = round((len(arrived) - 1) / max(last - first, 1e-9))
    out["end_to_end_tx_per_s"] = round(len(arrived) / max(last - stats.started, 1e-9))
    # the best 5 s of delivery: what the collector sustains once it has a backlog
    window = min(5.0, last - first)
    best, j = 0, 0
    for i, t in enumerate(arrived):
        while arrived[j] < t - window:
            j += 1
        best = max(best, i - j + 1)
    out["collector_best_5s_tx_per_s"] = round(best / max(window, 1e-9))
    start = stats.resumed or stats.started  # --burst: the collector ran from `resumed`
    if stats.resumed:
        out["kafka_all_after_resume_s"] = round(last - stats.resumed, 2)
        out["collector_tx_per_s_after_resume"] = round(len(arrived) / max(last - start, 1e-9))
    cores, busy, span = sampler.cores(start, last)
    out["cpu_window_s"] = round(span, 2)
    out["cores"] = {k: round(v, 2) for k, v in cores.items()}
    out["cores"]["everything else on the machine"] = round(
        max(busy * (os.cpu_count() or 1) - sum(cores.values()), 0.0), 2)
    out["machine_busy_ratio"] = round(busy, 2)
    # collector CPU while the node was still being flooded vs. afterwards (draining)
    if last > stats.ended + 1:
        drain, _, dspan = sampler.cores(stats.ended, last)
        out["cores_after_submit_end"] = {k: round(v, 2) for k, v in drain.items()}
        out["drain_window_s"] = round(dspan, 2)
    # per transaction: node accepted it (batch answered) -> record appended in Kafka
    delays = sorted(watch.arrivals[h] - stats.accepted_at[h]
                    for h in wanted if h in watch.arrivals and h in stats.accepted_at)
    if delays:
        def q(p: float) -> float:
            return round(delays[min(int(p * len(delays)), len(delays) - 1)], 2)

        out["delay_s"] = {"p50": q(0.5), "p90": q(0.9), "p99": q(0.99),
                          "max": round(delays[-1], 2)}
        # the subscription delivers within seconds; a tx it never delivered shows up only
        # with the txpool_content reconciliation (every 30 s by default)
        out["late_over_10s"] = sum(1 for d in delays if d > 10)
    out["timeline"] = _timeline(stats, arrived, sampler)
    return out


def _timeline(stats: SubmitStats, arrived: list[float], sampler: Sampler,
              step: float = 1.0) -> list[dict[str, float]]:
    """Per `step` seconds from submit start: tx submitted, tx arrived in Kafka, cores."""
    rows: list[dict[str, float]] = []
    t = stats.started
    sent = stats.progress
    while t < arrived[-1]:
        end = t + step
        cores, _, _ = sampler.cores(t, end)
        before = max((n for at, n in sent if at < t), default=0)
        upto = max((n for at, n in sent if at < end), default=0)
        rows.append({
            "t": round(t - stats.started, 1),
            "submitted": upto - before,
            "in_kafka": sum(1 for a in arrived if t <= a < end),
            "collect_cores": round(cores.get("collect", 0.0), 2),
            "anvil_cores": round(cores.get("anvil", 0.0), 2),
        })
        t = end
    return rows


# -- nodes: 10 nodes at one block per second -----------------------------------------------


class LightLoad:
    """`rate` eth_sendTransaction per second to every node (anvil's unlocked dev account)."""

    def __init__(self, nodes: list[Anvil], rate: float) -> None:
        self.nodes = nodes
        self.rate = rate
        self.sent = self.errors = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="light-load", daemon=True)

    def _run(self) -> None:
        senders = [rpc(n.http_url, "eth_accounts")[0] for n in self.nodes]
        interval = 1.0 / (self.rate * len(self.nodes))
        i = 0
        next_at = time.monotonic()
        while not self._stop.is_set():
            node, sender = self.nodes[i % len(self.nodes)], senders[i % len(self.nodes)]
            try:
                rpc(node.http_url, "eth_sendTransaction", [{
                    "from": sender, "to": sender, "value": "0x1",
                    "maxPriorityFeePerGas": hex(GWEI + i % 5), "maxFeePerGas": hex(100 * GWEI),
                }], timeout=5)
                self.sent += 1
            except (OSError, RuntimeError, ValueError):
                self.errors += 1
            i += 1
            next_at += interval
            self._stop.wait(max(next_at - time.monotonic(), 0))

    def __enter__(self) -> LightLoad:
        if self.rate > 0:
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=10)


def nodes_yaml(path: Path, nodes: list[Anvil], mempool: bool) -> Path:
    lines = ["nodes:"]
    for i, node in enumerate(nodes):
        lines += [f"  - name: anvil-{i}", f"    rpc: {node.http_url}", f"    ws: {node.ws_url}",
                  "    expected_block_time: 1", f"    mempool: {str(mempool).lower()}"]
    path.write_text("\n".join(lines) + "\n")
    return path


def measure_follower(mode: str, nodes: list[Anvil], broker: KafkaBroker | None,
                     args: argparse.Namespace, workdir: Path) -> Result:
    """One `chainwatch collect|run --nodes` process: warm-up, then CPU over args.seconds."""
    metrics_port = free_port()
    path = nodes_yaml(workdir / f"nodes-{mode}.yaml", nodes, mempool=not args.no_mempool)
    cmd = [mode, "--nodes", str(path), "--metrics-port", str(metrics_port),
           "--metrics-host", LOCALHOST, "--state-dir", str(workdir / f"state-{mode}")]
    if mode == "collect":
        assert broker is not None
        cmd += ["--kafka", broker.bootstrap, "--topic-prefix", f"b{uuid.uuid4().hex[:10]}"]
    else:
        cmd += ["--warmup-blocks", str(args.warmup_blocks)]
    cw = Chainwatch(cmd, workdir, mode).start()
    result: Result = {"mode": mode, "nodes": len(nodes), "command": "chainwatch " + " ".join(
        c if not c.startswith(str(workdir)) else "<tmp>" + c[len(str(workdir)):] for c in cmd)}
    try:
        assert cw.proc is not None
        published = "chainwatch_collector_blocks_published_total"

        def all_publishing() -> bool:
            page = scrape(metrics_port)
            return len([v for _, v in page.get(published, []) if v > 0]) >= len(nodes)

        wait_until(all_publishing, 90, f"{mode}: every node publishing blocks", proc=cw.proc,
                   interval=0.5)
        # `run`: past the first model fit (after --warmup-blocks blocks per chain), which
        # happens once and then every 1,000 blocks: the window shows the steady state
        warmup = args.warmup if mode == "collect" else max(args.warmup,
                                                             args.warmup_blocks + 10.0)
        result["warmup_s"] = warmup
        log(f"{mode}: all {len(nodes)} nodes publishing; warm-up {warmup:.0f}s ...")
        time.sleep(warmup)
        lag_max = 0.0
        pids = {mode: [cw.pid], "anvils": [n.pid for n in nodes]}
        if broker is not None:
            pids["kafka"] = [broker.pid]
        profile = PySpy(cw.pid, workdir / f"{mode}.pyspy.txt") if args.profile else None
        with Sampler(pids, 1.0) as sampler, profile or contextlib.nullcontext():
            page0, t0 = scrape(metrics_port), time.time()
            end = t0 + args.seconds
            while time.time() < end:
                if cw.proc.poll() is not None:
                    raise RuntimeError(f"{mode} exited during the measurement:\n{cw.tail()}")
                lag = metric_max(scrape(metrics_port), "chainwatch_collector_lag_blocks")
                lag_max = max(lag_max, lag or 0.0)
                time.sleep(min(2.0, max(end - time.time(), 0)))  # light: ~Prometheus
            page1, t1 = scrape(metrics_port), time.time()
        cores, busy, span = sampler.cores(t0, t1)
        rss, hwm = memory_mb(cw.pid)
        blocks = metric_sum(page1, published) - metric_sum(page0, published)
        result.update({
            "seconds": round(span, 1),
            "cores": round(cores[mode], 3),
            "cores_per_node": round(cores[mode] / len(nodes), 4),
            "cpu_seconds": round(cores[mode] * span, 1),
            "other_cores": {k: round(v, 2) for k, v in cores.items() if k != mode}
            | {"everything else": round(max(busy * (os.cpu_count() or 1)
                                            - sum(cores.values()), 0.0), 2)},
            "machine_busy_ratio": round(busy, 2),
            "rss_mb": round(rss), "peak_rss_mb": round(hwm),
            "blocks_published": int(blocks),
            "blocks_per_s": round(blocks / (t1 - t0), 2),
            "lag_blocks_max": lag_max,
            "lag_blocks_end": metric_max(page1, "chainwatch_collector_lag_blocks"),
            "pending_tx_arrivals": metric_sum(page1, "chainwatch_pending_tx_arrivals_total")
            - metric_sum(page0, "chainwatch_pending_tx_arrivals_total"),
            "collector_errors": metric_sum(page1, "chainwatch_collector_errors_total"),
            "warnings": cw.warnings()[:10],
        })
        if profile is not None:
            result["profile"] = profile.report()
        return result
    finally:
        cw.stop()


def run_nodes(args: argparse.Namespace) -> Result:
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    workdir = Path(tempfile.mkdtemp(prefix="chainwatch-bench-"))
    anvils: list[Anvil] = []
    out: Result = {"nodes": args.nodes, "tx_rate_per_node": args.tx_rate,
                   "warmup_s": args.warmup, "runs": []}
    try:
        with kafka_broker() as broker:
            log(f"starting {args.nodes} anvils (--block-time 1) ...")
            for i in range(args.nodes):
                node = Anvil()
                anvils.append(node)
                # a chain id each: independent anvils are not one chain, and on a shared
                # id the detector in `run` would see a chain split at every height
                node.start(block_time=1, chain_id=CHAIN_ID + 1 + i)
            with LightLoad(anvils, args.tx_rate) as load:
                for mode in modes:
                    out["runs"].append(measure_follower(
                        mode, anvils, broker if mode == "collect" else None, args, workdir))
                out["light_load_sent"], out["light_load_errors"] = load.sent, load.errors
    finally:
        for node in anvils:
            node.stop()
        if args.keep:
            log(f"kept {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    return out


# -- output ------------------------------------------------------------------------------


def table(title: str, rows: list[tuple[str, object]]) -> None:
    print(f"\n{title}")
    width = max((len(k) for k, _ in rows), default=0)
    for key, value in rows:
        print(f"  {key:<{width}}  {value}")


def fmt(value: object, unit: str = "") -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        text = f"{value:,.3f}".rstrip("0").rstrip(".") if abs(value) < 10 else f"{value:,.1f}"
    elif isinstance(value, int):
        text = f"{value:,}"
    else:
        text = str(value)
    return f"{text} {unit}".rstrip()


def print_machine(info: Result) -> None:
    table("machine", [
        ("date", info["date"]), ("cpu", info["cpu"]), ("cores", info["cores"]),
        ("memory", fmt(info["memory_gb"], "GiB")), ("python", info["python"]),
        ("os", info["os"]), ("load avg (1 min) at start", info["load_avg_1m_at_start"]),
        ("versions", ", ".join(f"{k} {v}" for k, v in info["versions"].items())),
    ])


def print_profile(profile: Result | None, who: str) -> None:
    if not profile:
        return
    if "error" in profile or not profile.get("samples"):
        print(f"\n{who} profile: {profile.get('error', 'no samples')}")
        return
    table(f"{who}: CPU samples by library of the innermost known frame (py-spy --gil, "
          f"{profile['samples']} samples)",
          [(k, f"{v:5.1f} %") for k, v in profile["by_library"]])
    table(f"{who}: hottest functions (self)",
          [(k[:90], f"{v:5.1f} %") for k, v in profile["self_by_function"]])
    table(f"{who}: inclusive time of chainwatch/library functions",
          [(k[:90], f"{v:5.1f} %") for k, v in profile["inclusive_by_function"]])


def print_mempool(r: Result) -> None:
    cores = r.get("cores", {})
    rate_ok = (r.get("collector_tx_per_s") or 0) >= 2000
    table("mempool flood: one `chainwatch collect`, one anvil (--no-mining), real Kafka", [
        ("transactions", fmt(r["txs"])
         + f" EIP-1559 transfers from {r['accounts']} accounts"),
        ("signing (untimed step)", f"{fmt(r['signing_seconds'], 's')} "
         f"({fmt(r['signing_tx_per_s'], 'tx/s')}, {r['signing_workers']} processes)"
         if r["signing_workers"] else "loaded from --sign-cache"),
        ("generator", f"{r['threads']} threads x batches of {r['batch']} "
         f"eth_sendRawTransaction" + (f", paced at {fmt(r['target_rate'], 'tx/s')}"
                                      if r.get("target_rate") else ", unpaced")),
        ("submitted / rejected", f"{fmt(r['submitted'])} / {fmt(r['rejected_by_node'])}"
         + (f" / {fmt(r['not_submitted'])} not sent (generator failed)"
            if r.get("not_submitted") else "")
         + (f" (first: {r['first_rejection']})" if r.get("first_rejection") else "")),
        ("generator rate", f"{fmt(r.get('generator_tx_per_s'), 'tx/s')} "
         f"(over {fmt(r['submit_seconds'], 's')})"),
        ("collector rate, first->last in Kafka", fmt(r.get("collector_tx_per_s"), "tx/s")
         + ("  (target >= 2,000: met)" if rate_ok else "  (target >= 2,000: MISSED)")),
        ("collector rate, best 5 s", fmt(r.get("collector_best_5s_tx_per_s"), "tx/s")),
        ("end to end (submit start -> last)", fmt(r.get("end_to_end_tx_per_s"), "tx/s")),
        *([("mode", "--burst: collector stopped while submitting, continued after"),
           ("all N in Kafka after the continue", fmt(r.get("kafka_all_after_resume_s"), "s")),
           ("collector rate after the continue",
            fmt(r.get("collector_tx_per_s_after_resume"), "tx/s"))] if r.get("burst") else []),
        ("first record in Kafka after", fmt(r.get("kafka_first_after_submit_start_s"), "s")),
        ("all N in Kafka after", fmt(r.get("kafka_all_after_submit_start_s"), "s")
         + f" (last one {fmt(r.get('kafka_last_after_submit_end_s'), 's')} after the "
         f"generator finished)"),
        ("arrived / missing / duplicates", f"{fmt(r['arrived'])} / {fmt(r['missing'])} / "
         f"{fmt(r['duplicates'])}"),
        ("delay accepted by node -> in Kafka", ", ".join(
            f"{k} {v} s" for k, v in r.get("delay_s", {}).items())),
        ("arrived > 10 s after acceptance", fmt(r.get("late_over_10s"))
         + " (not delivered by the subscription; found by the txpool reconciliation)"
         if r.get("late_over_10s") else fmt(r.get("late_over_10s"))),
        ("other records on the topic", r.get("other_records")),
        ("node pool at the end", r.get("node_pool")),
        ("CPU window (flood or continue -> last)", fmt(r.get("cpu_window_s"), "s")),
        *[(f"  cores: {k}", fmt(v)) for k, v in cores.items()],
        ("  machine busy", f"{fmt(round(100 * r.get('machine_busy_ratio', 0)))} % of "
         f"{os.cpu_count()} cores"),
        *[(f"  cores after submit end: {k}", fmt(v))
          for k, v in r.get("cores_after_submit_end", {}).items() if k == "collect"],
        ("collect RSS (end / peak)", f"{fmt(r.get('collect_rss_mb'), 'MiB')} / "
         f"{fmt(r.get('collect_peak_rss_mb'), 'MiB')}"),
        ("collector errors", fmt(r.get("collector_errors"))),
    ])
    if r.get("reconcile"):
        c = r["reconcile"]
        table("one txpool reconciliation (every 30 s while subscribed), on the full pool", [
            ("pending txs in txpool_content", fmt(c["pending"])),
            ("fetch (node builds + sends, NodeRpc decodes)",
             f"{fmt(c['fetch_wall_s'], 's')} wall, {fmt(c['fetch_cpu_s'], 's')} CPU"),
            ("map every entry + compare (blocks the event loop)", fmt(c["map_cpu_s"], "s CPU")),
            ("total wall", fmt(c["total_wall_s"], "s")),
        ])
    if r.get("witness"):
        print(f"  witness subscriber: {r['witness']}")
    if r.get("missing_examples"):
        print(f"  missing, e.g.: {', '.join(r['missing_examples'])}")
    for w in r.get("collect_warnings", []):
        print(f"  collect logged: {w}")
    if r.get("timeline"):
        print("\n  per second     submitted  in Kafka  collect cores  anvil cores")
        for row in r["timeline"]:
            print(f"  {row['t']:>5.0f} s     {row['submitted']:>9,.0f}  {row['in_kafka']:>8,.0f}"
                  f"  {row['collect_cores']:>13.2f}  {row['anvil_cores']:>11.2f}")
    print_profile(r.get("profile"), "collect (mempool flood)")


def print_nodes(r: Result) -> None:
    for run in r["runs"]:
        target = "met" if run["cores"] < 1 else "MISSED"
        table(f"{run['nodes']} nodes at 1 block/s: `chainwatch {run['mode']}` "
              f"({r['tx_rate_per_node']} tx/s per node, after {fmt(run['warmup_s'], 's')} "
              f"warm-up)", [
                  ("command", run["command"]),
                  ("window", fmt(run["seconds"], "s")),
                  ("CPU", f"{fmt(run['cpu_seconds'], 's')} = {fmt(run['cores'], 'cores')}"
                   f"  (target < 1 core: {target})"),
                  ("CPU per node", fmt(run["cores_per_node"], "cores")),
                  ("other processes", ", ".join(f"{k} {fmt(v)} cores"
                                               for k, v in run["other_cores"].items())),
                  ("machine busy", f"{fmt(round(100 * run['machine_busy_ratio']))} %"),
                  ("RSS (end / peak)", f"{fmt(run['rss_mb'], 'MiB')} / "
                   f"{fmt(run['peak_rss_mb'], 'MiB')}"),
                  ("blocks published", f"{fmt(run['blocks_published'])} "
                   f"({fmt(run['blocks_per_s'], '/s')})"),
                  ("collector lag (max / end)", f"{fmt(run['lag_blocks_max'], 'blocks')} / "
                   f"{fmt(run['lag_blocks_end'], 'blocks')}"),
                  ("pending tx arrivals (metric)", fmt(run["pending_tx_arrivals"])
                   if run["mode"] != "collect" else "- (a detector metric: not in collect)"),
                  ("collector errors", fmt(run["collector_errors"])),
              ])
        for w in run.get("warnings", []):
            print(f"  {run['mode']} logged: {w}")
        print_profile(run.get("profile"), f"{run['mode']} ({run['nodes']} nodes)")
    print(f"\n  light load: {r.get('light_load_sent')} tx sent, "
          f"{r.get('light_load_errors')} errors")


# -- CLI ---------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.collectors",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("what", choices=("mempool", "nodes", "all"))
    parser.add_argument("--json", action="store_true", help="also print one JSON line")
    parser.add_argument("--profile", action="store_true",
                        help="py-spy the chainwatch process during the measurement")
    parser.add_argument("--keep", action="store_true", help="keep the temp dir (logs)")
    g = parser.add_argument_group("mempool")
    g.add_argument("--txs", type=int, default=20_000)
    g.add_argument("--accounts", type=int, default=200)
    g.add_argument("--batch", type=int, default=200, help="transactions per JSON-RPC batch")
    g.add_argument("--threads", type=int, default=2, help="submitting threads")
    g.add_argument("--rate", type=float, default=0.0,
                   help="pace the generator at this many tx/s (0: as fast as possible)")
    g.add_argument("--sign-workers", type=int, default=0, help="signing processes (0: cores)")
    g.add_argument("--burst", action="store_true",
                   help="SIGSTOP the collector while submitting, SIGCONT after: it then "
                   "drains a backlog of N announcements (its own ceiling, node idle)")
    g.add_argument("--witness", action="store_true",
                   help="a second raw subscriber records what the node announced")
    g.add_argument("--sign-cache", type=Path, default=None,
                   help="directory to keep signed transactions in between runs")
    g.add_argument("--timeout", type=float, default=300.0,
                   help="longest wait for submission and for arrivals in Kafka (s)")
    g = parser.add_argument_group("nodes")
    g.add_argument("--nodes", type=int, default=10)
    g.add_argument("--seconds", type=float, default=60.0, help="measurement window")
    g.add_argument("--warmup", type=float, default=10.0, help="seconds before measuring")
    g.add_argument("--tx-rate", type=float, default=2.0, help="tx/s sent to each node")
    g.add_argument("--modes", default="collect,run", help="collect, run or both")
    g.add_argument("--warmup-blocks", type=int, default=20,
                   help="`run` only: blocks before the model fits (so scoring is measured)")
    g.add_argument("--no-mempool", action="store_true", help="nodes file with mempool: false")
    args = parser.parse_args(argv)

    info = machine_info()
    print_machine(info)
    result: Result = {"machine": info, "argv": sys.argv[1:]}
    if args.what in ("mempool", "all"):
        result["mempool"] = run_mempool(args)
        print_mempool(result["mempool"])
    if args.what in ("nodes", "all"):
        result["nodes"] = run_nodes(args)
        print_nodes(result["nodes"])
    if args.json:
        print(json.dumps(result, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
