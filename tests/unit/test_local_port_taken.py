"""Local servers whose port, picked free, was taken before they bound it: geth and
Prometheus stand-ins (the real ones run in the integration tests) fail or start as a
plan says."""

from __future__ import annotations

import os
import sys
import urllib.request
from pathlib import Path

import pytest

from chainwatch.local.geth import GethNode
from chainwatch.local.procs import ServerStartError
from chainwatch.local.prometheus import PrometheusServer

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


_FAKE_PROMETHEUS = """#!{python}
import http.server, os, pathlib, sys
args = dict(a.lstrip("-").split("=", 1) for a in sys.argv[1:])
tries = pathlib.Path(args["config.file"]).parent / "tries"
n = int(tries.read_text()) if tries.exists() else 0
tries.write_text(str(n + 1))
plan = os.environ["FAKE_PROMETHEUS_PLAN"].split(",")
if plan[min(n, len(plan) - 1)] == "taken":
    print("err=\\"listen tcp 127.0.0.1:9090: bind: address already in use\\"")
    sys.exit(1)
host, port = args["web.listen-address"].rsplit(":", 1)


class Ready(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args):
        pass


http.server.HTTPServer((host, int(port)), Ready).serve_forever()
"""


@pytest.mark.parametrize(("plan", "starts"), [("taken,ok", True), ("taken", False)])
def test_prometheus_starts_on_another_port_when_its_own_was_taken(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, plan: str, starts: bool):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "prometheus").write_text(_FAKE_PROMETHEUS.format(python=sys.executable))
    (bin_dir / "prometheus").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("FAKE_PROMETHEUS_PLAN", plan)
    server = PrometheusServer()
    picked, tries = server.port, server.workdir / "tries"
    try:
        if starts:
            server.start(["127.0.0.1:1"], "groups: []\n")
            assert int(tries.read_text()) == 2 and server.port != picked
            with urllib.request.urlopen(server.url + "/-/ready", timeout=5) as ready:
                assert ready.status == 200  # answering on the port it now says
        else:
            with pytest.raises(ServerStartError, match="address already in use"):
                server.start(["127.0.0.1:1"], "groups: []\n")
            assert not server.workdir.exists()  # cleaned up after the last try
    finally:
        server.close()
