"""Refits in a worker process give the models, scores and findings that fitting inline
gives; a worker that dies costs its fit nothing."""

from __future__ import annotations

import os
import signal

import numpy as np
import pytest

from bench.synthetic import generate
from chainwatch.metrics import Metrics
from detector import fit_ahead
from detector.engine import Detector, DetectorConfig
from detector.families import FamilyConfig
from detector.model import BlockAnomalyModel
from detector.models import AnomalyDetector


@pytest.fixture
def small_fits_ahead(monkeypatch):
    """Hand even the tests' small fits to the worker process, once it is up."""
    monkeypatch.setattr(fit_ahead, "FIT_AHEAD_MIN_ROWS", 50)
    started = fit_ahead.start_worker()
    assert started is not None  # a worker can start here
    started.result(timeout=120)


@pytest.fixture
def no_worker_yet(monkeypatch):
    """The module as in a fresh process (its own worker put back after the test)."""
    monkeypatch.setattr(fit_ahead, "_pool", None)
    monkeypatch.setattr(fit_ahead, "_up", None)
    monkeypatch.setattr(fit_ahead, "_gave_up", False)


def _stream(seed: int, batches: int, rows: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    out = [rng.normal(size=(rows, 3)) for _ in range(batches)]
    for i, batch in enumerate(out):  # a few clear outliers along the way
        batch[i % rows] += 40.0
    return out


def _run(model: BlockAnomalyModel, stream: list[np.ndarray]) -> list[tuple]:
    """Score then learn each batch, as the detector does; what each step saw."""
    seen = []
    for x in stream:
        scored = model.score(x)
        seen.append((None if scored is None else (scored.scores.tolist(),
                                                  scored.anomalous.tolist()),
                     model.version, model.fitted))
        model.learn(x)
    return seen


def _model(fit_in_worker: bool) -> BlockAnomalyModel:
    return BlockAnomalyModel(("a", "b", "c"), warmup=60, refit_every=150, history=200,
                             fit_ahead=fit_in_worker)


def _fitted_inline(train: np.ndarray) -> AnomalyDetector:
    detector = _model(False).detector.blank()
    detector.fit(train)
    return detector


def test_a_model_refitted_in_the_worker_scores_as_one_refitted_inline(small_fits_ahead):
    stream = _stream(1, 30, 40)
    inline, ahead = _model(False), _model(True)
    assert _run(ahead, stream) == _run(inline, stream)
    assert ahead.fits == inline.fits >= 5
    assert ahead.detector.version == inline.detector.version
    assert fit_ahead._pool is not None  # the worker really fitted


def test_the_version_of_a_refit_under_way_is_known_before_it_ends(small_fits_ahead):
    model = _model(True)
    for x in _stream(2, 2, 40):
        model.learn(x)
    assert model._refit is not None  # under way
    version = model.version
    assert model._refit is not None  # asking did not wait
    assert model.detector.version == version


def test_a_refit_in_the_worker_brings_its_compiled_walk_along(small_fits_ahead, monkeypatch):
    """The walk the worker compiled to score the training rows is used here as it is."""
    from detector import models

    model = _model(True)
    for x in _stream(3, 2, 40):
        model.learn(x)
    assert model._refit is not None  # fitted in the worker
    refitted = model.detector
    assert refitted.compiled_walk() is not None
    assert refitted._est is None  # its estimator still pickled: sklearn's trees not read here

    def compile_again(forest: object) -> None:
        raise AssertionError("compiled again in the replay's process")

    probe = _stream(4, 1, 40)[0]
    expected = _fitted_inline(model._window())._raw(probe)
    monkeypatch.setattr(models, "CompiledForest", compile_again)
    assert np.array_equal(refitted._raw(probe), expected)


def test_the_worker_leaves_its_libraries_out_of_the_collectors_passes(small_fits_ahead):
    """Frozen once loaded: fits do not walk them, and neither does the worker's exit,
    which the replay's own exit waits for."""
    import gc

    assert fit_ahead._worker_pool().submit(gc.get_freeze_count).result(timeout=60) > 10_000


def _sigint_ignored_in_a_query() -> bool:
    """In the worker: whether the kernel still ignores SIGINT once polars is in use
    (its import installs a handler that raises KeyboardInterrupt out of queries)."""
    import polars as pl

    pl.DataFrame({"a": [1, 2]}).lazy().select(pl.col("a").sum()).collect()
    with open("/proc/self/status") as status:
        ignored = next(line for line in status if line.startswith("SigIgn:"))
    return bool(int(ignored.split()[1], 16) & (1 << (signal.SIGINT - 1)))


def test_the_worker_ignores_ctrl_c_even_once_polars_is_in_use(small_fits_ahead):
    """Ctrl-C is the replay's to handle, whatever the worker has imported since."""
    future = fit_ahead._worker_pool().submit(_sigint_ignored_in_a_query)
    assert future.result(timeout=60) is True


def test_a_worker_that_dies_costs_its_fit_nothing(small_fits_ahead):
    stream = _stream(3, 12, 40)
    inline = _model(False)
    wanted = _run(inline, stream)
    model = _model(True)
    got = _run(model, stream[:4])
    assert model._refit is not None or model.fits >= 1
    model.detector  # noqa: B018 - the worker is up and idle
    for pid in list(fit_ahead._worker_pool()._processes):
        os.kill(pid, signal.SIGKILL)
    got += _run(model, stream[4:])
    assert got == wanted
    assert model.fits == inline.fits


def _outlying_fees(blocks: list, numbers: tuple[int, ...]) -> list:
    """Blocks with one tx each paying a fee far outside the market."""
    blocks = list(blocks)
    for n in numbers:
        txs = list(blocks[n].transactions)
        txs[3] = txs[3].model_copy(update={"max_fee_per_gas": 10**15, "tx_type": 2,
                                           "max_priority_fee_per_gas": 10**15 - 10**9})
        blocks[n] = blocks[n].model_copy(update={"transactions": tuple(txs)})
    return blocks


def test_a_detector_fitting_ahead_finds_what_one_fitting_inline_finds(small_fits_ahead):
    blocks = _outlying_fees(generate(90, 30, seed=5), (80, 86))  # once the model is fitted
    findings = {}
    for ahead in (False, True):
        detector = Detector(DetectorConfig(warmup_blocks=20, refit_every_blocks=25,
                                           fit_ahead=ahead), Metrics(),
                            clock=lambda: 1_700_002_000.0)
        found = []
        for start in range(0, len(blocks), 9):
            found += detector.process(blocks[start:start + 9])
        findings[ahead] = [f.model_dump_json() for f in found]
        fits = (detector.models[1].fits, detector.tx[1].model.fits)
        assert fits[0] >= 3 and fits[1] >= 1, fits
    assert findings[True] == findings[False]
    assert sum('"tx_iforest"' in f for f in findings[False]) == 2


@pytest.mark.parametrize("ahead", [False, True])
def test_a_batch_is_scored_by_the_model_before_the_refit_it_sets_off(small_fits_ahead, ahead):
    """A batch's findings come from the model as it was before the batch, also when the
    batch makes a refit due (in a worker or inline): refitting every batch here, each
    finding names the version that scored it."""
    blocks = _outlying_fees(generate(60, 30, seed=5), (30, 41, 52))
    families = FamilyConfig(tx_warmup=200, tx_refit_every=200)
    detector = Detector(DetectorConfig(families=families, fit_ahead=ahead), Metrics(),
                        clock=lambda: 1_700_002_000.0)
    flagged = 0
    for start in range(0, len(blocks), 9):
        model = detector.tx[1].model if 1 in detector.tx else None
        before = model.version if model is not None else None
        found = [f for f in detector.process(blocks[start:start + 9])
                 if f.detector == "tx_iforest"]
        after = detector.tx[1].model.version
        for finding in found:
            assert finding.model_version == before != after
        flagged += len(found)
    assert flagged >= 2


@pytest.mark.parametrize(("cpus", "ahead"), [({0}, False), ({0, 1}, True), ({0, 3, 5}, True)])
def test_replay_fits_ahead_only_with_a_second_cpu_to_fit_on(monkeypatch, no_worker_yet,
                                                            cpus, ahead):
    from chainwatch.settings import load_settings
    from replay.app import make_detector
    from replay.driver import ReplayClock

    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: cpus)
    detector = make_detector(load_settings(), ReplayClock())
    assert detector.config.fit_ahead is ahead
    assert (fit_ahead._up is not None) is ahead  # the worker is started only to be used
    if fit_ahead._pool is not None:
        fit_ahead._pool.shutdown()


