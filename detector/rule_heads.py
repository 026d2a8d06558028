"""Which blocks of a batch a windowed miner rule could hold at. Domain code: no I/O.

A live detector evaluates the miner window rules (share, surge, empty blocks) after
every block, because it polls about one block at a time. A batch of many blocks
(replay, or a detector catching up on a backlog) must give the same findings, so the
rules are evaluated at every block of it too. Running them at each block costs ~40x a
batch-end evaluation, so this module first marks, for the whole batch at once and with
numpy, the blocks where one of them could hold: a superset, never missing one. The
rules themselves then run only at those blocks and decide.

The numpy path needs the window plus the batch in strictly increasing heights (one
block per height: the window's producers are then simply the last `window` blocks).
Around a reorg the window holds a height twice for the next 100 blocks; there
`window_candidates` makes the same test for one block's window in plain Python (~66 us
a block against ~12 us; the rules themselves cost ~1 ms).
"""

from __future__ import annotations

import bisect
import functools
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from itertools import pairwise

import numpy as np
from scipy.special import betaln, gammaln

from chainwatch.schema import Block
from detector.miner_features import Snapshot
from detector.rules import SURGE_MIN_PRIOR

SURGE_MARGIN = 10.0  # the table's tails (scipy) may differ from the rule's in the last digits


@dataclass(frozen=True)
class RuleHeads:
    """Per block of a batch: which window rules could hold once it joined the window.

    `share` and `surge` are None where the batch's heights are not strictly increasing
    (a reorg's replacement in the window): `window_candidates` then decides per block.
    """

    share: np.ndarray | None
    empty: np.ndarray
    surge: np.ndarray | None


def rule_heads(
    window: Sequence[Block], batch: Sequence[Block], snapshots: Sequence[Snapshot], *,
    window_size: int, share_limit: float, share_min_blocks: int, empty_pending: int,
    empty_min_count: int, surge_windows: Sequence[int], surge_alpha: float,
    surge_newcomer_alpha: float,
) -> RuleHeads:
    """Candidates per block of `batch`, `window` being the node's blocks before it.

    Windows here are the node's last `window_size` blocks as received; the rules see one
    block per height of them. With heights strictly increasing the two are the same; else
    the empty-block marks still hold (a height's older block only adds to a count).
    """
    seq = [*window, *batch]
    codes: dict[str, int] = {}
    miner = np.array([codes.setdefault(b.miner.lower(), len(codes)) for b in seq])
    first = len(window)
    heads = np.arange(first, len(seq))
    start = np.maximum(heads + 1 - window_size, 0)
    flagged = _empty_while_full(seq, snapshots, empty_pending)
    if flagged.any():
        empty_counts = _running_counts(np.where(flagged, miner, len(codes)), len(codes) + 1)
        empty_in_window = (empty_counts[heads + 1] - empty_counts[start])[:, : len(codes)]
        empty = (empty_in_window >= empty_min_count).any(axis=1)
    else:
        empty = np.zeros(len(batch), dtype=bool)
    if any(a.number >= b.number for a, b in pairwise(seq)):
        return RuleHeads(None, empty, None)
    counts = _running_counts(miner, len(codes))
    total = heads + 1 - start
    in_window = counts[heads + 1] - counts[start]
    share = (total >= share_min_blocks) & (
        (in_window / total[:, None]).max(axis=1) > share_limit - 1e-9)
    surge = _surge_candidates(counts, heads, start, total, surge_windows,
                              max(surge_alpha, surge_newcomer_alpha), window_size)
    return RuleHeads(share, empty, surge)


def window_candidates(
    producers: Sequence[str], *, window_size: int, share_limit: float,
    share_min_blocks: int, surge_windows: Sequence[int], surge_alpha: float,
    surge_newcomer_alpha: float,
) -> tuple[bool, bool]:
    """(share, surge): whether those rules could hold over one window's producers (one
    per height, oldest first), in plain Python: `rule_heads`' test for one block, for
    batches it cannot mark (~30 us against ~1 ms for the rules themselves)."""
    total = len(producers)
    counts = Counter(producers)
    share = total >= share_min_blocks and max(counts.values()) / total > share_limit - 1e-9
    limit = max(surge_alpha, surge_newcomer_alpha) * SURGE_MARGIN
    recent: Counter[str] = Counter()
    sizes = set(surge_windows)
    for n in range(1, min(max(sizes), total) + 1):
        recent[producers[-n]] += 1
        if n in sizes and total - n >= SURGE_MIN_PRIOR:
            k_min = _surge_k_min(n, window_size - n, limit)
            if any(k >= k_min[counts[m] - k] for m, k in recent.items()):
                return share, True
    return share, False


