"""`chainwatch demo` does what the README promises, on a real anvil, and stops by itself."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tests.integration.conftest import free_port

pytestmark = pytest.mark.integration


def test_demo_shows_the_reorg_and_the_stall_as_findings_and_stops_by_itself(tmp_path):
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("CHAINWATCH_")}
    result = subprocess.run(
        [sys.executable, "-m", "chainwatch.cli", "demo", "--duration", "45",
         "--metrics-port", str(port)],
        capture_output=True, text=True, timeout=240, env=env, cwd=tmp_path,
    )
    out = result.stdout
    assert result.returncode == 0, result.stderr[-2000:]
    assert f"metrics at http://127.0.0.1:{port}/metrics" in out
    assert "FINDING WARNING  reorg_depth: reorg of depth 3" in out
    assert "block_iforest: abnormal block" in out and "interval_seconds" in out
    assert "1 reorg(s)" in out
    assert "Traceback" not in result.stderr
