"""A fitted isolation forest as flat arrays, scored by a compiled (numba) walk.

scikit-learn scores an isolation forest one tree at a time: through joblib (about 100
Python-level calls, ~10-15 ms before the first row is scored) and, inside each tree, one
row after the other down a branch the CPU cannot predict (~45 ns per row and tree here).
That walk was most of replay's cost: 4.6 CPU-us per transaction.

Here every tree's nodes live in shared arrays, renumbered breadth first so that a
node's two children sit side by side (`child[node] + went_right`: no branch). A block of
rows goes down one tree together, so the CPU overlaps their independent walks; the block
is copied feature-major first and each node is one packed integer (left child and
feature) and one float32 threshold, which halved the walk's time again. Every walk
takes the same number of steps (the deepest tree's); a leaf points at itself and tests
the "leaf column" (0.0, appended to the rows) against +inf, so it stays put.
About 1 us per transaction on one core; threads take row ranges (the walk holds no GIL).

The scores equal sklearn's `score_samples` bit for bit (tests compare): rows are rounded
to float32 first as sklearn does, and each float64 threshold is replaced by the largest
float32 not above it, which splits every float32 exactly as the threshold does
(`float32_cuts`); NaN goes where each tree sends missing values (sklearn's
`missing_go_to_left`), and each row's leaf values are added tree 0, 1, 2 ... into 0.0,
sklearn's order. Pure computation, no I/O.
"""

from __future__ import annotations

from concurrent.futures import Executor
from itertools import pairwise
from typing import Any

import numpy as np

from detector.compiled import compiled

_ROWS_TOGETHER = 32  # rows walked down a tree side by side (16-64 measured alike)


def _average_path_length(n: np.ndarray) -> np.ndarray:
    """c(n): average path length of an unsuccessful search in a BST of n points."""
    n = np.asarray(n, dtype=np.float64)
    out = np.zeros_like(n)
    out[n == 2] = 1.0
    big = n > 2
    out[big] = 2.0 * (np.log(n[big] - 1.0) + np.euler_gamma) - 2.0 * (n[big] - 1.0) / n[big]
    return out


@compiled
def _walk(  # pragma: no cover - compiled; the tests compare its results with sklearn's
    x: np.ndarray, node: np.ndarray, feature_bits: int, cut: np.ndarray,
    value: np.ndarray, roots: np.ndarray, steps: int, nan_right: np.ndarray,
    has_nan: bool, out: np.ndarray,
) -> None:
    """out[i] = sum over trees (in order) of the value of the leaf row i reaches.

    `node[n]` packs a node's left child and the feature it tests (`child << feature_bits
    | feature`) and `cut[n]` is its threshold as float32: one cache line fewer per step.
    Each block of rows is copied feature-major first, so a step's rows read one short
    column. NaN goes where the tree sends missing values (`nan_right`), tested only when
    the rows hold some (`has_nan`)."""
    rows, columns = x.shape
    mask = (1 << feature_bits) - 1
    nodes = np.empty(_ROWS_TOGETHER, np.int64)
    total = np.empty(_ROWS_TOGETHER)
    block = np.empty((columns, _ROWS_TOGETHER), np.float32)
    for start in range(0, rows, _ROWS_TOGETHER):
        m = min(_ROWS_TOGETHER, rows - start)
        for r in range(m):
            for f in range(columns):
                block[f, r] = x[start + r, f]
        total[:m] = 0.0
        for root in roots:
            nodes[:m] = root
            for _ in range(steps):
                for r in range(m):
                    n = nodes[r]
                    packed = node[n]
                    v = block[packed & mask, r]
                    if has_nan and v != v:
                        nodes[r] = (packed >> feature_bits) + nan_right[n]
                    else:
                        nodes[r] = (packed >> feature_bits) + (not v <= cut[n])
            for r in range(m):
                total[r] += value[nodes[r]]
        out[start:start + m] = total[:m]


def float32_cuts(threshold: np.ndarray) -> np.ndarray:
    """Each float64 threshold t as the largest float32 not above it: for any float32 v,
    `v <= t` exactly when `v <= cut` (a float32 at most t is at most the largest one),
    so the walk compares in float32 and still splits as sklearn does."""
    with np.errstate(over="ignore"):
        cut = threshold.astype(np.float32)
    above = cut.astype(np.float64) > threshold
    cut[above] = np.nextafter(cut[above], np.float32(-np.inf))
    return cut


