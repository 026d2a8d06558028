"""Process helpers shared by the local server managers.

Servers are started in their own session (process group) so that stopping one also stops
any children it forked, and so that Ctrl-C in a terminal does not hit them before we can
shut them down in order. Every server we start is remembered and killed at interpreter
exit, so a crashed test run does not leave brokers or nodes behind holding ports.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

LOCALHOST = "127.0.0.1"

_live: dict[int, subprocess.Popen[Any]] = {}


class ServerStartError(RuntimeError):
    """A local server did not come up; the message carries the tail of its output."""


def free_port() -> int:
    """Ask the kernel for a free loopback TCP port. Racy: until the server binds it, any
    connection's local end may take it, so servers started on one retry on another when
    their log says so (`start_on_free_ports`)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((LOCALHOST, 0))
        return int(sock.getsockname()[1])


_START_TRIES = 3  # starts of a server whose port was taken meanwhile, each on new ports


def start_on_free_ports(
    start: Callable[[], None], log: Path, new_ports: Callable[[], None] | None
) -> None:
    """`start()` a server; should it fail with its log (`log`, what this start wrote)
    saying its port was in use, `new_ports()` and start again, up to 3 starts in all.
    `new_ports` None: the ports are known to others by now (a restart), so no retry."""
    for attempt in range(1, _START_TRIES + 1):
        since = log.stat().st_size if log.exists() else 0
        try:
            start()
            return
        except ServerStartError:
            if new_ports is None or attempt == _START_TRIES or not _port_taken(log, since):
                raise
            new_ports()


def _port_taken(log: Path, since: int) -> bool:
    """Whether the server's log, from `since` on, says its port was in use."""
    if not log.exists():
        return False
    with log.open("rb") as lines:
        lines.seek(since)
        return "address already in use" in lines.read().decode(errors="replace").lower()


def repo_root() -> Path:
    """The source tree root: where scripts/ and the ignored .cache/ live."""
    return Path(__file__).resolve().parents[2]


def cache_dir() -> Path:
    """Where the install scripts put downloaded servers."""
    return repo_root() / ".cache"


def port_open(host: str, port: int, timeout: float = 0.5) -> bool:
    """True when something accepts TCP connections on host:port."""
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def wait_for_port(
    host: str,
    port: int,
    timeout: float = 30.0,
    proc: subprocess.Popen[Any] | None = None,
) -> None:
    """Block until host:port accepts connections.

    With ``proc`` given, fail at once if it exits instead of waiting out the timeout.
    """
    deadline = time.monotonic() + timeout
    while True:
        if port_open(host, port):
            return
        if proc is not None and proc.poll() is not None:
            raise ServerStartError(
                f"process {proc.pid} exited with code {proc.returncode} "
                f"before {host}:{port} accepted connections"
            )
        if time.monotonic() >= deadline:
            raise TimeoutError(f"{host}:{port} did not accept connections within {timeout:.0f}s")
        time.sleep(0.05)


def spawn(args: Sequence[str | os.PathLike[str]], **kwargs: Any) -> subprocess.Popen[Any]:
    """Start a server in its own process group and remember it for cleanup at exit."""
    kwargs.setdefault("stdin", subprocess.DEVNULL)
    proc: subprocess.Popen[Any] = subprocess.Popen(
        [os.fspath(a) for a in args], start_new_session=True, **kwargs
    )
    _live[proc.pid] = proc
    return proc


def pid_alive(pid: int) -> bool:
    """True while ``pid`` exists and is not a zombie."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True  # no procfs: trust kill(0)
    return stat.rsplit(")", 1)[-1].split()[0] != "Z"


def _signal_group(pid: int, sig: signal.Signals, leader_too: bool = True) -> None:
    """Signal the process group led by ``pid``; fall back to the leader alone if asked."""
    try:
        os.killpg(pid, sig)
    except (ProcessLookupError, PermissionError):
        if leader_too:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)


def stop_pid(pid: int, timeout: float = 10.0) -> None:
    """Stop a process and its group: SIGTERM, wait up to ``timeout``, then SIGKILL.

    Reaps the process when it is our child so its PID really disappears (a zombie would
    still answer ``kill(pid, 0)``).
    """
    proc = _live.pop(pid, None)
    _signal_group(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    if proc is not None:
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            _signal_group(pid, signal.SIGKILL)
            proc.wait(timeout=10.0)
    else:
        while pid_alive(pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        if pid_alive(pid):
            _signal_group(pid, signal.SIGKILL)
            end = time.monotonic() + 10.0
            while pid_alive(pid) and time.monotonic() < end:
                time.sleep(0.05)
    # Children that ignored SIGTERM (or outlived the leader) must not keep ports open. Only
    # the group: the leader's PID is reaped now and may already belong to someone else.
    _signal_group(pid, signal.SIGKILL, leader_too=False)


def _stop_all() -> None:
    for pid in list(_live):
        stop_pid(pid, timeout=5.0)


atexit.register(_stop_all)
