"""`chainwatch demo`: a local anvil with traffic, a reorg and an odd block, watched live.

Runs the real embedded pipeline (`chainwatch run`) against a real anvil started here;
prints findings as they happen and a summary at the end, then stops everything.
"""

from __future__ import annotations

import json
import random
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable
from typing import Any

from chainwatch.bootstrap import Runtime, run_all
from chainwatch.exceptions import ChainwatchError, first_line
from chainwatch.local.anvil import Anvil
from chainwatch.local.procs import ServerStartError, free_port, port_open
from chainwatch.schema import Finding
from chainwatch.settings import load_settings

NODE = "anvil-demo"


def _rpc(url: str, method: str, params: list[Any]) -> Any:
    body = json.dumps({"jsonrpc": "2.0", "id": 1, "method": method, "params": params}).encode()
    req = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=10) as resp:
        answer = json.loads(resp.read())
    if "error" in answer:
        raise ChainwatchError(f"anvil refused {method}: {answer['error'].get('message')}")
    return answer["result"]


class Scenario(threading.Thread):
    """Transfers between the dev accounts, then a depth-3 reorg, then a 16 s mining stall."""

    def __init__(
        self, url: str, duration: float, say: Callable[[str], None], stop: threading.Event
    ) -> None:
        super().__init__(name="demo-traffic", daemon=True)
        self.url = url
        self.duration = duration
        self.say = say
        self.stop = stop
        self.rng = random.Random(7)
        self.sent = 0

    def run(self) -> None:
        accounts = _rpc(self.url, "eth_accounts", [])
        start = time.monotonic()
        plan = [
            (0.35 * self.duration, self._reorg),
            (0.55 * self.duration, self._stall),
        ]
        while not self.stop.wait(0.2):
            elapsed = time.monotonic() - start
            if plan and elapsed >= plan[0][0]:
                plan.pop(0)[1]()
            for _ in range(self.rng.randint(0, 3)):
                sender, receiver = self.rng.sample(accounts, 2)
                value = hex(self.rng.randint(10**15, 10**18))
                try:
                    _rpc(self.url, "eth_sendTransaction",
                         [{"from": sender, "to": receiver, "value": value}])
                    self.sent += 1
                except (ChainwatchError, OSError):
                    pass  # a dropped demo transfer is fine

    def _reorg(self) -> None:
        self.say("injecting a chain reorganisation of depth 3 (anvil_reorg)")
        _rpc(self.url, "anvil_reorg", [3, []])

    def _stall(self) -> None:
        self.say("pausing block production for 16 s (a stalled chain)")
        _rpc(self.url, "evm_setIntervalMining", [0])
        if not self.stop.wait(16):
            _rpc(self.url, "evm_setIntervalMining", [1])
            self.say("block production resumed")


def run_demo(duration: float = 60.0, metrics_port: int | None = None) -> None:
    if duration < 20:
        raise ChainwatchError("--duration must be at least 20 seconds for the scenario")
    port = metrics_port if metrics_port is not None else 9108
    if metrics_port is None and port_open("127.0.0.1", port):
        port = free_port()
    t0 = time.monotonic()

    def say(text: str) -> None:
        print(f"[{time.monotonic() - t0:5.1f}s] {text}", flush=True)

    def show(finding: Finding) -> None:
        say(f"FINDING {finding.severity.upper():8} {finding.detector}: {finding.summary}")

    node = Anvil()
    try:
        node.start(block_time=1)
    except (FileNotFoundError, ServerStartError) as exc:
        raise ChainwatchError(f"cannot start anvil: {first_line(exc)}") from None
    stop = threading.Event()
    scenario = Scenario(node.http_url, duration, say, stop)
    try:
        with tempfile.TemporaryDirectory(prefix="chainwatch-demo-") as state:
            settings = load_settings(
                rpc=node.http_url, ws=node.ws_url, node=NODE, metrics_host="127.0.0.1",
                metrics_port=port, state_dir=state, poll_interval=1.0,
                warmup_blocks=15, refit_every_blocks=20, start_block=0,
                log_level="ERROR", log_json=False,
            )

            def ready(rt: Runtime) -> None:
                say(f"anvil at {node.http_url}, one block per second")
                say(f"metrics at {rt.metrics_url} (also /healthz, /readyz, /api/v1/chain)")
                say(f"running for {duration:.0f}s; findings appear below as they happen")
                scenario.start()

            rt = run_all(settings, sinks=[show], duration=duration, on_ready=ready)
    finally:
        stop.set()
        node.stop()
    _summary(rt, scenario.sent, say)


def _summary(rt: Runtime, sent: int, say: Callable[[str], None]) -> None:
    reg = rt.metrics.registry
    labels = {"chain_id": "31337", "node": NODE}
    blocks = reg.get_sample_value("chainwatch_blocks_observed_total", labels) or 0
    reorgs = reg.get_sample_value("chainwatch_reorgs_total", labels) or 0
    head = reg.get_sample_value("chainwatch_head_block_number", labels) or 0
    findings = {
        f"{s.labels['detector']}/{s.labels['severity']}": int(s.value)
        for family in reg.collect()
        if family.name == "chainwatch_findings"
        for s in family.samples
        if s.name == "chainwatch_findings_total" and s.value
    }
    say(
        f"done: {sent} transfers sent, {int(blocks)} blocks observed up to #{int(head)}, "
        f"{int(reorgs)} reorg(s), findings {findings or 'none'}"
    )
