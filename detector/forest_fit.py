"""Growing an isolation forest: sklearn's `IsolationForest.fit`, without its per-tree Python.

sklearn builds each of the 100 trees through its generic bagging code: it clones the
template tree (parameter introspection), seeds three fresh `RandomState`s (each seeded
from the OS first, then re-seeded), draws the tree's 256 rows one `randint` call at a
time, and fits the tree on all training rows weighted 0 or 1 (a 50k-row weight vector
checked and scanned per tree). The trees themselves take less than a third of the time.
A live transaction model refits ~56 times per 10M transactions, the block model every
1,000 blocks: that overhead was most of a replay's refit cost.

`fit_isolation_forest` does the same steps in the same order with the same random
draws: one `RandomState` re-seeded where sklearn makes a new one, the row draw
vectorised (the same stream of draws, the same rows), and each tree fitted by sklearn's
own `_fit` on just its rows, in ascending order, which is the order the weighted fit
visits them in. The result is the forest `IsolationForest.fit` makes, attribute for
attribute and bit for bit (a test compares them). Any setting this does not cover
(sample weights, bootstrap, feature subsets, warm start, parallel jobs, no fixed seed,
sparse input) goes to sklearn's own `fit`. It follows sklearn's private steps, so the
test that compares the two runs against the installed release (pinned below 2).
"""

from __future__ import annotations

import numbers
from typing import Any

import numpy as np

MAX_INT = np.iinfo(np.int32).max


def fit_isolation_forest(forest: Any, x: np.ndarray) -> Any:
    """`forest.fit(x)` for a scikit-learn IsolationForest, faster where it can be."""
    if not _covered(forest, x):
        return forest.fit(x)
    try:  # sklearn's own pieces (a release without them is fitted sklearn's way)
        from sklearn.ensemble._bagging import _get_n_samples_bootstrap
        from sklearn.ensemble._iforest import _average_path_length
        from sklearn.utils.random import sample_without_replacement
        from sklearn.utils.validation import validate_data
    except ImportError:  # pragma: no cover - scikit-learn 1.9 has them all
        return forest.fit(x)

    forest._validate_params()
    rows = validate_data(
        forest, x, accept_sparse=["csc"], dtype=np.float32, ensure_all_finite=False
    )
    rng = np.random.RandomState(forest.random_state)  # IsolationForest.fit's own
    y = rng.uniform(size=rows.shape[0])
    n_samples, n_features = rows.shape
    max_samples = _max_samples(forest.max_samples, n_samples)
    forest.max_samples_ = max_samples
    max_depth = int(np.ceil(np.log2(max(max_samples, 2))))

    # BaseBagging._fit
    rng.seed(forest.random_state)
    forest._n_samples = n_samples
    y = forest._validate_y(y)
    forest._validate_estimator(forest._get_estimator())
    forest.estimator_.max_depth = max_depth
    max_samples = _get_n_samples_bootstrap(n_samples, max_samples, None)
    forest._max_samples = max_samples
    max_features = forest.max_features
    if not isinstance(max_features, numbers.Integral):
        max_features = int(max_features * forest.n_features_in_)
    max_features = max(1, int(max_features))
    forest._max_features = max_features
    forest._sample_weight = None
    seeds = rng.randint(MAX_INT, size=forest.n_estimators)
    forest._seeds = seeds

    template = forest.estimator_
    tree_class, params = type(template), template.get_params(deep=False)
    estimators, features_drawn = [], []
    for seed in seeds:
        # _make_estimator: a clone whose random_state is the seed's first draw
        rng.seed(seed)
        tree = tree_class(**{**params, "random_state": rng.randint(MAX_INT)})
        # _generate_bagging_indices: features, then rows, from a state seeded with the seed
        rng.seed(seed)
        features = sample_without_replacement(n_features, max_features, random_state=rng)
        drawn = _draw_rows(n_samples, max_samples, rng, sample_without_replacement)
        picked = np.unique(drawn)  # the rows a 0/1 weight vector keeps, in its order
        rng.seed(tree.random_state)  # the tree's own check_random_state(random_state)
        seed_kept, tree.random_state = tree.random_state, rng
        tree._fit(rows[picked], y[picked], sample_weight=None, check_input=False)
        tree.random_state = seed_kept
        estimators.append(tree)
        features_drawn.append(features)
    forest.estimators_ = estimators
    forest.estimators_features_ = features_drawn

    # the rest of IsolationForest.fit (contamination "auto": no scoring)
    # sklearn's per-tree call, made once over all trees' nodes (the same values, elementwise)
    counts = [t.tree_.n_node_samples for t in estimators]
    lengths = _average_path_length(np.concatenate(counts))
    forest._average_path_length_per_tree = tuple(
        np.split(lengths, np.cumsum([len(c) for c in counts])[:-1])
    )
    forest._decision_path_lengths = tuple(t.tree_.compute_node_depths() for t in estimators)
    forest.offset_ = -0.5
    return forest


def _covered(forest: Any, x: Any) -> bool:
    """The settings this module reproduces (chainwatch's forests use only these)."""
    from sklearn import get_config
    from sklearn.ensemble import IsolationForest

    return (
        type(forest) is IsolationForest
        and isinstance(x, np.ndarray) and x.ndim == 2 and len(x) > 0
        and isinstance(forest.random_state, numbers.Integral)
        and forest.contamination == "auto"
        and not forest.bootstrap and not forest.warm_start
        and forest.n_jobs in (None, 1) and forest.verbose == 0
        and forest.max_features in (1.0, x.shape[1])
        and not (isinstance(forest.max_samples, numbers.Integral)
                 and int(forest.max_samples) > len(x))  # sklearn warns and takes them all
        and not get_config().get("enable_metadata_routing", False)
    )


def _max_samples(setting: Any, n_samples: int) -> int:
    """IsolationForest.fit's rows per tree (`_covered` left out more than there are)."""
    if isinstance(setting, str) and setting == "auto":
        return min(256, n_samples)
    if isinstance(setting, numbers.Integral):
        return int(setting)
    return int(setting * n_samples)


def _draw_rows(
    n_population: int, n_samples: int, rng: np.random.RandomState, sample: Any
) -> np.ndarray:
    """sklearn's `sample_without_replacement(n_population, n_samples, rng)`, the same draws.

    For few rows out of many (under 1 %, a 50k-row history) sklearn uses tracking
    selection: `rng.randint(n_population)` one call at a time, a draw already taken drawn
    again. Drawing them as one vector gives the same stream, so keeping each value not
    seen before, in order, gives the same rows; drawing past the last one kept does not
    matter (sklearn's state is dropped after this draw). Other ratios go to sklearn.
    """
    ratio = n_samples / n_population if n_population != 0 else 1.0
    if (0.01 < ratio < 0.99) or ratio >= 0.2:
        return np.asarray(sample(n_population, n_samples, random_state=rng))
    return _tracking_selection(n_population, n_samples, rng)


def _tracking_selection(
    n_population: int, n_samples: int, rng: np.random.RandomState
) -> np.ndarray:
    """The first `n_samples` distinct values of `rng.randint(n_population)`'s stream."""
    drawn = np.empty(0, dtype=int)
    while True:
        drawn = np.concatenate([drawn, rng.randint(n_population, size=n_samples + 8)])
        _, first = np.unique(drawn, return_index=True)  # each value's first draw
        if len(first) >= n_samples:
            return drawn[np.sort(first)[:n_samples]]
