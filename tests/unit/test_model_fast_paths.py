"""The replay speed-ups give the same numbers as the library paths they replace."""

from __future__ import annotations

import numpy as np
import pytest
from pyod.models.iforest import IForest

from detector.models import (
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


def test_rows_walked_on_threads_score_as_sklearn_bit_for_bit(monkeypatch):
    """Trees on feature subsets, NaN (each tree sends it its own way), a constant column,
    infinities, and a refit of the same object."""
    from sklearn.ensemble import IsolationForest

    from detector import models

    monkeypatch.setattr(models, "scoring_threads", lambda: 3)
    x = _data(PARALLEL_MIN_ROWS + 3_001, seed=9)
    x[:, 2] = 1.0
    x[7, 1] = np.nan
    x[8:40, 3] = np.nan  # many rows with a missing value: both of a node's ways are taken
    x[41, 0], x[42, 4] = np.inf, -np.inf
    for max_features in (1.0, 0.5):
        forest = IsolationForest(max_features=max_features, random_state=4).fit(x[:3_000])
        assert np.array_equal(forest_score_samples(forest, x), forest.score_samples(x))
        part = x[: PARALLEL_MIN_ROWS + 17]  # a smaller batch after a bigger one
        assert np.array_equal(forest_score_samples(forest, part), forest.score_samples(part))
        forest.set_params(random_state=5).fit(x[3_000:6_000])  # new trees, same object
        assert np.array_equal(forest_score_samples(forest, x), forest.score_samples(x))
    assert len(models._compiled) >= 1  # the compiled walk was taken


@pytest.mark.parametrize("kind", ["iforest", "sk_iforest"])
@pytest.mark.parametrize("rows", [1, 31, 33, 257, PARALLEL_MIN_ROWS - 1, PARALLEL_MIN_ROWS + 5])
@pytest.mark.parametrize("threads", [1, 2])
def test_a_models_scores_are_its_estimators_bit_for_bit(kind, rows, threads, monkeypatch):
    """Any batch size (below and above the rows walked together, on this thread below
    PARALLEL_MIN_ROWS or with one CPU): the estimator's decision_function, bit for bit."""
    from detector import models

    monkeypatch.setattr(models, "scoring_threads", lambda: threads)
    x = _data(3_000, seed=12)
    model = AnomalyDetector("block", tuple("abcdef"), kind=kind, contamination=0.01)
    model.fit(x[:2_000])
    probe = _data(rows, seed=13)
    assert model.estimator is not None  # fitted
    expected = np.asarray(model.estimator.decision_function(probe))
    # the walk scores, compiled from these very trees; sklearn's own is not called
    walk, forest = model.compiled_walk(), model._forest()
    assert walk is not None and forest is not None  # an isolation forest, walked
    assert walk.source is forest[0].estimators_
    monkeypatch.setattr(model.estimator, "decision_function", None)
    assert np.array_equal(model._raw(probe), expected)


def test_children_sit_side_by_side_and_leaves_stay_put():
    """The layout `_walk` relies on: an inner node's right child is its left child's
    neighbour, a leaf points at itself and tests the zero column against +inf."""
    from sklearn.ensemble import IsolationForest

    from detector.forest import CompiledForest

    x = _data(2_000, seed=3)
    forest = IsolationForest(n_estimators=5, random_state=1).fit(x)
    compiled = CompiledForest(forest)
    # what the walk reads: each node packed as (left child << feature_bits) | feature
    child = compiled.node >> compiled.feature_bits
    feature = compiled.node & ((1 << compiled.feature_bits) - 1)
    ends = [*compiled.roots[1:], len(compiled.value)]
    for t, (start, end) in enumerate(zip(compiled.roots, ends, strict=True)):
        tree = forest.estimators_[t].tree_
        assert end - start == tree.node_count
        nodes = np.arange(start, end)
        leaf = compiled.cut[nodes] == np.inf
        assert leaf.sum() == (tree.children_left == -1).sum()
        assert np.array_equal(child[nodes[leaf]], nodes[leaf])
        assert (feature[nodes[leaf]] == x.shape[1]).all()
        inner = nodes[~leaf]
        kids = np.concatenate([child[inner], child[inner] + 1])
        assert len(set(kids.tolist())) == 2 * len(inner)  # every node has one parent
        assert ((kids >= start) & (kids < end)).all()


def test_the_walk_compiles_where_no_cache_directory_can_be_written(monkeypatch):
    """A read-only install without a writable home (numba finds no cache locator) still
    imports and scores: the walk is compiled in the process instead of cached."""
    import numba
    from numba.core.caching import CacheImpl

    from detector.compiled import compiled as _compile

    def double(x: float) -> float:
        return 2.0 * x

    monkeypatch.setattr(CacheImpl, "_locator_classes", [])
    with pytest.raises(RuntimeError, match="no locator"):  # what numba itself does
        numba.njit(cache=True)(double)
    compiled = _compile(double)
    assert compiled(2.5) == 5.0
    assert compiled._cache.__class__.__name__ == "NullCache"


def test_float32_cuts_split_every_float32_as_the_float64_threshold_does():
    """The walk compares float32 rows with float32 cuts: each cut must send every float32
    the way its float64 threshold does, at and around the threshold (where rounding to
    the nearest float32 would send the rounded-up value wrong), at the float32 range's
    ends and beyond it."""
    from detector.forest import float32_cuts

    rng = np.random.default_rng(21)
    thresholds = np.concatenate([
        rng.standard_normal(20_000) * 10.0 ** rng.integers(-30, 30, 20_000),
        rng.standard_normal(1_000).astype(np.float32).astype(np.float64),  # exact ones
        [0.0, -0.0, 1e-45, -1e-45, 3.5e38, -3.5e38, 1e300, -1e300, np.inf],
    ])
    cuts = float32_cuts(thresholds)
    assert cuts.dtype == np.float32
    with np.errstate(over="ignore"):
        nearest = thresholds.astype(np.float32)
        probes = [nearest, np.nextafter(nearest, np.float32(np.inf)),
                  np.nextafter(nearest, np.float32(-np.inf)), cuts,
                  np.nextafter(cuts, np.float32(np.inf)),
                  np.full_like(cuts, np.inf), np.full_like(cuts, -np.inf)]
    for v in probes:
        assert np.array_equal(v <= cuts, v.astype(np.float64) <= thresholds)
    assert (nearest.astype(np.float64) > thresholds).any()  # rounding up happens: tested