class CompiledForest:
    """sklearn IsolationForest's `score_samples`, walked by `_walk`."""

    def __init__(self, forest: Any) -> None:
        trees = self.source = forest.estimators_  # what it was built from (a refit replaces it)
        leaf_column = forest.n_features_in_  # the zero column `score_samples` appends
        feature, threshold, child, value, roots, nan_right = [], [], [], [], [], []
        offset = 0
        self.steps = 0
        # c(samples) of every node, per tree, as fitted (sklearn keeps them since 1.3)
        lengths = getattr(forest, "_average_path_length_per_tree", None) or [
            _average_path_length(tree.tree_.n_node_samples) for tree in trees]
        for tree, columns, c in zip(trees, forest.estimators_features_, lengths, strict=True):
            t = tree.tree_
            order = _breadth_first(t.children_left, t.children_right)
            position = np.empty(len(order), dtype=np.int64)
            position[order] = np.arange(len(order))
            left = t.children_left[order]
            leaf = left == -1
            depth = np.asarray(t.compute_node_depths(), dtype=np.float64)[order]  # root = 1
            roots.append(offset)
            feature.append(np.where(leaf, leaf_column,
                                    np.asarray(columns)[np.maximum(t.feature[order], 0)]))
            threshold.append(np.where(leaf, np.inf, t.threshold[order]))
            nan_right.append(np.where(leaf, 0, 1 - t.missing_go_to_left[order]))
            # breadth first: the right child is the left one's neighbour; a leaf stays put
            child.append(np.where(leaf, np.arange(len(order)), position[np.maximum(left, 0)])
                         + offset)
            # what sklearn adds per tree: depth of the leaf + c(samples in it) - 1
            value.append(np.where(leaf, depth + np.asarray(c)[order] - 1.0, 0.0))
            self.steps = max(self.steps, int(depth.max()) - 1)  # steps from root to leaf
            offset += len(order)
        self.value = np.concatenate(value).astype(np.float64)
        self.roots = np.asarray(roots, dtype=np.int64)
        self.nan_right = np.concatenate(nan_right).astype(np.int64)
        self.n_features = leaf_column
        self.feature_bits = max(1, leaf_column.bit_length())  # the leaf column included
        # only the packed forms are kept: a refit's walk is pickled back from the worker
        self.node = ((np.concatenate(child).astype(np.int64) << self.feature_bits)
                     | np.concatenate(feature).astype(np.int64))
        self.cut = float32_cuts(np.concatenate(threshold).astype(np.float64))
        self.denominator = len(trees) * float(_average_path_length(
            np.array([forest._max_samples]))[0])

    def __getstate__(self) -> dict[str, Any]:
        """Pickled without `source`: the arrays alone score, and unpickling sklearn's
        trees would import sklearn (a model's walk goes to and from the fit worker, and
        into saved models)."""
        return {**self.__dict__, "source": None}

    def score_samples(
        self, x: np.ndarray, pool: Executor | None = None, threads: int = 1
    ) -> np.ndarray:
        """sklearn's score_samples: -2^(-mean depth / c(max_samples)); lower = more abnormal.

        Rows split over `threads` threads of `pool`; all on this thread without one."""
        rows = np.zeros((len(x), self.n_features + 1), dtype=np.float32)
        rows[:, :self.n_features] = x  # float32, as sklearn's input validation rounds
        has_nan = bool(np.isnan(rows).any())
        depths = np.empty(len(rows))

        def walk(part: slice) -> None:
            _walk(rows[part], self.node, self.feature_bits, self.cut, self.value,
                  self.roots, self.steps, self.nan_right, has_nan, depths[part])

        if pool is None or threads < 2 or len(rows) < 2 * _ROWS_TOGETHER:
            walk(slice(0, len(rows)))
        else:
            cuts = np.linspace(0, len(rows), threads + 1).astype(int)
            list(pool.map(walk, [slice(a, b) for a, b in pairwise(cuts)]))
        if self.denominator == 0:
            return -np.ones(len(rows))
        return -np.power(2.0, -depths / self.denominator)


def _breadth_first(left: np.ndarray, right: np.ndarray) -> np.ndarray:
    """A tree's node ids in breadth-first order: each node's two children come out
    together (left, right). One numpy step per level."""
    levels = [np.zeros(1, dtype=np.int64)]
    while True:
        inner = levels[-1][left[levels[-1]] != -1]
        if not len(inner):
            return np.concatenate(levels)
        levels.append(np.column_stack([left[inner], right[inner]]).ravel().astype(np.int64))
