"""The replay speed-ups give the same numbers as the library paths they replace."""

from __future__ import annotations

import numpy as np
import pytest
from pyod.models.iforest import IForest

from detector.models import (
    COMPILED_MAX_ROWS,
    PARALLEL_MIN_ROWS,
    AnomalyDetector,
    _fit_pyod_iforest,
    forest_score_samples,
)


def _data(rows: int, seed: int = 7) -> np.ndarray:
    rng = np.random.default_rng(seed)
    x = rng.lognormal(0.0, 1.0, size=(rows, 6))
    x[:5] *= 40  # a few far outliers
    return x


def test_one_pass_iforest_fit_is_pyods_fit_bit_for_bit():
    x = _data(3_000)
    ours, theirs = IForest(contamination=0.01, random_state=3), IForest(
        contamination=0.01, random_state=3)
    assert _fit_pyod_iforest(ours, x)
    theirs.fit(x)
    assert np.array_equal(ours.decision_scores_, theirs.decision_scores_)
    assert ours.threshold_ == theirs.threshold_
    assert ours.detector_.offset_ == theirs.detector_.offset_
    assert np.array_equal(ours.labels_, theirs.labels_)
    probe = _data(500, seed=8)
    assert np.array_equal(ours.decision_function(probe), theirs.decision_function(probe))


def test_threaded_scoring_matches_sklearn():
    x = _data(PARALLEL_MIN_ROWS + 1_000)
    model = IForest(contamination=0.01, random_state=3).fit(x[:2_000])
    assert np.array_equal(forest_score_samples(model.detector_, x),
                          model.detector_.score_samples(x))


def test_trees_walked_on_threads_score_as_sklearn_bit_for_bit(monkeypatch):
    """Trees on feature subsets, NaN, a constant column, and a refit of the same object."""
    from sklearn.ensemble import IsolationForest

    from detector import models

    monkeypatch.setattr(models, "scoring_threads", lambda: 3)
    x = _data(PARALLEL_MIN_ROWS + 3_001, seed=9)
    x[:, 2] = 1.0
    x[7, 1] = np.nan
    for max_features in (1.0, 0.5):
        forest = IsolationForest(max_features=max_features, random_state=4).fit(x[:3_000])
        assert np.array_equal(forest_score_samples(forest, x), forest.score_samples(x))
        part = x[: PARALLEL_MIN_ROWS + 17]  # a smaller batch after a bigger one
        assert np.array_equal(forest_score_samples(forest, part), forest.score_samples(part))
        forest.set_params(random_state=5).fit(x[3_000:6_000])  # new trees, same object
        assert np.array_equal(forest_score_samples(forest, x), forest.score_samples(x))
    assert len(models._walkers) >= 1  # the threaded walk was taken


@pytest.mark.parametrize("kind", ["iforest", "sk_iforest"])
@pytest.mark.parametrize("rows", [COMPILED_MAX_ROWS + 1, PARALLEL_MIN_ROWS - 1,
                                  PARALLEL_MIN_ROWS + 5])
@pytest.mark.parametrize("threads", [1, 2])
def test_a_models_scores_past_the_compiled_path_are_its_estimators(
        kind, rows, threads, monkeypatch):
    """Above COMPILED_MAX_ROWS the trees are walked one by one (on this thread below
    PARALLEL_MIN_ROWS or with one CPU): the estimator's decision_function, bit for bit."""
    from detector import models

    monkeypatch.setattr(models, "scoring_threads", lambda: threads)
    x = _data(3_000, seed=12)
    model = AnomalyDetector("block", tuple("abcdef"), kind=kind, contamination=0.01)
    model.fit(x[:2_000])
    probe = _data(rows, seed=13)
    models._walkers.clear()  # a fit may have walked its training rows
    assert np.array_equal(model._raw(probe),
                          np.asarray(model._estimator.decision_function(probe)))
    assert list(models._walkers) == [model._forest()[0]]  # the walker was taken
