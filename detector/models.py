"""Our anomaly-detector interface around PyOD (and sklearn), with persistence.

Every family of features (blocks, transactions, miners) uses the same contract:
higher score = more abnormal, scores normalised to [0, 1] against the training scores,
a threshold from the configured contamination, fixed seeds, and an explanation (the
features furthest from their training median, in robust z units).

Kinds: `iforest` (PyOD IForest, the default: fast per event), `hbos` (fastest), `ecod`
and `copod` (rescore against the training set on every call: for batch and replay),
`sk_iforest` (scikit-learn's IsolationForest directly).

An isolation forest cannot score a point beyond the training range higher than the
most extreme training point, and it never splits on a feature that was constant in
training. A range guard covers both: a row whose robust z-score on any feature exceeds
`z_cut` is anomalous, with a score above the threshold that grows with the deviation.
`z_cut` is `z_limit`, or with a `tail_factor` that many times the deviation the training
rows themselves reach at the contamination quantile, if larger: "far beyond what this
chain's normal traffic does". A feature with its own entry in `feature_cuts` has that cut
instead (and is left out of the tail): a feature that is already a z-score against a
live reference (a fee against the fee market, in log space) has a known scale. A
`median_scale` measures a feature's deviation in units of its own typical value at least
(block intervals in slots).
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import warnings
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from chainwatch import __version__
from chainwatch.exceptions import ChainwatchError
from chainwatch.schema import FeatureDeviation
from detector.compiled import compiled
from detector.forest import CompiledForest
from detector.forest_fit import fit_isolation_forest
from detector.pools import pool

MODEL_KINDS: tuple[str, ...] = ("iforest", "hbos", "ecod", "copod", "sk_iforest")


class ModelError(ChainwatchError):
    """A saved model cannot be used (missing, unreadable, or for other features)."""


class _Estimator(Protocol):
    threshold_: float
    decision_scores_: np.ndarray

    def fit(self, x: np.ndarray) -> Any: ...

    def decision_function(self, x: np.ndarray) -> np.ndarray: ...


class _SkIsolationForest:
    """sklearn's IsolationForest with PyOD's conventions (higher = more abnormal)."""

    def __init__(self, n_estimators: int, contamination: float, random_state: int) -> None:
        from sklearn.ensemble import IsolationForest

        self.contamination = contamination
        self._model = IsolationForest(
            n_estimators=n_estimators, contamination="auto", random_state=random_state
        )

    def fit(self, x: np.ndarray) -> _SkIsolationForest:
        fit_isolation_forest(self._model, x)
        self.decision_scores_ = self.decision_function(x)
        quantile = 100 * (1 - self.contamination)
        self.threshold_ = float(np.percentile(self.decision_scores_, quantile))
        return self

    def decision_function(self, x: np.ndarray) -> np.ndarray:
        return -np.asarray(self._model.score_samples(x))


def make_estimator(kind: str, contamination: float, seed: int, n_estimators: int) -> _Estimator:
    if kind == "iforest":
        from pyod.models.iforest import IForest

        return IForest(n_estimators=n_estimators, contamination=contamination, random_state=seed)
    if kind == "hbos":
        from pyod.models.hbos import HBOS

        return HBOS(contamination=contamination)
    if kind == "ecod":
        from pyod.models.ecod import ECOD

        return ECOD(contamination=contamination)
    if kind == "copod":
        from pyod.models.copod import COPOD

        return COPOD(contamination=contamination)
    if kind == "sk_iforest":
        return _SkIsolationForest(n_estimators, contamination, seed)
    raise ModelError(f"unknown model kind {kind!r}: choose one of {', '.join(MODEL_KINDS)}")


PARALLEL_MIN_ROWS = 2_048  # fewer rows are walked on the caller's thread (handing over costs more)
# each fitted forest compiled, for as long as the forest lives (a refit makes a new one)
_compiled: weakref.WeakKeyDictionary[Any, CompiledForest] = weakref.WeakKeyDictionary()


def usable_cpus() -> int:
    """The CPUs this process may use (its affinity: a container's cpuset, `taskset`)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - not on Linux
        return os.cpu_count() or 1


def scoring_threads() -> int:
    """Threads for scoring big batches: the CPUs this process may use, at most 4."""
    return min(usable_cpus(), 4)


def forest_score_samples(forest: Any, x: np.ndarray) -> np.ndarray:
    """sklearn's `IsolationForest.score_samples(x)`, bit for bit, by the compiled walk
    (`CompiledForest`)."""
    return walk_score_samples(_walk_of(forest), x)


def _walk_of(forest: Any) -> CompiledForest:
    """The forest's compiled walk, compiled once: a fit walks its training rows, and the
    fitted model then keeps that same walk to score with."""
    compiled = _compiled.get(forest)
    if compiled is None or compiled.source is not forest.estimators_:
        compiled = _compiled[forest] = CompiledForest(forest)
    return compiled


def walk_score_samples(compiled: CompiledForest, x: np.ndarray) -> np.ndarray:
    """A compiled forest's `score_samples(x)`; a big batch (a replay batch of 75k
    transactions, a refit's 50k training rows) has its rows split over several threads."""
    threads = scoring_threads() if len(x) >= PARALLEL_MIN_ROWS else 1
    if threads < 2:
        return compiled.score_samples(x)
    return compiled.score_samples(x, pool("forest-score", threads), threads)


def checked_rows(x: np.ndarray) -> np.ndarray:
    """`sklearn.utils.check_array(x)` as the estimators' decision_function applies it
    before a forest is walked: the same rows, or the same refusals (a ValueError for rows
    that are not 2-D, none at all, or not all finite). Here so that scoring with a
    loaded model does not import sklearn (~1 s of every replay's start)."""
    rows = np.asarray(x)
    if rows.dtype.kind not in "biuf":
        rows = rows.astype(np.float64)
    if rows.ndim != 2:
        raise ValueError(f"Expected 2D array, got {rows.ndim}D array instead")
    if not len(rows) or not rows.shape[1]:
        raise ValueError(f"Found array with shape {rows.shape}: at least one row and "
                         "one feature are required")
    if not np.isfinite(rows).all():
        raise ValueError("Input contains NaN or infinity")
    return rows


@compiled
def _deviations_of(  # pragma: no cover - compiled; tests compare it with numpy's steps
    x: np.ndarray, median: np.ndarray, scale: np.ndarray, cuts: np.ndarray,
    largest: np.ndarray, past: np.ndarray,
) -> None:
    """largest[i] = max_j |(x[i,j] - median[j]) / scale[j]|, past[i] = the same of each
    |z| / cuts[j]: numpy's arithmetic, in its order, NaN when a row holds NaN as
    `max` gives. Scale and cuts are positive and finite (the caller checks)."""
    rows, columns = x.shape
    for i in range(rows):
        top_z = top_past = 0.0
        missing = False
        for j in range(columns):
            z = abs((x[i, j] - median[j]) / scale[j])
            if z != z:
                missing = True
            ratio = z / cuts[j]
            if j == 0 or z > top_z:
                top_z = z
            if j == 0 or ratio > top_past:
                top_past = ratio
        largest[i] = np.nan if missing else top_z
        past[i] = np.nan if missing else top_past


def _is_pyod_iforest(estimator: Any) -> bool:
    try:
        from pyod.models.iforest import IForest
    except ImportError:  # pragma: no cover - a dependency
        return False
    return type(estimator) is IForest


def _fit_pyod_iforest(estimator: Any, train: np.ndarray) -> bool:
    """PyOD's `IForest.fit`, scoring the training rows once instead of twice.

    PyOD fits sklearn's IsolationForest with the contamination, so sklearn scores every
    training row for `offset_`, then PyOD scores them all again for `decision_scores_`:
    two full passes of 100 trees over up to 50k rows on every refit. Here the forest is
    grown with contamination "auto" (which only skips that scoring: trees and random
    draws are the same; `fit_isolation_forest` grows it), the rows are scored once, and
    `offset_` and the decision scores are derived from that one pass exactly as sklearn
    and PyOD compute them: the fitted estimator is the same, attribute for attribute and
    bit for bit. False (nothing done) for any other estimator, which the caller then
    fits the usual way.
    """
    try:
        from pyod.utils.utility import invert_order
        from sklearn.ensemble import IsolationForest
        from sklearn.utils import check_array
    except ImportError:  # pragma: no cover - both are dependencies
        return False
    if not _is_pyod_iforest(estimator):
        return False
    x = check_array(train)
    estimator._set_n_classes(None)
    forest = IsolationForest(
        n_estimators=estimator.n_estimators, max_samples=estimator.max_samples,
        contamination="auto", max_features=estimator.max_features,
        bootstrap=estimator.bootstrap, n_jobs=estimator.n_jobs,
        random_state=estimator.random_state, verbose=estimator.verbose,
    )
    fit_isolation_forest(forest, x)
    samples = forest_score_samples(forest, x)
    forest.set_params(contamination=estimator.contamination)
    forest.offset_ = np.percentile(samples, 100.0 * estimator.contamination)
    estimator.detector_ = forest
    estimator.decision_scores_ = invert_order(samples - forest.offset_)
    estimator._process_decision_scores()
    return True


def feature_schema_hash(family: str, feature_names: tuple[str, ...]) -> str:
    """Identifies the feature layout a model was trained on (names, order, family)."""
    text = json.dumps({"family": family, "features": list(feature_names)})
    return hashlib.sha256(text.encode()).hexdigest()[:16]


@dataclass(frozen=True)
class Scored:
    scores: np.ndarray  # normalised to [0, 1]
    anomalous: np.ndarray  # bool
    threshold: float  # normalised threshold
    max_z: np.ndarray  # each row's largest |robust z| over the features
    beyond: np.ndarray  # bool: some feature's |robust z| past its cut (the range guard fired)


class AnomalyDetector:
    """One fitted model for one feature family."""

    def __init__(
        self,
        family: str,
        feature_names: tuple[str, ...],
        *,
        kind: str = "iforest",
        contamination: float = 0.01,
        seed: int = 42,
        n_estimators: int = 100,
        min_scale: tuple[float, ...] | None = None,
        z_limit: float = 12.0,
        tail_factor: float = 0.0,
        median_scale: tuple[float, ...] | None = None,
        feature_cuts: tuple[float, ...] | None = None,
    ) -> None:
        if not 0 < contamination < 0.5:
            raise ValueError("contamination must be in (0, 0.5)")
        if kind not in MODEL_KINDS:
            raise ModelError(f"unknown model kind {kind!r}: choose one of {', '.join(MODEL_KINDS)}")
        self.family = family
        self.feature_names = feature_names
        self.kind = kind
        self.contamination = contamination
        self.seed = seed
        self.n_estimators = n_estimators
        self.z_limit = z_limit
        self.tail_factor = tail_factor
        self.tail_z = 0.0  # training rows' largest |z| at the contamination quantile
        # per feature: its own cut, or 0 for the shared z_cut
        self._feature_cuts = np.array(feature_cuts if feature_cuts
                                      else [0.0] * len(feature_names))
        self._min_scale = np.array(min_scale if min_scale else [0.0] * len(feature_names))
        # a floor on each feature's scale as a fraction of its training median: a block
        # interval's deviation is measured in slots, not seconds (a missed slot is normal)
        self._median_scale = np.array(median_scale if median_scale
                                      else [0.0] * len(feature_names))
        # the fitted estimator; a loaded (unpickled) model keeps it pickled until it is
        # needed (see `estimator`): scoring an isolation forest reads only what follows
        self._est: _Estimator | None = None
        self._est_pickle: bytes | None = None
        self._threshold = 0.0  # the estimator's threshold_ (its raw units)
        self._walk: CompiledForest | None = None  # an isolation forest's, compiled
        self._offset = 0.0  # our decision_function = _offset - the walk's score_samples
        self._lo = 0.0
        self._span = 1.0
        self._median = np.zeros(len(feature_names))
        self._scale = np.ones(len(feature_names))
        self.trained_rows = 0
        self.training_window: dict[str, Any] = {}
        self.version: str | None = None

    @property
    def schema_hash(self) -> str:
        return feature_schema_hash(self.family, self.feature_names)

    @property
    def fitted(self) -> bool:
        return self._est is not None or self._est_pickle is not None

    @property
    def estimator(self) -> _Estimator | None:
        """The fitted PyOD or sklearn estimator. A loaded model unpickles it only here, on
        first use: that imports PyOD and sklearn (~1 s), which scoring an isolation
        forest does not need (it walks `_walk`)."""
        if self._est is None and self._est_pickle is not None:
            self._est, self._est_pickle = pickle.loads(self._est_pickle), None
        return self._est

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        if state["_est"] is not None:
            state["_est"] = None
            state["_est_pickle"] = pickle.dumps(self._est, protocol=pickle.HIGHEST_PROTOCOL)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        older = "_estimator" in state  # saved before the estimator was kept pickled
        if older:
            state["_est"], state["_est_pickle"] = state.pop("_estimator"), None
        self.__dict__.update(state)
        if older:
            self._take_scoring_state()

    def _take_scoring_state(self) -> None:
        """What scoring reads, from the fitted estimator: its threshold and, for an
        isolation forest, the compiled walk (the one fitting built, if any)."""
        self._threshold = float(self._est.threshold_) if self._est is not None else 0.0
        found = self._forest()
        self._walk, self._offset = ((_walk_of(found[0]), found[1]) if found is not None
                                    else (None, 0.0))

    def blank(self) -> AnomalyDetector:
        """An unfitted model configured as this one (what a refit starts from)."""
        return AnomalyDetector(
            self.family, self.feature_names, kind=self.kind, contamination=self.contamination,
            seed=self.seed, n_estimators=self.n_estimators, min_scale=tuple(self._min_scale),
            z_limit=self.z_limit, tail_factor=self.tail_factor,
            median_scale=tuple(self._median_scale), feature_cuts=tuple(self._own_cuts()),
        )

    def fit(
        self, train: np.ndarray, training_window: dict[str, Any] | None = None,
        *, version: str | None = None,
    ) -> None:
        """Fit on `train`. `version`: `version_of(train)`, when the caller has it already."""
        estimator = make_estimator(self.kind, self.contamination, self.seed, self.n_estimators)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # constant features are fine for our guard
            if not _fit_pyod_iforest(estimator, train):
                estimator.fit(train)
        scores = np.asarray(estimator.decision_scores_)
        self._lo = float(scores.min())
        self._span = max(float(scores.max()) - self._lo, 1e-12)
        self._median = np.median(train, axis=0)
        q75, q25 = np.percentile(train, [75, 25], axis=0)
        mad = np.median(np.abs(train - self._median), axis=0) * 1.4826
        scale = np.where((q75 - q25) > 0, (q75 - q25) / 1.349, mad)
        floor = np.maximum(self._min_scale, self._median_scale * np.abs(self._median))
        self._scale = np.maximum(np.where(scale > 0, scale, 1.0), floor)
        shared = self._own_cuts() <= 0
        if self.tail_factor > 0 and len(train) and shared.any():
            deviation = np.abs(self.robust_z(train))[:, shared].max(axis=1)
            self.tail_z = float(np.quantile(deviation, 1.0 - self.contamination))
        self._est, self._est_pickle = estimator, None
        self._take_scoring_state()
        self.trained_rows = len(train)
        self.training_window = dict(training_window or {})
        self.version = version or self.version_of(train)

    def version_of(self, train: np.ndarray) -> str:
        """The version a fit on `train` gets: family, kind, rows, seed and the rows' hash."""
        digest = hashlib.sha256(train.tobytes()).hexdigest()[:8]
        return f"{self.family}-{self.kind}-n{len(train)}-s{self.seed}-{digest}"

    def _raw(self, x: np.ndarray) -> np.ndarray:
        """The estimator's decision_function (higher = more abnormal).

        An isolation forest is scored by the compiled walk (`walk_score_samples`, equal
        bit for bit, without sklearn's ~5 ms per call and at twice its speed per row).
        """
        if self._walk is not None:
            return self._offset - walk_score_samples(self._walk, checked_rows(x))
        return np.asarray(self.estimator.decision_function(x))  # type: ignore[union-attr]

    def _forest(self) -> tuple[Any, float] | None:
        """The sklearn IsolationForest inside and the offset that makes its negated
        score_samples our decision_function; None for other kinds of model."""
        if self.kind == "iforest" and _is_pyod_iforest(self._est):
            forest = getattr(self._est, "detector_", None)  # PyOD: -(score - offset_)
            offset = float(getattr(forest, "offset_", 0.0))
        elif self.kind == "sk_iforest":  # ours: -score_samples
            forest = getattr(self._est, "_model", None)
            offset = 0.0
        else:
            return None
        return None if forest is None else (forest, offset)

    def robust_z(self, x: np.ndarray) -> np.ndarray:
        return (x - self._median) / self._scale

    def compiled_walk(self) -> CompiledForest | None:
        """The compiled walk of this model's isolation forest (None for other kinds)."""
        return self._walk

    @property
    def z_cut(self) -> float:
        """The shared deviation beyond which a row is anomalous whatever the model says."""
        # models saved before the tail existed have neither attribute
        tail = getattr(self, "tail_factor", 0.0) * getattr(self, "tail_z", 0.0)
        return max(self.z_limit, tail)

    def _own_cuts(self) -> np.ndarray:
        own = getattr(self, "_feature_cuts", None)  # absent in models saved before it existed
        return own if own is not None else np.zeros(len(self.feature_names))

    @property
    def cuts(self) -> np.ndarray:
        """Each feature's cut: its own, or the shared z_cut."""
        own = self._own_cuts()
        return np.where(own > 0, own, self.z_cut)

    def score(self, x: np.ndarray) -> Scored:
        if not self.fitted:
            raise ModelError(f"the {self.family} model is not fitted")
        raw = self._raw(x)
        scores = np.clip((raw - self._lo) / self._span, 0.0, 1.0)
        threshold = float(np.clip((self._threshold - self._lo) / self._span, 0, 1))
        largest, past = self._deviations(x)  # past > 1: beyond a cut
        beyond = past > 1.0
        guard = threshold + (1.0 - threshold) * (1.0 - 1.0 / np.maximum(past, 1e-12))
        scores = np.where(beyond, np.maximum(scores, guard), scores)
        anomalous = (raw > self._threshold) | beyond
        return Scored(scores, anomalous, threshold, largest, beyond)

    def _deviations(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Each row's largest |robust z| and largest |robust z| / cut: `_deviations_of`
        in one pass (numpy's five passes over a 75k-row batch took ~10 ms, this ~1 ms);
        numpy's own steps where a zero or non-finite scale or cut would divide by zero."""
        cuts = self.cuts
        rows = np.asarray(x, dtype=np.float64)
        if (rows.ndim != 2 or not (np.isfinite(self._scale).all() and (self._scale > 0).all()
                                   and np.isfinite(cuts).all() and (cuts > 0).all())):
            z = np.abs(self.robust_z(rows))
            return z.max(axis=1), (z / cuts).max(axis=1)
        largest, past = np.empty(len(rows)), np.empty(len(rows))
        _deviations_of(np.ascontiguousarray(rows), self._median.astype(np.float64),
                       self._scale.astype(np.float64), cuts.astype(np.float64), largest, past)
        return largest, past

    def explain(self, row: np.ndarray, top: int = 3) -> tuple[FeatureDeviation, ...]:
        z = self.robust_z(row)
        order = np.argsort(-np.abs(z) / self.cuts, kind="stable")[:top]  # nearest its cut first
        return tuple(
            FeatureDeviation(feature=self.feature_names[i], value=float(row[i]),
                             normal=float(self._median[i]), deviation=round(float(z[i]), 3))
            for i in order
        )

    # -- persistence -----------------------------------------------------------------

    def metadata(self) -> dict[str, Any]:
        return {
            "family": self.family,
            "kind": self.kind,
            "feature_names": list(self.feature_names),
            "feature_schema_hash": self.schema_hash,
            "training_window": self.training_window,
            "trained_rows": self.trained_rows,
            "contamination": self.contamination,
            "seed": self.seed,
            "feature_cuts": [float(c) for c in self.cuts],
            "version": self.version,
            "chainwatch_version": __version__,
        }

    def save(self, path: Path) -> None:
        from pyod.utils.persistence import save

        if not self.fitted:
            raise ModelError(f"cannot save the {self.family} model before it is fitted")
        path.parent.mkdir(parents=True, exist_ok=True)
        save(self, path, metadata=self.metadata())

    @staticmethod
    def load(path: Path, family: str, feature_names: tuple[str, ...]) -> AnomalyDetector:
        """Load a saved model; refuse one trained on other features (one-line ModelError)."""
        if not path.is_file():
            raise ModelError(f"no model file at {path}")
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                model, meta = _read_saved(path)
        except Exception as exc:  # joblib/pickle errors of every kind
            raise ModelError(f"model file {path} is unreadable: {type(exc).__name__}") from None
        expected = feature_schema_hash(family, feature_names)
        if not isinstance(model, AnomalyDetector) or meta.get("feature_schema_hash") != expected:
            raise ModelError(
                f"model {path.name} was trained on other features "
                f"(schema {meta.get('feature_schema_hash')}, this chainwatch expects "
                f"{expected} for {family}): retrain with `chainwatch train`"
            )
        return model


def _read_saved(path: Path) -> tuple[Any, dict[str, Any]]:
    """The model in a file written by `AnomalyDetector.save` (PyOD's envelope around it)
    and the envelope's metadata. Read with joblib, which PyOD's `load` also does first:
    importing PyOD imports sklearn (~1 s), which a model saved with its estimator pickled
    apart (see `AnomalyDetector.estimator`) does not need. A file joblib alone cannot read
    goes to PyOD's `load`, which can repair sklearn trees pickled by another release."""
    import joblib

    try:
        saved = joblib.load(path)
    except ValueError:
        from pyod.utils.persistence import load

        model, envelope = load(path, return_metadata=True, trusted=True)
        return model, (envelope or {}).get("metadata") or {}
    if isinstance(saved, dict) and "model" in saved and "_pyod_persistence_version" in saved:
        return saved["model"], saved.get("metadata") or {}
    return saved, {}
