"""A progress bar on stderr: events/s and time left, so a long replay is never silent.

On a terminal it redraws one line; otherwise (CI logs, pipes) it prints a plain line
every `every` seconds, so logs stay readable.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from typing import TextIO


def _duration(seconds: float) -> str:
    seconds = max(int(seconds), 0)
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes:02d}:{secs:02d}"


def render(fraction: float | None, events: int, txs: int, elapsed: float, width: int = 24) -> str:
    """One status line (pure, for tests): bar, percent, counts, rates and time left."""
    rate = events / elapsed if elapsed > 0 else 0.0
    tx_rate = txs / elapsed if elapsed > 0 else 0.0
    speed = f"{events:,} events {rate:,.0f} ev/s {tx_rate:,.0f} tx/s"
    if fraction is None:
        return f"replay {speed} elapsed {_duration(elapsed)}"
    fraction = min(max(fraction, 0.0), 1.0)
    filled = int(fraction * width)
    bar = "#" * filled + "-" * (width - filled)
    left = elapsed * (1 - fraction) / fraction if fraction > 0 else None
    eta = _duration(left) if left is not None else "?"
    return f"replay [{bar}] {fraction:6.1%} {speed} elapsed {_duration(elapsed)} left {eta}"


class Progress:
    def __init__(
        self,
        fraction: Callable[[], float | None],
        *,
        stream: TextIO | None = None,
        every: float = 0.2,
        enabled: bool = True,
    ) -> None:
        self.fraction = fraction
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty()
        self.every = every if self.tty else max(every, 10.0)
        self.enabled = enabled
        self.started = time.monotonic()
        self.last = self.started if not self.tty else 0.0

    def update(self, events: int, txs: int, *, force: bool = False) -> None:
        if not self.enabled:
            return
        now = time.monotonic()
        if not force and now - self.last < self.every:
            return
        self.last = now
        line = render(self.fraction(), events, txs, now - self.started)
        if self.tty:
            self.stream.write("\r" + line + "\033[K")
        else:
            self.stream.write(line + "\n")
        self.stream.flush()

    def close(self, events: int, txs: int) -> None:
        self.update(events, txs, force=True)
        if self.enabled and self.tty:
            self.stream.write("\n")
            self.stream.flush()
