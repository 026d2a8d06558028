"""Ctrl-C and SIGTERM for a long command (the replay): raised where they land, so that
the command ends through its clean-up, and kept until they have ended it.

Python drops an exception raised inside a finalizer (`__del__`, a weakref callback),
and a library may catch one where it lands: a signal whose handler ran there was lost,
and the command carried on to its end (exit status 0 after a Ctrl-C). The stop asked is
kept, and `raise_if_stopped` raises it again where the command can end: between
batches, and at the command's end."""

from __future__ import annotations

import contextlib
import logging
import signal
import sys
import threading
from collections.abc import Iterator
from typing import Any

log = logging.getLogger(__name__)

# the signal of the stop asked while a command runs under `stops_quietly`
_asked: list[int] = []


def raise_if_stopped() -> None:
    """Raise the stop asked, if one was: its first raise landed in a finalizer."""
    if _asked:
        _raise_stop(_asked[0])


def _raise_stop(signum: int) -> None:
    if signum == signal.SIGINT:
        raise KeyboardInterrupt
    raise SystemExit(128 + signum)


def _quiet_finalizer_errors(unraisable: sys.UnraisableHookArgs) -> None:
    """After a stop was asked, a finalizer failing on an object the interrupt left
    half-built (llvmlite's, when Ctrl-C lands inside numba's first compile) is noise;
    so is the stop itself when it was raised inside a finalizer (taken again later)."""
    log.debug("finalizer error after a stop: %s", unraisable.exc_type.__name__)


def restore_handlers(before: dict[signal.Signals, Any]) -> None:
    """Put every signal handler back, even when a signal lands between two of them.

    A handler just put back (Ctrl-C's raises KeyboardInterrupt) can run before the next
    is: the loop ends there, and the handlers after it would stay in place, for the rest
    of a process that goes on (a test run, a notebook). Only a second signal landing in
    this function's own `finally` can still leave one."""
    try:
        for sig, handler in before.items():
            signal.signal(sig, handler)
    finally:
        for sig, handler in before.items():
            if signal.getsignal(sig) != handler:
                signal.signal(sig, handler)


@contextlib.contextmanager
def stops_quietly() -> Iterator[None]:
    """Ctrl-C and SIGTERM end the command through its clean-up (a replay's fit-ahead
    worker shut down, its resource tracker told) instead of killing the process where it
    stands: exit status 130 or 143 (128 + the signal), as the default actions give.

    The signal lands wherever the process is; finalizers of objects it left half-built
    would print "Exception ignored in ... Traceback" at the user, so from then on they
    are logged at debug level instead. A Ctrl-C ignored on entry (a background job's)
    stays ignored."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def exit_now(signum: int, frame: object) -> None:
        sys.unraisablehook = _quiet_finalizer_errors
        if not _asked:
            _asked.append(signum)
        _raise_stop(signum)

    handled = [signal.SIGTERM]
    if signal.getsignal(signal.SIGINT) is signal.default_int_handler:
        handled.append(signal.SIGINT)
    before = {sig: signal.signal(sig, exit_now) for sig in handled}
    try:
        yield
        raise_if_stopped()  # a stop dropped in a finalizer after the last batch
    finally:
        try:
            restore_handlers(before)
        finally:
            _asked.clear()  # after: `exit_now` stays in place until then