def test_fits_while_the_worker_starts_run_inline_without_waiting(monkeypatch):
    from concurrent.futures import Future

    def no_pool():
        raise AssertionError("handed to a worker that is not up")

    monkeypatch.setattr(fit_ahead, "start_worker", Future)  # never done: still starting
    monkeypatch.setattr(fit_ahead, "_worker_pool", no_pool)
    train = np.random.default_rng(6).normal(size=(2_000, 3))
    inline = _fitted_inline(train)
    got = fit_ahead.start_fit(inline.blank(), train)()
    assert got.version == inline.version and got.fitted


def test_a_worker_that_cannot_start_is_not_tried_again(monkeypatch, no_worker_yet, caplog):
    starts = []

    def cannot_start():
        starts.append(1)
        raise RuntimeError("no process can be started here")

    monkeypatch.setattr(fit_ahead, "_worker_pool", cannot_start)
    train = np.random.default_rng(7).normal(size=(2_000, 3))
    inline = _fitted_inline(train)
    for _ in range(3):
        assert fit_ahead.start_fit(inline.blank(), train)().version == inline.version
    assert starts == [1]
    assert sum("could not start" in r.getMessage() for r in caplog.records) == 1


def _raise_exit(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)  # as the replay's SIGTERM handler


def _start_worker_interrupted(sig: int = signal.SIGINT) -> None:
    """start_worker ends in the stop the test arranged to send during it: Ctrl-C's
    KeyboardInterrupt, or SIGTERM's SystemExit as the replay raises it.

    Ctrl-C as in a terminal, whatever this run inherited (a background job's, as CI may
    start the suite, ignores it, and so does the worker's start then).
    """
    handler = signal.default_int_handler if sig == signal.SIGINT else _raise_exit
    before = signal.signal(sig, handler)
    try:
        with pytest.raises(KeyboardInterrupt if sig == signal.SIGINT else SystemExit):
            fit_ahead.start_worker()
    finally:
        signal.signal(sig, before)


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
def test_a_stop_while_the_worker_starts_comes_once_its_manager_runs(
    monkeypatch, no_worker_yet, sig
):
    """A stop between the spawn and the start of the thread that manages the worker:
    raised then, the replay exited without waiting for a worker still reading what it was
    sent (a traceback from the worker), or hung at exit on a manager thread whose start
    it cut short. It comes once the pool is whole instead."""
    from concurrent.futures import ProcessPoolExecutor

    start_manager = ProcessPoolExecutor._start_executor_manager_thread

    def stop_first(pool: ProcessPoolExecutor) -> None:
        assert pool._processes  # spawned already
        os.kill(os.getpid(), sig)
        start_manager(pool)

    monkeypatch.setattr(ProcessPoolExecutor, "_start_executor_manager_thread", stop_first)
    _start_worker_interrupted(sig)
    pool = fit_ahead._pool
    assert pool is not None
    try:
        assert pool._executor_manager_thread is not None  # the worker is waited for
        assert fit_ahead._up is not None
        fit_ahead._up.result(timeout=120)  # and comes up
    finally:
        if pool._executor_manager_thread is None:  # nobody would ever stop the worker
            for process in list(pool._processes.values()):
                process.kill()
                process.join()
        pool.shutdown(wait=True)


