"""A fitted isolation forest as flat arrays, scored for all trees at once with numpy.

scikit-learn scores an isolation forest one tree at a time through joblib: about 100
Python-level calls per `decision_function`, ~10-15 ms before the first row is scored.
On the live path (one block of ~200 txs per call) that overhead was most of the
detector's latency. Here every tree's nodes live in shared arrays (children, feature,
threshold, leaf value) and all (row, tree) pairs walk down together, one numpy step per
level (an isolation tree is at most ceil(log2(max_samples)) = 8 levels deep).

The result equals sklearn's `score_samples` (tests compare them): inputs are rounded to
float32 first, as sklearn's input validation does before comparing with the thresholds.
Pure computation, no I/O.
"""

from __future__ import annotations

from typing import Any

import numpy as np

_CHUNK_CELLS = 1 << 16  # rows x trees walked at once: ~8 MB per index array


def _average_path_length(n: np.ndarray) -> np.ndarray:
    """c(n): average path length of an unsuccessful search in a BST of n points."""
    n = np.asarray(n, dtype=np.float64)
    out = np.zeros_like(n)
    out[n == 2] = 1.0
    big = n > 2
    out[big] = 2.0 * (np.log(n[big] - 1.0) + np.euler_gamma) - 2.0 * (n[big] - 1.0) / n[big]
    return out


class CompiledForest:
    """sklearn IsolationForest's `score_samples`, vectorised over trees."""

    def __init__(self, forest: Any) -> None:
        trees = forest.estimators_
        features = forest.estimators_features_
        left, right, feature, threshold, value = [], [], [], [], []
        offset = 0
        self.depth = 0
        for tree, cols in zip(trees, features, strict=True):
            t = tree.tree_
            n = t.node_count
            leaf = t.children_left == -1
            idx = np.arange(n)
            # a leaf points at itself, tests feature 0 against +inf, so it stays put
            left.append(np.where(leaf, idx, t.children_left) + offset)
            right.append(np.where(leaf, idx, t.children_right) + offset)
            feature.append(np.where(leaf, 0, np.asarray(cols)[np.maximum(t.feature, 0)]))
            threshold.append(np.where(leaf, np.inf, t.threshold))
            depth = np.asarray(t.compute_node_depths(), dtype=np.float64)  # root = 1
            # what sklearn adds per tree: depth of the leaf + c(samples in it) - 1
            value.append(np.where(leaf, depth + _average_path_length(t.n_node_samples) - 1.0,
                                  0.0))
            self.depth = max(self.depth, int(depth.max()) - 1)  # steps from root to leaf
            offset += n
        self.left = np.concatenate(left).astype(np.int64)
        self.right = np.concatenate(right).astype(np.int64)
        self.feature = np.concatenate(feature).astype(np.int64)
        self.threshold = np.concatenate(threshold).astype(np.float64)
        self.value = np.concatenate(value).astype(np.float64)
        self.roots = np.cumsum([0] + [t.tree_.node_count for t in trees[:-1]]).astype(np.int64)
        self.denominator = len(trees) * float(_average_path_length(
            np.array([forest._max_samples]))[0])

    def score_samples(self, x: np.ndarray) -> np.ndarray:
        """sklearn's score_samples: -2^(-mean depth / c(max_samples)); lower = more abnormal."""
        x = np.ascontiguousarray(np.asarray(x, dtype=np.float32), dtype=np.float64)
        n_rows, n_cols = x.shape
        depths = np.empty(n_rows)
        step = max(1, _CHUNK_CELLS // len(self.roots))
        for start in range(0, n_rows, step):
            part = x[start:start + step]
            flat = part.ravel()
            base = (np.arange(len(part)) * n_cols)[:, None]
            node = np.broadcast_to(self.roots, (len(part), len(self.roots))).copy()
            for _ in range(self.depth):
                go_left = flat[base + self.feature[node]] <= self.threshold[node]
                node = np.where(go_left, self.left[node], self.right[node])
            depths[start:start + step] = self.value[node].sum(axis=1)
        if self.denominator == 0:
            return -np.ones(n_rows)
        return -np.power(2.0, -depths / self.denominator)


class TreeWalker:
    """sklearn IsolationForest's `score_samples` for all but small calls, its trees on
    threads for big batches.

    Each tree is walked by sklearn's own `tree_.apply` (compiled, and it releases the GIL,
    so threads walk different trees side by side) and its leaves' values are looked up
    in the same thread; the main thread then adds the trees up in sklearn's order (tree
    0, 1, 2 ... into a zero), so the scores are sklearn's bit for bit (tests compare).
    sklearn's own threading is per tree with a lock and splitting rows over threads ran
    their Python parts one at a time: 0.15 s per 75k rows and 100 trees on two cores,
    here 0.09 s. One call at a time per walker (it keeps its buffer between calls).
    """

    def __init__(self, forest: Any) -> None:
        compiled = CompiledForest(forest)
        self.source = forest.estimators_  # what it was built from (a refit replaces it)
        ends = [*compiled.roots[1:], len(compiled.value)]
        self.trees = [tree.tree_ for tree in forest.estimators_]
        self.values = [compiled.value[a:b] for a, b in zip(compiled.roots, ends, strict=True)]
        subsample = forest._max_features != forest.n_features_in_
        self.features = ([np.asarray(f) for f in forest.estimators_features_]
                         if subsample else None)
        self.denominator = compiled.denominator
        self._buffer: np.ndarray | None = None

    def score_samples(self, x: np.ndarray, pool: Any | None, threads: int) -> np.ndarray:
        """Trees split over `threads` threads of `pool`; all on this thread without one."""
        x32 = np.ascontiguousarray(x, dtype=np.float32)
        if self._buffer is None or self._buffer.shape[1] < len(x32):
            # kept between calls: a fresh 60 MB array per replay batch cost page faults
            self._buffer = np.empty((len(self.trees), len(x32)))
        leaf_values = self._buffer[:, :len(x32)]

        def walk(trees: range) -> None:
            for t in trees:
                rows = x32 if self.features is None else np.ascontiguousarray(
                    x32[:, self.features[t]])
                np.take(self.values[t], self.trees[t].apply(rows), out=leaf_values[t])

        if pool is None or threads < 2:
            walk(range(len(self.trees)))
        else:
            list(pool.map(walk, [range(k, len(self.trees), threads) for k in range(threads)]))
        depths = leaf_values.sum(axis=0)  # axis 0: one tree after the other, as sklearn adds
        if self.denominator == 0:
            return -np.ones(len(x32))
        return -np.power(2.0, -depths / self.denominator)
