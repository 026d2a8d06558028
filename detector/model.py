"""Block anomaly model: our interface around PyOD's isolation forest.

Scores are normalised to [0, 1] against the training scores (0 = most normal seen,
1 = most abnormal seen); the threshold comes from the configured contamination.

An isolation forest cannot score a point beyond the training range higher than the
most extreme training point (its splits only cover that range), and it never splits on
a feature that was constant in training. A range guard covers both: a row whose robust
z-score on any feature exceeds `z_limit` is anomalous, with a score above the threshold
that grows with the deviation.
The model warms up on the first `warmup` complete blocks, then refits every
`refit_every` blocks on the last `history` blocks. Fixed seed: same data, same model.
Each finding is explained by the features furthest from their training median.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

import numpy as np
from pyod.models.iforest import IForest

from chainwatch.schema import FeatureDeviation


@dataclass(frozen=True)
class Scored:
    scores: np.ndarray  # normalised to [0, 1]
    anomalous: np.ndarray  # bool, raw score above the fitted threshold
    threshold: float  # normalised threshold


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
    ) -> None:
        if not 0 < contamination < 0.5:
            raise ValueError("contamination must be in (0, 0.5)")
        self.feature_names = feature_names
        self.warmup = warmup
        self.refit_every = refit_every
        self.contamination = contamination
        self.n_estimators = n_estimators
        self.seed = seed
        self.z_limit = z_limit
        self._min_scale = np.array(min_scale if min_scale else [0.0] * len(feature_names))
        self._rows: deque[np.ndarray] = deque(maxlen=history)
        self._since_fit = 0
        self._model: IForest | None = None
        self._lo = 0.0
        self._span = 1.0
        self._median = np.zeros(len(feature_names))
        self._scale = np.ones(len(feature_names))
        self.fits = 0
        self.version: str | None = None

    @property
    def fitted(self) -> bool:
        return self._model is not None

    def score(self, x: np.ndarray) -> Scored | None:
        """Score rows with the current model (None while warming up)."""
        if self._model is None or len(x) == 0:
            return None
        raw = self._model.decision_function(x)
        scores = np.clip((raw - self._lo) / self._span, 0.0, 1.0)
        threshold = float(np.clip((self._model.threshold_ - self._lo) / self._span, 0, 1))
        max_z = np.abs(self.robust_z(x)).max(axis=1)
        beyond = max_z > self.z_limit
        guard = threshold + (1.0 - threshold) * (1.0 - self.z_limit / np.maximum(max_z, 1e-12))
        scores = np.where(beyond, np.maximum(scores, guard), scores)
        return Scored(scores, (raw > self._model.threshold_) | beyond, threshold)

    def robust_z(self, x: np.ndarray) -> np.ndarray:
        """(x - training median) / robust scale, per feature."""
        return (x - self._median) / self._scale

    def learn(self, x: np.ndarray) -> bool:
        """Add rows to the training history; fit or refit when due. True if it (re)fitted."""
        for row in x:
            self._rows.append(row)
        self._since_fit += len(x)
        due = (self._model is None and len(self._rows) >= self.warmup) or (
            self._model is not None and self._since_fit >= self.refit_every
        )
        if due:
            self._fit(np.vstack(self._rows))
        return due

    def _fit(self, train: np.ndarray) -> None:
        model = IForest(
            n_estimators=self.n_estimators,
            contamination=self.contamination,
            random_state=self.seed,
        )
        model.fit(train)
        scores = model.decision_scores_
        self._lo = float(scores.min())
        self._span = max(float(scores.max()) - self._lo, 1e-12)
        self._median = np.median(train, axis=0)
        q75, q25 = np.percentile(train, [75, 25], axis=0)
        mad = np.median(np.abs(train - self._median), axis=0) * 1.4826
        # IQR-based scale, falling back to MAD and then to 1 for constant features
        scale = np.where((q75 - q25) > 0, (q75 - q25) / 1.349, mad)
        self._scale = np.maximum(np.where(scale > 0, scale, 1.0), self._min_scale)
        self._model = model
        self._since_fit = 0
        self.fits += 1
        self.version = f"iforest-{self.fits}-n{len(train)}-s{self.seed}"

    def explain(self, row: np.ndarray, top: int = 3) -> tuple[FeatureDeviation, ...]:
        """The `top` features furthest from their training median, in robust z units."""
        z = self.robust_z(row)
        order = np.argsort(-np.abs(z))[:top]
        return tuple(
            FeatureDeviation(
                feature=self.feature_names[i],
                value=float(row[i]),
                normal=float(self._median[i]),
                deviation=round(float(z[i]), 3),
            )
            for i in order
        )
