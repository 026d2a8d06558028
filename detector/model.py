"""The live block model: an AnomalyDetector that warms up and refits on a schedule.

Without a trained model the detector learns from the stream: the first fit after
`warmup` rows, then refits on the last `history` rows at growing intervals: after as many
new rows as the last fit had seen in all, at most `refit_every` (warm-up 200: fits at
200, 400, 800, 1,600, then every 1,000). A young model improves fast, and a model that
has seen much changes little from one refit to the next, so refitting it as often costs
time for little (a transaction model's refit is ~0.2 CPU-s).
A model trained with `chainwatch train` and loaded at start is used as it is (frozen):
what was evaluated is what runs.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from chainwatch.schema import FeatureDeviation
from detector.fit_ahead import start_fit
from detector.models import AnomalyDetector, Scored

__all__ = ["BlockAnomalyModel", "Scored", "fits_within", "refit_interval"]


def refit_interval(seen: int, warmup: int, refit_every: int) -> int:
    """New rows after a fit, having seen `seen` rows in all, before the next refit is due."""
    return min(refit_every, max(warmup, seen))


def fits_within(rows: int, warmup: int, refit_every: int) -> int:
    """How many fits BlockAnomalyModel's schedule makes over `rows` rows learnt one by one."""
    fits, seen, next_at = 0, 0, warmup
    while seen + next_at <= rows:
        seen += next_at
        fits += 1
        next_at = refit_interval(seen, warmup, refit_every)
    return fits


class BlockAnomalyModel:
    def __init__(
        self,
        feature_names: tuple[str, ...],
        *,
        warmup: int = 200,
        refit_every: int = 1000,
        history: int = 5000,
        contamination: float = 0.01,
        n_estimators: int = 100,
        seed: int = 42,
        min_scale: tuple[float, ...] | None = None,
        z_limit: float = 12.0,
        tail_factor: float = 0.0,
        median_scale: tuple[float, ...] | None = None,
        feature_cuts: tuple[float, ...] | None = None,
        kind: str = "iforest",
        family: str = "block",
        pretrained: AnomalyDetector | None = None,
        fit_ahead: bool = False,
    ) -> None:
        self.feature_names = feature_names
        self.warmup = warmup
        self.refit_every = refit_every
        self.frozen = pretrained is not None
        self.fit_ahead = fit_ahead  # refits in a worker process (`detector.fit_ahead`)
        # a refit under way (fit_ahead): called, it gives the refitted model
        self._refit: Callable[[], AnomalyDetector] | None = None
        self._refit_version: str | None = None
        self._detector = pretrained or AnomalyDetector(
            family, feature_names, kind=kind, contamination=contamination, seed=seed,
            n_estimators=n_estimators, min_scale=min_scale, z_limit=z_limit,
            tail_factor=tail_factor, median_scale=median_scale, feature_cuts=feature_cuts,
        )
        # the last `history` rows learnt, as a ring buffer (the oldest row at `_next` once
        # full): one array instead of a deque of row views, which kept whole batch
        # matrices alive and cost a Python step per row
        self._capacity = history
        self._buffer: np.ndarray | None = None
        self._count = 0
        self._next = 0
        self._since_fit = 0
        self._seen = 0  # rows learnt in all (the history keeps the last `history`)
        self._next_fit = warmup  # rows after the last fit that make the next one due
        self.fits = 0

    @property
    def history(self) -> tuple[np.ndarray, ...]:
        """The rows kept for the next (re)fit, oldest first."""
        return tuple(self._window())

    def _window(self) -> np.ndarray:
        """The kept rows, oldest first, as one C-contiguous matrix (a copy)."""
        if self._buffer is None:
            return np.empty((0, len(self.feature_names)))
        if self._count < self._capacity:
            return self._buffer[: self._count].copy()
        return np.concatenate((self._buffer[self._next :], self._buffer[: self._next]))

    def _remember(self, x: np.ndarray) -> None:
        if len(x) == 0 or self._capacity <= 0:
            return
        if self._buffer is None:
            self._buffer = np.empty((self._capacity, x.shape[1]), dtype=x.dtype)
        elif self._buffer.dtype != np.result_type(self._buffer, x):
            self._buffer = self._buffer.astype(np.result_type(self._buffer, x))
        x = x[-self._capacity :]
        n = len(x)
        first = min(n, self._capacity - self._next)
        self._buffer[self._next : self._next + first] = x[:first]
        self._buffer[: n - first] = x[first:]
        self._next = (self._next + n) % self._capacity
        self._count = min(self._count + n, self._capacity)

    @property
    def detector(self) -> AnomalyDetector:
        """The model as of the last fit (waiting for a refit under way)."""
        if self._refit is not None:
            self._detector, self._refit = self._refit(), None
        return self._detector

    @property
    def fitted(self) -> bool:
        return self._refit is not None or self._detector.fitted

    @property
    def version(self) -> str | None:
        """The version of the last fit (known before a refit under way ends)."""
        return self._refit_version if self._refit is not None else self._detector.version

    @property
    def kind(self) -> str:
        return self._detector.kind

    def score(self, x: np.ndarray) -> Scored | None:
        """Score rows with the current model (None while warming up)."""
        if len(x) == 0 or not self.fitted:
            return None
        return self.detector.score(x)

    def learn(self, x: np.ndarray) -> bool:
        """Add rows to the training history; fit or refit when due. True if it (re)fitted."""
        if self.frozen:
            return False
        self._remember(x)
        self._since_fit += len(x)
        self._seen += len(x)
        due = (not self.fitted and self._count >= self.warmup) or (
            self.fitted and self._since_fit >= self._next_fit
        )
        if due:
            window = {"source": "live", "rows": self._count}
            if self.fit_ahead:  # (a refit still under way is superseded: same config)
                train = self._window()
                self._refit_version = self._detector.version_of(train)
                self._refit = start_fit(self._detector, train, window, self._refit_version)
            else:
                self.detector.fit(self._window(), window)
            self._since_fit = 0
            self._next_fit = refit_interval(self._seen, self.warmup, self.refit_every)
            self.fits += 1
        return due

    def explain(self, row: np.ndarray, top: int = 3) -> tuple[FeatureDeviation, ...]:
        return self.detector.explain(row, top)