def _running_counts(codes: np.ndarray, kinds: int) -> np.ndarray:
    """counts[j, m]: how many of the first j entries are m."""
    onehot = np.zeros((len(codes) + 1, kinds), dtype=np.int32)
    onehot[np.arange(1, len(codes) + 1), codes] = 1
    return np.cumsum(onehot, axis=0)


def _empty_while_full(
    blocks: Sequence[Block], snapshots: Sequence[Snapshot], pending_threshold: int
) -> np.ndarray:
    """Per block: empty while the last snapshot strictly before it showed a full pool
    (empty_with_mempool's rule, for the few empty blocks only; of snapshots taken at the
    same moment the fullest counts, so a tie never hides a candidate)."""
    flagged = np.zeros(len(blocks), dtype=bool)
    if not snapshots or not any(n > pending_threshold for _, n in snapshots):
        return flagged
    points = sorted(snapshots)
    times = [t for t, _ in points]
    for i, b in enumerate(blocks):
        if b.tx_count == 0:
            before = bisect.bisect_left(times, b.observed_at) - 1
            flagged[i] = before >= 0 and points[before][1] > pending_threshold
    return flagged


def _surge_candidates(
    counts: np.ndarray, heads: np.ndarray, start: np.ndarray, total: np.ndarray,
    windows: Sequence[int], alpha: float, window_size: int,
) -> np.ndarray:
    """Heads where a miner's count k in one of the last n blocks could fail
    miner_surge_rule's test: its beta-binomial tail P(X >= k) under `alpha` x
    SURGE_MARGIN, looked up in `_surge_k_min`'s table for that window."""
    found = np.zeros(len(heads), dtype=bool)
    at_head, at_start = counts[heads + 1], counts[start]  # the same for every window
    for n in windows:
        full = total - n >= SURGE_MIN_PRIOR
        rows: slice | np.ndarray
        if full.all():  # the usual case (a full window): every row, nothing selected
            rows, head, begin = slice(None), at_head, at_start
        else:
            rows = np.nonzero(full)[0]
            if len(rows) == 0:
                continue
            head, begin = at_head[rows], at_start[rows]
        at_cut = counts[heads[rows] + 1 - n]
        k_min = _surge_k_min(n, window_size - n, alpha * SURGE_MARGIN)
        # a miner's count in the window's last n blocks against the smallest that could
        # fail the test, given its count in the blocks before them
        found[rows] |= (head - at_cut >= k_min[at_cut - begin]).any(axis=1)
    return found


@functools.lru_cache(maxsize=1024)
def _surge_k_min(n: int, prior: int, alpha: float) -> np.ndarray:
    """Per count c = 0..prior of a miner in the `prior` blocks before a window of n: the
    smallest k in the window whose tail P(X >= k) is under `alpha`, under the rule's
    Beta(c + 1/2, prior - c + 1/2) belief (n + 1 when none is).

    Made for the fullest prior (window - n) and used for shorter ones too (a filling
    window): the same count out of fewer blocks is a larger share, so a larger tail and
    a smallest k at least as big. Marking from this table marks more, never less.
    """
    seen = np.arange(prior + 1)[:, None] + 0.5
    unseen = prior + 1 - seen
    draws = np.arange(n + 1)[None, :]
    log_pmf = (gammaln(n + 1) - gammaln(draws + 1) - gammaln(n - draws + 1)
               + betaln(draws + seen, n - draws + unseen) - betaln(seen, unseen))
    tail = np.cumsum(np.exp(log_pmf)[:, ::-1], axis=1)[:, ::-1]  # tail[c, k] = P(X >= k)
    below = tail < alpha
    return np.where(below.any(axis=1), below.argmax(axis=1), n + 1)
