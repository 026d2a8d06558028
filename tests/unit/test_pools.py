"""The detector's helper threads end with the replay that used them, also one whose
start a Ctrl-C cut short (the replay then hung at exit instead of exiting)."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from bench.synthetic import generate
from chainwatch.schema import encode
from chainwatch.settings import load_settings
from detector import families, pools
from detector.engine import DetectorConfig
from detector.evaluation import replay
from replay.app import ReplayOptions, run_replay

_CUT_SHORT = """
import sys, threading
from detector.pools import pool, shut_down_pools

start = threading.Thread.start

def start_then_ctrl_c(thread):
    start(thread)
    raise KeyboardInterrupt  # as a Ctrl-C landing while start() waits for the thread

threading.Thread.start = start_then_ctrl_c
try:
    pool("tx-score").submit(sum, [1, 2])
except KeyboardInterrupt:
    pass
threading.Thread.start = start
if sys.argv[1] == "shut":
    shut_down_pools()
sys.exit(130)
"""


@pytest.mark.parametrize("mode", ["plain", "shut"])
def test_a_helper_thread_whose_start_was_cut_short_lets_the_process_exit(mode):
    """Plain, the control: concurrent.futures' exit hook never heard of the thread,
    which waits for work forever, and so does the interpreter's exit."""
    child = subprocess.Popen([sys.executable, "-c", _CUT_SHORT, mode],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        _, err = child.communicate(timeout=15)
    except subprocess.TimeoutExpired:
        child.kill()
        child.communicate()
        assert mode == "plain", "the process did not exit within 15 s"
        return
    assert mode == "shut", f"the control exited ({child.returncode}): {err[-500:]}"
    assert child.returncode == 130 and err == ""


def _helpers() -> list[threading.Thread]:
    return [t for t in threading.enumerate()
            if t.name.startswith(("tx-score", "tx-features", "forest-score"))]


def _wait_for_no_helpers(seconds: float = 10) -> None:
    deadline = time.monotonic() + seconds
    while _helpers() and time.monotonic() < deadline:
        time.sleep(0.05)


@pytest.mark.parametrize("how", ["chainwatch replay", "chainwatch evaluate"])
def test_a_replay_ends_the_helper_threads_it_started(tmp_path: Path, monkeypatch, how) -> None:
    monkeypatch.setattr(families, "ASYNC_MIN_ROWS", 1)  # every tx batch scored on a helper
    used: list[str] = []

    def counted_pool(name: str, workers: int = 1) -> ThreadPoolExecutor:
        used.append(name)
        return pools.pool(name, workers)

    monkeypatch.setattr(families, "pool", counted_pool)
    blocks = generate(120, 20, seed=5)
    pools.shut_down_pools()  # none left by an earlier test
    _wait_for_no_helpers()
    assert not _helpers()
    if how == "chainwatch replay":
        source = tmp_path / "history.jsonl"
        source.write_bytes(b"\n".join(encode(b) for b in blocks) + b"\n")
        run_replay(load_settings(warmup_blocks=50), str(source),
                   ReplayOptions(progress=False), echo=lambda _: None)
    else:  # evaluate scores its recordings through this replay
        replay(blocks, DetectorConfig(warmup_blocks=50))
    _wait_for_no_helpers()
    assert "tx-score" in used
    assert not _helpers()
