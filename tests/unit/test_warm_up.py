"""The kernels compiled ahead are the ones the detector runs: nothing compiles after them.

Run in a fresh interpreter with an empty numba cache, so kernels other tests compiled
(or a cache another run filled) cannot hide a kernel or an argument type the warm-up
missed: a missed one shows up as a signature added by the detector or the replay.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.models import train_models

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def numba_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One cache for the module: a kernel compiles once, and each test's fresh interpreter
    still starts with no kernel loaded."""
    return tmp_path_factory.mktemp("numba-cache")

_SCRIPT = r"""
import json, sys
from pathlib import Path

from bench.synthetic import generate
from chainwatch.metrics import Metrics
from chainwatch.schema import encode
from chainwatch.settings import load_settings
from detector.compiled import KERNELS
from detector.engine import Detector, DetectorConfig
from detector.warm_up import compile_kernels
from replay.app import make_detector
from replay.archive import ArchiveSource, ArchiveWriter, archive_row
from replay.driver import ReplayClock, ReplayConfig, Replayer
from replay.rows import InvalidRows


def signatures():
    return {k.py_func.__name__: sorted(map(str, k.signatures)) for k in KERNELS}


before_warm_up = signatures()
compile_kernels()
warm = signatures()
blocks = generate(60, 80, seed=3)

live = Detector(DetectorConfig(warmup_blocks=10), Metrics())
for start in range(0, len(blocks), 7):  # a live detector catching up: batches of blocks
    live.process(blocks[start:start + 7])

root = Path(sys.argv[1])
writer = ArchiveWriter(root)
for i, block in enumerate(blocks):
    writer.add(archive_row("cw.blocks", 0, i, "1:n", encode(block), 0))
writer.flush()
clock = ReplayClock()
replayed = make_detector(load_settings(warmup_blocks=10), clock)
source = ArchiveSource(root, InvalidRows())
Replayer(replayed, clock, ReplayConfig(batch_records=13), lambda findings: None,
         columns=source).run(source.records())

print(json.dumps({
    "before_warm_up": before_warm_up, "warm": warm, "after": signatures(),
    "scored": {"live": dict(live.scored_rows), "replay": dict(replayed.scored_rows)},
}))
"""


def test_a_detector_and_a_replay_compile_nothing_after_the_warm_up(
    tmp_path: Path, numba_cache: Path
) -> None:
    env = {**os.environ, "NUMBA_CACHE_DIR": str(numba_cache), "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-c", _SCRIPT, str(tmp_path / "archive")],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=280)
    assert done.returncode == 0, done.stderr[-3000:]
    got = json.loads(done.stdout.strip().splitlines()[-1])
    assert not any(got["before_warm_up"].values())  # nothing compiled at import
    assert set(got["warm"]) >= {"_walk", "_windows_as_of", "_groups", "_sender_counts",
                                "_previous_nonces", "_deviations_of", "dense_ids",
                                "_selector_counts", "_clock_figures"}
    assert all(got["warm"].values()), got["warm"]  # the warm-up ran every kernel
    assert got["after"] == got["warm"]
    # the forests really scored blocks and txs in both (their walk is a kernel)
    for scored in got["scored"].values():
        assert scored.get("tx", 0) > 1_000 and scored.get("block", 0) > 10, got["scored"]


_TRAINED_SCRIPT = r"""
import json, sys
from pathlib import Path

from bench.synthetic import generate
from chainwatch.schema import encode
from chainwatch.settings import load_settings
from detector.compiled import KERNELS
from replay.app import make_detector
from replay.archive import ArchiveSource, ArchiveWriter, archive_row
from replay.driver import ReplayClock, ReplayConfig, Replayer
from replay.rows import InvalidRows


def signatures():
    return {k.py_func.__name__: sorted(map(str, k.signatures)) for k in KERNELS}


before = signatures()
root, models = Path(sys.argv[1]), sys.argv[2]
writer = ArchiveWriter(root)
for i, block in enumerate(generate(60, 80, seed=3)):
    writer.add(archive_row("cw.blocks", 0, i, "1:n", encode(block), 0))
writer.flush()
clock = ReplayClock()
replayed = make_detector(load_settings(models=models), clock)  # loads the kernels
loaded = signatures()
source = ArchiveSource(root, InvalidRows())
Replayer(replayed, clock, ReplayConfig(batch_records=13), lambda findings: None,
         columns=source).run(source.records())
print(json.dumps({"before": before, "loaded": loaded, "after": signatures(),
                  "sklearn": "sklearn" in sys.modules, "scored": dict(replayed.scored_rows)}))
"""


def test_a_replay_of_trained_models_loads_its_kernels_before_the_first_batch(
    tmp_path: Path, numba_cache: Path
) -> None:
    """`load_kernels`: with trained models the replay's kernels are loaded while the
    detector is made (no forest fitted, scikit-learn not imported), none in a batch."""
    models = train_models(tmp_path / "models", blocks=200, contamination=0.02)
    env = {**os.environ, "NUMBA_CACHE_DIR": str(numba_cache), "PYTHONPATH": str(ROOT)}
    done = subprocess.run(
        [sys.executable, "-c", _TRAINED_SCRIPT, str(tmp_path / "archive"), str(models)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=280)
    assert done.returncode == 0, done.stderr[-3000:]
    got = json.loads(done.stdout.strip().splitlines()[-1])
    assert not any(got["before"].values())
    for kernel in ("_walk", "_deviations_of", "_windows_as_of", "_sender_counts",
                   "_previous_nonces", "_selector_counts", "_clock_figures"):
        assert got["loaded"][kernel], kernel
    assert got["after"] == got["loaded"]
    assert not got["sklearn"]
    assert got["scored"].get("tx", 0) > 1_000 and got["scored"].get("block", 0) > 10
