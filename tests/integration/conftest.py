"""Real servers for integration tests: one Kafka broker per session, anvil per test.

Everything binds 127.0.0.1 and is stopped by PID in a finally, even when a test fails.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from chainwatch.local.procs import free_port, spawn, stop_pid
from tests.cli import cli_with_stack_dumps
from tests.servers import anvil_fixture, kafka_fixture

kafka = kafka_fixture(scope="session", num_partitions=3)
anvil = anvil_fixture(no_mining=True)


def rpc(url: str, method: str, params: list[Any]) -> Any:
    body = json.dumps({"jsonrpc": "2.0", "id": 1, "method": method, "params": params}).encode()
    req = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=10) as resp:
        answer = json.loads(resp.read())
    if "error" in answer:
        raise RuntimeError(f"{method}: {answer['error']}")
    return answer["result"]


def metric(port: int, name: str, labels: dict[str, str] | None = None) -> float | None:
    """One sample from a chainwatch /metrics page, or None if absent/unreachable."""
    from prometheus_client.parser import text_string_to_metric_families

    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
            text = resp.read().decode()
    except OSError:
        return None
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(
                sample.labels.get(k) == v for k, v in (labels or {}).items()
            ):
                return float(sample.value)
    return None


def chain_view(port: int) -> list[dict[str, Any]]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/v1/chain", timeout=5) as resp:
        return json.loads(resp.read())


def wait_until(check: Callable[[], Any], timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(0.2)


class ChainwatchProcess:
    """A `chainwatch` CLI process with its output in a file (shown when a test fails)."""

    def __init__(
        self, args: list[str], log_dir: Path, name: str, env: dict[str, str] | None = None
    ) -> None:
        self.args = args
        self.env = env or {}
        self.log_path = log_dir / f"{name}.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> ChainwatchProcess:
        log = self.log_path.open("ab")
        env = {**os.environ, "CHAINWATCH_LOG_JSON": "true", "PYTHONUNBUFFERED": "1", **self.env}
        self.proc = spawn(cli_with_stack_dumps(*self.args),
                          stdout=log, stderr=subprocess.STDOUT, env=env)
        return self

    def kill9(self) -> None:
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait(timeout=10)
        stop_pid(self.proc.pid, timeout=1)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            stop_pid(self.proc.pid, timeout=10)

    def metrics_snapshot(self) -> str:
        """The process's chainwatch_* counters and gauges that say how far the data got
        (published, processed, lag, errors), or why they could not be read."""
        if "--metrics-port" not in self.args:
            return ""
        port = self.args[self.args.index("--metrics-port") + 1]
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2) as r:
                text = r.read().decode()
        except OSError as exc:
            return f"(metrics on :{port} unreadable: {exc})"
        wanted = ("chainwatch_collector_blocks_published", "chainwatch_collector_errors",
                  "chainwatch_collector_checkpoint", "chainwatch_events_processed",
                  "chainwatch_head_block_number", "chainwatch_consumer_lag",
                  "chainwatch_invalid_records", "chainwatch_processing_errors")
        return "\n".join(line for line in text.splitlines() if line.startswith(wanted))

    def dump_stacks(self) -> None:
        """Have the process write every thread's stack to its log, if it still runs."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGUSR1)
            time.sleep(0.5)

    def output(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""


@pytest.fixture
def chainwatch_procs(tmp_path: Path, request: pytest.FixtureRequest):
    started: list[ChainwatchProcess] = []

    def start(name: str, *args: str, env: dict[str, str] | None = None) -> ChainwatchProcess:
        proc = ChainwatchProcess(list(args), tmp_path, name, env).start()
        started.append(proc)
        return proc

    try:
        yield start
    finally:
        report = getattr(request.node, "rep_call", None)
        failed = report is not None and report.failed
        snapshots = {}
        for proc in started:
            if failed:
                snapshots[proc.log_path.name] = proc.metrics_snapshot()
                proc.dump_stacks()
            proc.stop()
        if failed:
            for proc in started:
                sys.stderr.write(f"\n--- {proc.log_path.name} ---\n{proc.output()[-12000:]}\n"
                                 f"--- its metrics when the test failed ---\n"
                                 f"{snapshots.get(proc.log_path.name, '')}\n")


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]):
    report = yield
    if report.when == "call":
        item.rep_call = report  # type: ignore[attr-defined]
    return report


__all__ = ["chain_view", "free_port", "metric", "rpc", "wait_until"]
