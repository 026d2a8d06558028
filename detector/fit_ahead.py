"""Refitting a live model in a worker process while the detector goes on.

A transaction model's refit is ~0.2 CPU-s (growing 100 trees in Python, `forest_fit`, a
third of it, then scoring the 50k training rows and their statistics), much of it with
the GIL held that the detector needs. In a replay with live models (a 10M-transaction
archive refits ~120 times) the detector would wait for each one. With `fit_ahead` a
refit that falls due at the end of a batch is handed to a worker process and the next
batch goes on with its features, bookkeeping and reading; the first thing that needs
the model (scoring the next batch) waits for it. The model is the same, fitted on the
same rows, so the findings are the same, batch for batch: only the waiting moves.

A live service refits every few hours and does not need this: it keeps fitting inline,
without a worker process and the ~130 MB of its own it would hold.

The worker leaves Ctrl-C to the replay (which shuts it down as it exits) and exits by
itself when the replay's process is gone, however it ended. As with any spawned worker,
a script that runs a replay needs the `if __name__ == "__main__":` guard.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import multiprocessing
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from typing import Any

import numpy as np

from chainwatch.stopping import restore_handlers
from detector.models import AnomalyDetector

log = logging.getLogger("chainwatch.detector")

# fewer rows fit faster inline than the hand-over costs (pickling rows and trees)
FIT_AHEAD_MIN_ROWS = 1_000

_pool: ProcessPoolExecutor | None = None
_up: Future[None] | None = None  # done once the worker has its libraries loaded
_gave_up = False  # a worker could not start here: every fit inline from then on
_CANNOT_START = "the fitting worker process could not start; fitting inline from now on"


def _fitted(blank: AnomalyDetector, train: np.ndarray, window: dict[str, Any] | None,
            version: str | None = None) -> AnomalyDetector:
    """The same fit as inline."""
    blank.fit(train, window, version=version)
    return blank


def _start_worker(parent: int) -> None:
    """In the worker, first: Ctrl-C reaches the whole foreground process group, and it is
    the replay's to handle; and a worker whose replay died (SIGKILL, OOM) would otherwise
    wait for work forever (it holds its queue's both ends).

    polars is imported first: importing it installs its own SIGINT handler over an
    ignored SIGINT, and a Ctrl-C would then raise KeyboardInterrupt out of a query."""
    import polars  # noqa: F401

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    # started with it blocked (see _SpawnBlockingCtrlC): one pending now is dropped
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})
    threading.Thread(target=_exit_with, args=(parent,), name="exit-with-parent",
                     daemon=True).start()


def _exit_with(parent: int, every: float = 0.5) -> None:
    while os.getppid() == parent:
        time.sleep(every)
    os._exit(0)


def load_model_libraries() -> None:
    """Import what fitting an isolation forest needs (sklearn, PyOD: ~1 s) now rather
    than in the middle of the first batch, where it ran before the worker was up."""
    import pyod.models.iforest  # noqa: F401
    import sklearn.ensemble  # noqa: F401


def _load() -> None:
    """In the worker: a tiny fit, so that its libraries (sklearn, PyOD, the compiled
    forest walk) are loaded before its first real fit."""
    rows = np.random.default_rng(0).normal(size=(64, 2))
    AnomalyDetector("warm-up", ("a", "b"), kind="iforest", n_estimators=2).fit(rows)
    # the libraries' objects stay for the worker's life: kept out of the cyclic
    # collector's passes, during fits and at the worker's exit (~0.6 s, which the
    # replay's own exit waits for)
    gc.freeze()


def start_worker() -> Future[None] | None:
    """Start the worker process in the background (if not started); the result is done
    once it is up, None if no worker can start here. Until it is up refits run inline,
    so a replay never waits for the worker's ~1.5 s of start-up, which a short replay
    would not win back."""
    global _up
    if _up is None and not _gave_up:
        try:
            with _stops_deferred():
                _up = _worker_pool().submit(_load)
        except (BrokenProcessPool, RuntimeError, OSError) as exc:
            _forget_worker(exc, _CANNOT_START, for_good=True)
    return _up


@contextlib.contextmanager
def _stops_deferred() -> Iterator[None]:
    """A Ctrl-C or SIGTERM while the pool starts its worker (the spawn, then the thread
    that manages the worker) is taken once both are done. In between, the replay would
    exit without waiting for a worker still reading what it was sent, which then failed
    with a traceback (the replay's semaphores were gone); and a manager thread whose
    start the stop cut short is unknown to Python's exit hook, which then waits for it
    forever. The spawn also blocks Ctrl-C, see `_SpawnBlockingCtrlC`."""
    if threading.current_thread() is not threading.main_thread():
        yield  # signals are the main thread's to handle
        return
    caught: list[int] = []
    previous: dict[signal.Signals, Any] = {}
    try:
        for sig in (signal.SIGINT, signal.SIGTERM):
            previous[sig] = signal.signal(sig, lambda signum, frame: caught.append(signum))
        yield
    finally:
        restore_handlers(previous)
        if caught:
            signal.raise_signal(caught[0])  # as the handler before would have had it


def _forget_worker(exc: BaseException, what: str, *, for_good: bool = False) -> None:
    """Drop the worker: the next fit starts a new one, or, `for_good`, none again (a
    worker that cannot start, for want of memory or in a script without the main guard,
    would fail again on every refit)."""
    global _pool, _up, _gave_up
    _pool, _up = None, None
    _gave_up = _gave_up or for_good
    log.warning(what, extra={"error": f"{type(exc).__name__}: {exc}"})


def _worker_up() -> bool:
    up = start_worker()
    if up is None or not up.done():
        return False
    try:
        up.result()
    except (BrokenProcessPool, RuntimeError, OSError) as exc:
        _forget_worker(exc, _CANNOT_START, for_good=True)
        return False
    return True


class _SpawnBlockingCtrlC(multiprocessing.context.SpawnProcess):
    """A spawned process that starts with Ctrl-C blocked, from its first instruction: a
    child keeps its parent's signal mask through fork and exec, so a Ctrl-C during the
    worker's ~1.5 s of imports, before `_start_worker` ignores it, stays pending there
    and prints no traceback. The replay blocks Ctrl-C only for the few milliseconds of
    the spawn itself, and one that comes then is delivered right after (blocked, not
    ignored: it is not lost)."""

    @staticmethod
    def _Popen(process_obj: Any) -> Any:  # multiprocessing's name
        spawn = multiprocessing.context.SpawnProcess._Popen
        if threading.current_thread() is not threading.main_thread():
            return spawn(process_obj)  # signals are the main thread's to set
        previous = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
        try:
            return spawn(process_obj)
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, previous)


class _SpawnContext(multiprocessing.context.SpawnContext):
    Process = _SpawnBlockingCtrlC


def _worker_pool() -> ProcessPoolExecutor:
    global _pool
    if _pool is None:
        # spawned, not forked: the detector's process runs thread pools (polars, the
        # forest walk) whose locks a fork could copy held
        _pool = ProcessPoolExecutor(max_workers=1,
                                    mp_context=_SpawnContext(),
                                    initializer=_start_worker, initargs=(os.getpid(),))
    return _pool


def start_fit(
    model: AnomalyDetector, train: np.ndarray, window: dict[str, Any] | None = None,
    version: str | None = None,
) -> Callable[[], AnomalyDetector]:
    """Begin fitting a model configured as `model` on `train`; call the result for it.

    Small fits, and fits while the worker is starting (`start_worker`), run here at
    once. A worker that died after it was up (killed, out of memory) costs its fit
    nothing: that fit runs inline, and a new worker starts. `version`: the caller's
    `model.version_of(train)`, so that it is not computed again."""
    blank = model.blank()
    if len(train) < FIT_AHEAD_MIN_ROWS or not _worker_up():
        fitted = _fitted(blank, train, window, version)
        return lambda: fitted
    try:
        # the fitted model comes back with its compiled walk (not compiled again here,
        # ~13 ms per refit) and its estimator still pickled (see AnomalyDetector.estimator)
        future: Future[AnomalyDetector] = _worker_pool().submit(
            _fitted, blank, train, window, version)
    except (BrokenProcessPool, RuntimeError, OSError) as exc:
        _forget_worker(exc, "fitting in a worker process failed; fitting inline")
        return lambda: _fitted(blank, train, window, version)

    def result() -> AnomalyDetector:
        try:
            return future.result()
        except BrokenProcessPool as exc:
            _forget_worker(exc, "the fitting worker process died; fitting inline")
            return _fitted(blank, train, window, version)

    return result
