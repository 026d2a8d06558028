"""GethNode's start when a port it picked was taken meanwhile, with a stand-in for geth
(the real one runs in the integration tests): the start outcomes come from a plan."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

from chainwatch.local.geth import GethNode
from chainwatch.local.procs import ServerStartError

_FAKE_GETH = """#!{python}
import http.server, json, os, pathlib, sys
args = sys.argv[1:]
if "init" in args:
    sys.exit(0)
tries = pathlib.Path(args[args.index("--datadir") + 1]).parent / "tries"
n = int(tries.read_text()) if tries.exists() else 0
tries.write_text(str(n + 1))
plan = os.environ["FAKE_GETH_PLAN"].split(",")
outcome = plan[min(n, len(plan) - 1)]
if outcome == "taken":
    print("Fatal: Error starting protocol stack: listen tcp :30303: bind: address already in use")
    sys.exit(1)
if outcome == "broken":
    print("Fatal: Failed to read the genesis block")
    sys.exit(1)
port = int(args[args.index("--http.port") + 1])


class Answer(http.server.BaseHTTPRequestHandler):
    def do_POST(self):
        body = json.dumps({{"jsonrpc": "2.0", "id": 1, "result": {{"enode": "enode://x"}}}})
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body.encode())

    def log_message(self, *args):
        pass


http.server.HTTPServer(("127.0.0.1", port), Answer).serve_forever()
"""


@pytest.fixture
def fake_geth(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    binary = tmp_path / "geth"
    binary.write_text(_FAKE_GETH.format(python=sys.executable))
    binary.chmod(0o755)
    monkeypatch.setenv("CHAINWATCH_GETH_BIN", str(binary))

    def with_plan(plan: str) -> GethNode:
        monkeypatch.setenv("FAKE_GETH_PLAN", plan)
        return GethNode("fake", startup_timeout=20)

    return with_plan


def _ports(node: GethNode) -> tuple[int, int, int, int]:
    return node.p2p_port, node.http_port, node.ws_port, node.authrpc_port


def _tries(node: GethNode) -> int:
    return int((node.workdir / "tries").read_text())


def test_a_first_start_whose_port_was_taken_starts_on_other_ports(fake_geth):
    node = fake_geth("taken,taken,ok")
    picked = _ports(node)
    try:
        node.start()
        assert node.running and _tries(node) == 3
        assert _ports(node) != picked
        assert node.enode == "enode://x"  # answering on the port it now says
    finally:
        node.close()


def test_a_port_taken_three_times_or_another_failure_is_not_retried_past_that(fake_geth):
    for plan, tries in (("taken", 3), ("broken", 1)):
        node = fake_geth(plan)
        try:
            with pytest.raises(ServerStartError, match="did not start"):
                node.start()
            assert _tries(node) == tries and not node.running
        finally:
            node.close()


def test_a_restart_keeps_its_ports_even_when_one_is_taken(fake_geth):
    node = fake_geth("ok,taken")
    try:
        node.start()
        started = _ports(node)
        node.stop()
        with pytest.raises(ServerStartError, match="address already in use"):
            node.start()  # peers and collectors know these ports by now
        assert _ports(node) == started and _tries(node) == 2
    finally:
        node.close()
        assert not os.path.exists(node.workdir)