def test_a_ctrl_c_during_the_spawn_itself_is_taken_after_it_not_lost(
    monkeypatch, no_worker_yet
):
    """The spawn blocks Ctrl-C for its few milliseconds (the child starts with it blocked,
    so its imports cannot be interrupted); one pressed then comes once the pool is whole,
    where ignoring it used to make the user press again. The worker itself ends up
    ignoring SIGINT, not holding it pending."""
    import multiprocessing.context
    from multiprocessing.process import BaseProcess

    spawn = multiprocessing.context.SpawnProcess._Popen
    blocked_in_spawn = []

    def ctrl_c_in_spawn(process_obj: BaseProcess) -> object:
        blocked_in_spawn.append(signal.SIGINT in signal.pthread_sigmask(signal.SIG_BLOCK, ()))
        os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C lands in the middle of the spawn
        return spawn(process_obj)

    monkeypatch.setattr(multiprocessing.context.SpawnProcess, "_Popen",
                        staticmethod(ctrl_c_in_spawn))
    _start_worker_interrupted()
    assert blocked_in_spawn == [True]
    assert signal.SIGINT not in signal.pthread_sigmask(signal.SIG_BLOCK, ())  # given back
    pool = fit_ahead._pool
    assert pool is not None
    try:
        assert fit_ahead._up is not None
        fit_ahead._up.result(timeout=120)  # the worker came up all the same
        # asked with the standard library's own functions: a function of this module
        # would make the worker import it, and with it libraries that hook SIGINT
        blocked = pool.submit(signal.pthread_sigmask, signal.SIG_BLOCK, ()).result(timeout=60)
        assert signal.SIGINT not in blocked
        assert pool.submit(signal.getsignal, signal.SIGINT).result(timeout=60) == signal.SIG_IGN
    finally:
        pool.shutdown(wait=True)
