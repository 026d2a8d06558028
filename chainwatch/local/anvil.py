"""Run a real anvil (Foundry dev node) on 127.0.0.1 for tests and `chainwatch demo`.

anvil picks its own port with ``--port 0`` and reports it on stdout, which avoids the race
of choosing a free port first. Restarting on a known port is supported because "the node
went away and came back" is a behaviour the collector must survive.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import threading
import time
import urllib.request
from collections import deque
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

from chainwatch.local.procs import LOCALHOST, ServerStartError, cache_dir, spawn, stop_pid

ENV_BIN = "CHAINWATCH_ANVIL_BIN"
_LISTENING = re.compile(r"Listening on (?P<host>[\d.]+):(?P<port>\d+)")


def anvil_binary() -> Path:
    """Locate anvil: $CHAINWATCH_ANVIL_BIN, then the install script's cache, then PATH."""
    override = os.environ.get(ENV_BIN)
    if override:
        path = Path(override)
        if not path.is_file():
            raise FileNotFoundError(f"{ENV_BIN}={override} does not point to a file")
        return path
    cached = cache_dir() / "npm/node_modules/@foundry-rs/anvil-linux-amd64/bin/anvil"
    if cached.is_file():
        return cached
    found = shutil.which("anvil")
    if found:
        return Path(found)
    raise FileNotFoundError(
        f"anvil not found: run scripts/install-anvil.sh (or set {ENV_BIN} to an anvil binary)"
    )


class Anvil:
    """One anvil process; a context manager that always stops it on exit.

    ``start()`` may be called again after ``stop()``; pass ``port=anvil.port`` (or use
    ``restart()``) to come back on the same port. Chain state is in memory, so a restarted
    node begins again at its genesis unless ``--state`` is given in ``extra_args``.
    """

    def __init__(self, binary: Path | None = None, startup_timeout: float = 30.0) -> None:
        self._binary = binary
        self._startup_timeout = startup_timeout
        self._proc: subprocess.Popen[str] | None = None
        self._port: int | None = None
        self._lines: deque[str] = deque(maxlen=200)
        self._listening = threading.Event()
        self._reader: threading.Thread | None = None
        self._last_start: dict[str, Any] = {}

    # -- lifecycle -------------------------------------------------------------------------

    def start(
        self,
        block_time: float | None = None,
        no_mining: bool = False,
        extra_args: Sequence[str] = (),
        *,
        port: int | None = None,
        timestamp: int | None = None,
        chain_id: int | None = None,
    ) -> Anvil:
        """Start anvil and wait until it listens; returns self for chaining.

        ``timestamp`` fixes the genesis time, so two nodes started alike share a genesis
        (the way to build a chain split between two anvils).
        """
        if self.running:
            raise RuntimeError(f"anvil already running (pid {self.pid})")
        self._last_start = {
            "block_time": block_time,
            "no_mining": no_mining,
            "extra_args": tuple(extra_args),
            "timestamp": timestamp,
            "chain_id": chain_id,
        }
        binary = self._binary or anvil_binary()
        args: list[str] = [str(binary), "--host", LOCALHOST, "--port", str(port or 0)]
        if block_time is not None:
            args += ["--block-time", _fmt_seconds(block_time)]
        if no_mining:
            args.append("--no-mining")
        if timestamp is not None:
            args += ["--timestamp", str(timestamp)]
        if chain_id is not None:
            args += ["--chain-id", str(chain_id)]
        args += list(extra_args)

        self._lines.clear()
        self._listening.clear()
        self._port = None
        proc: subprocess.Popen[str] = spawn(
            args,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            bufsize=1,
            env={**os.environ, "NO_COLOR": "1"},
        )
        self._proc = proc
        self._reader = threading.Thread(
            target=self._drain, args=(proc,), name=f"anvil-{proc.pid}-stdout", daemon=True
        )
        self._reader.start()

        deadline = time.monotonic() + self._startup_timeout
        while not self._listening.wait(0.05):
            if proc.poll() is not None:
                self._reader.join(timeout=2.0)
                self._proc = None
                raise ServerStartError(
                    f"anvil exited with code {proc.returncode} before listening:\n{self.tail()}"
                )
            if time.monotonic() >= deadline:
                self.stop()
                raise ServerStartError(
                    f"anvil did not report 'Listening on' within {self._startup_timeout:.0f}s:"
                    f"\n{self.tail()}"
                )
        return self

    def restart(self) -> Anvil:
        """Stop and start again on the same port with the same options."""
        port = self._port
        self.stop()
        return self.start(port=port, **self._last_start)

    def stop(self, timeout: float = 10.0) -> None:
        """Stop the process group by PID; the port is kept so ``restart()`` can reuse it."""
        proc, self._proc = self._proc, None
        if proc is None:
            return
        stop_pid(proc.pid, timeout=timeout)
        if self._reader is not None:
            self._reader.join(timeout=2.0)
            self._reader = None

    def _drain(self, proc: subprocess.Popen[str]) -> None:
        """Read stdout forever: anvil logs every RPC call and a full pipe would block it."""
        assert proc.stdout is not None
        for line in proc.stdout:
            line = line.rstrip("\n")
            self._lines.append(line)
            if not self._listening.is_set():
                match = _LISTENING.search(line)
                if match:
                    self._port = int(match["port"])
                    self._listening.set()
        proc.stdout.close()

    def __enter__(self) -> Anvil:
        if not self.running:
            self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # -- access ----------------------------------------------------------------------------

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    @property
    def pid(self) -> int:
        if self._proc is None:
            raise RuntimeError("anvil is not running")
        return self._proc.pid

    @property
    def port(self) -> int:
        if self._port is None:
            raise RuntimeError("anvil has not started yet")
        return self._port

    @property
    def http_url(self) -> str:
        return f"http://{LOCALHOST}:{self.port}"

    @property
    def ws_url(self) -> str:
        return f"ws://{LOCALHOST}:{self.port}"

    def tail(self, lines: int = 40) -> str:
        """The last lines anvil printed, for error messages."""
        return "\n".join(list(self._lines)[-lines:])

    def rpc(self, method: str, params: Sequence[Any] = (), timeout: float = 10.0) -> Any:
        """One JSON-RPC call over HTTP (for driving the node: mining, reorgs, snapshots)."""
        body = json.dumps({"jsonrpc": "2.0", "id": 1, "method": method, "params": list(params)})
        request = urllib.request.Request(
            self.http_url, data=body.encode(), headers={"Content-Type": "application/json"}
        )
        with urllib.request.urlopen(request, timeout=timeout) as response:
            reply = json.loads(response.read())
        if "error" in reply:
            raise RuntimeError(f"anvil {method} failed: {reply['error']}")
        return reply.get("result")


def _fmt_seconds(value: float) -> str:
    """anvil takes --block-time as a number of seconds; keep integers integral."""
    return str(int(value)) if float(value).is_integer() else repr(float(value))
