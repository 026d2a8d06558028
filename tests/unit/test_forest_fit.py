"""fit_isolation_forest grows the forest sklearn's IsolationForest.fit grows, bit for bit."""

from __future__ import annotations

from contextlib import nullcontext
from typing import Any

import numpy as np
import pytest
from sklearn.ensemble import IsolationForest
from sklearn.utils.random import sample_without_replacement

from detector.forest_fit import _draw_rows, _tracking_selection, fit_isolation_forest


def _assert_same(a: Any, b: Any, path: str = "forest") -> None:
    """Equal attribute for attribute, down to every tree's node and value arrays."""
    if isinstance(a, np.ndarray):
        assert isinstance(b, np.ndarray) and a.dtype == b.dtype and a.shape == b.shape, path
        assert a.tobytes() == b.tobytes(), path
    elif isinstance(a, list | tuple):
        assert type(a) is type(b) and len(a) == len(b), path
        for i, (p, q) in enumerate(zip(a, b, strict=True)):
            _assert_same(p, q, f"{path}[{i}]")
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), (path, set(a) ^ set(b))
        for key in a:
            _assert_same(a[key], b[key], f"{path}.{key}")
    elif type(a).__name__ == "Tree":  # sklearn's Cython tree: compare its whole state
        assert type(b) is type(a), path
        _assert_same(a.__getstate__(), b.__getstate__(), f"{path}.state")
    elif hasattr(a, "__dict__"):
        assert type(a) is type(b), path
        _assert_same(vars(a), vars(b), path)
    else:
        assert type(a) is type(b) and (a == b or (a != a and b != b)), (path, a, b)


def _not_called(*args: object) -> None:
    raise AssertionError("sklearn's fit was called")


def _rows(n: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 12))
    x[::97, 3] = np.nan  # missing values go where each tree sends them
    x[:, 5] = 1.0  # a constant feature
    x[::5, 7] = x[0, 7]  # many ties
    x[:3] *= 50  # a few far outliers
    return x


@pytest.mark.parametrize(
    ("rows", "settings"),
    [
        (50_000, {}),  # 256 of 50k: tracking selection, the vectorised draw
        (25_600, {}),  # exactly 1 %: still tracking selection
        (5_000, {}),  # a permutation
        (300, {}),
        (100, {}),  # fewer rows than 256: all of them
        (20_000, {"max_samples": 64}),
        (3_000, {"max_samples": 0.5, "n_estimators": 7}),
        (2_000, {"max_features": 12, "n_estimators": 10}),
    ],
)
def test_the_forest_is_sklearns_attribute_for_attribute(rows, settings, monkeypatch):
    x = _rows(rows, seed=rows)
    theirs = IsolationForest(random_state=rows % 97, **settings).fit(x)
    monkeypatch.setattr(IsolationForest, "fit", _not_called)  # ours grows it, not sklearn
    ours = fit_isolation_forest(IsolationForest(random_state=rows % 97, **settings), x)
    _assert_same(vars(theirs), vars(ours))
    monkeypatch.undo()
    probe = _rows(500, seed=1)
    assert np.array_equal(theirs.score_samples(probe), ours.score_samples(probe))


def test_a_refit_of_the_same_object_replaces_every_tree():
    x = _rows(6_000, seed=3)
    theirs = IsolationForest(random_state=4).fit(x[:3_000]).set_params(random_state=5)
    ours = fit_isolation_forest(IsolationForest(random_state=4), x[:3_000])
    fit_isolation_forest(ours.set_params(random_state=5), x[3_000:])
    _assert_same(vars(theirs.fit(x[3_000:])), vars(ours))


@pytest.mark.parametrize(
    "settings",
    [{"bootstrap": True}, {"max_features": 0.5}, {"random_state": None},
     {"contamination": 0.05}, {"max_samples": 10**6}],
)
def test_settings_it_does_not_cover_go_to_sklearns_fit(settings, monkeypatch):
    calls: list[int] = []
    original = IsolationForest.fit

    def counting_fit(self: IsolationForest, x: np.ndarray) -> IsolationForest:
        calls.append(1)
        return original(self, x)

    monkeypatch.setattr(IsolationForest, "fit", counting_fit)
    x = _rows(1_000, seed=2)
    forest = IsolationForest(**{"random_state": 1, **settings})
    with pytest.warns(UserWarning) if "max_samples" in settings else nullcontext():
        fit_isolation_forest(forest, x)
    assert calls == [1]
    assert len(forest.estimators_) == 100


def test_the_vectorised_row_draw_is_sklearns_draw():
    """Tracking selection over many seeds, including draws that repeat a row (a small
    population makes repeats common) and draws of every row but one."""
    for n_population, n_samples in [(50_000, 256), (30_000, 300), (100_000, 1_000)]:
        for seed in range(40):
            ours = _draw_rows(n_population, n_samples, np.random.RandomState(seed),
                              sample_without_replacement)
            theirs = sample_without_replacement(n_population, n_samples, random_state=seed)
            assert np.array_equal(ours, theirs), (n_population, n_samples, seed)


def test_repeats_are_drawn_again_as_sklearn_draws_them():
    """A population where repeats are certain: sklearn's loop, one randint at a time."""
    for seed in range(20):
        rng = np.random.RandomState(seed)
        kept: list[int] = []
        while len(kept) < 40:
            value = int(rng.randint(50))
            if value not in kept:
                kept.append(value)
        ours = _tracking_selection(50, 40, np.random.RandomState(seed))
        assert ours.tolist() == kept

