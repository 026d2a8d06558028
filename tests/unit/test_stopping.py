"""Signal handlers put back after a long command or a deferred stretch: all of them, even
when a signal lands between two of them (`chainwatch.stopping.restore_handlers`)."""

from __future__ import annotations

import contextlib
import signal
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from chainwatch import stopping
from detector import fit_ahead


@pytest.fixture
def handlers_kept() -> Iterator[None]:
    """Whatever a test leaves, the process's own handlers come back."""
    before = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in before.items():
            signal.signal(sig, handler)
        stopping._asked.clear()


def _interrupted_after_first_restore(monkeypatch: pytest.MonkeyPatch, installs: int) -> None:
    """`signal.signal` as if a Ctrl-C landed right after the first handler was put back,
    and that handler (now in place) raised: what a real signal does at that moment, made
    certain. The context's own `installs` calls, setting its handlers up, come first."""
    real: Callable[..., Any] = signal.signal
    calls = {"n": 0}

    def put(sig: signal.Signals, handler: Any) -> Any:
        previous = real(sig, handler)
        calls["n"] += 1
        if calls["n"] == installs + 1:  # the first put back
            raise KeyboardInterrupt
        return previous

    monkeypatch.setattr(signal, "signal", put)


@pytest.mark.usefixtures("handlers_kept")
@pytest.mark.parametrize("context", ["stops_quietly", "stops_deferred"])
def test_a_signal_between_two_restores_leaves_no_handler_behind(
    monkeypatch: pytest.MonkeyPatch, context: str
) -> None:
    """Without the second pass, the handler put back second stayed ours (the replay's
    `exit_now`, or the deferral's recorder that swallows every later SIGTERM)."""
    original_term = signal.getsignal(signal.SIGTERM)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    enter: Callable[[], contextlib.AbstractContextManager[None]] = (
        stopping.stops_quietly if context == "stops_quietly" else fit_ahead._stops_deferred)
    _interrupted_after_first_restore(monkeypatch, installs=2)  # SIGINT and SIGTERM
    with pytest.raises(KeyboardInterrupt), enter():
        assert signal.getsignal(signal.SIGINT) is not signal.default_int_handler
        assert signal.getsignal(signal.SIGTERM) is not original_term
    monkeypatch.undo()
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    assert signal.getsignal(signal.SIGTERM) == original_term
    assert stopping._asked == []


@pytest.mark.usefixtures("handlers_kept")
def test_a_stop_asked_inside_is_forgotten_once_the_handlers_are_back() -> None:
    """A stop taken by the command (KeyboardInterrupt out of the block) does not stay
    asked: the next command in the same process would stop at its first batch."""
    signal.signal(signal.SIGINT, signal.default_int_handler)
    with pytest.raises(KeyboardInterrupt), stopping.stops_quietly():
        signal.raise_signal(signal.SIGINT)
    assert stopping._asked == []
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    stopping.raise_if_stopped()  # nothing asked: returns
