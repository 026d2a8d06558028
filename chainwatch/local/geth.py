"""Real geth nodes on loopback, peered by hand: the only real source of peer data.

`--dev` turns p2p off, so these nodes run without it: every node is initialised from one
custom genesis, started with `--nodiscover` and `--netrestrict 127.0.0.0/8`, and peered
with `admin_addPeer`. Without a consensus client they make no blocks, but they peer.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
import time
import urllib.request
from pathlib import Path
from types import TracebackType
from typing import Any

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

ENV_BIN = "CHAINWATCH_GETH_BIN"
CHAIN_ID = 4242

GENESIS: dict[str, Any] = {
    "config": {
        "chainId": CHAIN_ID,
        **{
            f"{fork}Block": 0
            for fork in (
                "homestead",
                "eip150",
                "eip155",
                "eip158",
                "byzantium",
                "constantinople",
                "petersburg",
                "istanbul",
                "berlin",
                "london",
                "mergeNetsplit",
            )
        },
        "terminalTotalDifficulty": 0,
        "shanghaiTime": 0,
        "cancunTime": 0,
        "blobSchedule": {"cancun": {"target": 3, "max": 6, "baseFeeUpdateFraction": 3338477}},
    },
    "difficulty": "0x0",
    "gasLimit": "0x1c9c380",
    "timestamp": "0x0",
    "alloc": {},
}


def geth_binary() -> Path:
    override = os.environ.get(ENV_BIN)
    candidates = [Path(override)] if override else []
    candidates += [cache_dir() / "bin" / "geth", Path.home() / "go" / "bin" / "geth"]
    found = shutil.which("geth")
    if found:
        candidates.append(Path(found))
    for candidate in candidates:
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return candidate
    raise FileNotFoundError(
        "geth not found: run scripts/install-geth.sh (or set CHAINWATCH_GETH_BIN)"
    )


class GethNode:
    """One geth process with its own datadir and ports; start/stop/restart by PID."""

    def __init__(self, name: str = "geth", startup_timeout: float = 60.0) -> None:
        self.name = name
        self.startup_timeout = startup_timeout
        self.workdir = Path(tempfile.mkdtemp(prefix=f"chainwatch-{name}-"))
        self.datadir = self.workdir / "data"
        self._pick_ports()
        self._proc: subprocess.Popen[bytes] | None = None
        self._initialised = False
        self._started = False  # once started, its ports are known to others: kept

    def _pick_ports(self) -> None:
        self.p2p_port = free_port()
        self.http_port = free_port()
        self.ws_port = free_port()
        self.authrpc_port = free_port()

    @property
    def http_url(self) -> str:
        return f"http://{LOCALHOST}:{self.http_port}"

    @property
    def ws_url(self) -> str:
        return f"ws://{LOCALHOST}:{self.ws_port}"

    @property
    def pid(self) -> int:
        if self._proc is None:
            raise RuntimeError("geth is not running")
        return self._proc.pid

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def _init(self, binary: Path) -> None:
        genesis = self.workdir / "genesis.json"
        genesis.write_text(json.dumps(GENESIS))
        result = subprocess.run(
            [str(binary), "--datadir", str(self.datadir), "init", str(genesis)],
            capture_output=True,
            text=True,
            timeout=120,
        )
        if result.returncode != 0:
            raise ServerStartError(f"geth init failed:\n{result.stderr[-2000:]}")
        self._initialised = True

    def start(self) -> GethNode:
        """Start geth; on its first start, again on other ports if one was taken.

        `free_port` only finds a port free at that moment (CI saw geth stop with "bind:
        address already in use"). Before the first start nobody knows the ports, so
        others are picked; a restart keeps its ports, which collectors and peers know by
        then.
        """
        binary = geth_binary()
        if not self._initialised:
            self._init(binary)
        start_on_free_ports(lambda: self._start_once(binary), self._log,
                            None if self._started else self._pick_ports)
        self._started = True
        return self

    @property
    def _log(self) -> Path:
        return self.workdir / "geth.log"

    def _start_once(self, binary: Path) -> None:
        log = self._log.open("ab")
        self._proc = spawn(
            [
                binary,
                "--datadir",
                self.datadir,
                "--networkid",
                str(CHAIN_ID),
                "--nodiscover",
                "--nat",
                "none",
                "--netrestrict",
                "127.0.0.0/8",
                "--port",
                str(self.p2p_port),
                "--authrpc.addr",
                LOCALHOST,
                "--authrpc.port",
                str(self.authrpc_port),
                "--ipcdisable",
                "--http",
                "--http.addr",
                LOCALHOST,
                "--http.port",
                str(self.http_port),
                "--http.api",
                "admin,net,eth,txpool,web3",
                "--ws",
                "--ws.addr",
                LOCALHOST,
                "--ws.port",
                str(self.ws_port),
                "--ws.api",
                "eth,net,txpool",
                "--verbosity",
                "2",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        try:
            wait_for_port(LOCALHOST, self.http_port, self.startup_timeout, proc=self._proc)
            deadline = time.monotonic() + self.startup_timeout
            while True:  # the HTTP port opens a little before the APIs answer
                try:
                    self.rpc("admin_nodeInfo")
                    break
                except OSError:
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(0.2)
        except (TimeoutError, ServerStartError, OSError) as exc:
            self.stop()
            raise ServerStartError(
                f"geth {self.name} did not start: {exc}\n{self.tail()}"
            ) from None

    def stop(self) -> None:
        if self._proc is not None:
            stop_pid(self._proc.pid, timeout=20)
            self._proc = None

    def restart(self) -> GethNode:
        self.stop()
        return self.start()

    def close(self) -> None:
        self.stop()
        shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self) -> GethNode:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def tail(self, lines: int = 30) -> str:
        if not self._log.exists():
            return ""
        return "\n".join(self._log.read_text(errors="replace").splitlines()[-lines:])

    def rpc(self, method: str, params: list[Any] | None = None, timeout: float = 10.0) -> Any:
        body = json.dumps(
            {"jsonrpc": "2.0", "id": 1, "method": method, "params": params or []}
        ).encode()
        req = urllib.request.Request(
            self.http_url, data=body, headers={"Content-Type": "application/json"}
        )
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            answer = json.loads(resp.read())
        if "error" in answer:
            raise RuntimeError(f"{method}: {answer['error']}")
        return answer["result"]

    @property
    def enode(self) -> str:
        return str(self.rpc("admin_nodeInfo")["enode"])

    def add_peer(self, other: GethNode) -> None:
        self.rpc("admin_addPeer", [other.enode])

    def remove_peer(self, other: GethNode) -> None:
        self.rpc("admin_removePeer", [other.enode])

    def peer_count(self) -> int:
        return int(self.rpc("net_peerCount"), 16)
