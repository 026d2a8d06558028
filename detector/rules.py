"""Known-bad patterns as plain rules. Domain code: no I/O, time passed in.

Each rule is a pure function returning `RuleHit`s (empty when nothing matched). Scores
are in [0, 1] and every rule fires at or above `RULE_THRESHOLD` (0.5): count-like rules
score min(count / (2 x limit), 1), so "at the limit" is 0.5 and "twice the limit" is 1.
`RuleHit.to_finding` turns a hit into a Finding; its event id depends on the rule and
subject only, so re-evaluating the same window yields the same id (dropped as duplicate).
"""

from __future__ import annotations

import math
import operator
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal, NamedTuple

import numpy as np
import polars as pl

from chainwatch.schema import Block, Finding, Severity, TxLifecycle
from detector.compiled import compiled
from detector.miner_features import Snapshot, empty_with_mempool, window_blocks_frame
from detector.tx_features import BlockTxs, dense_ids, string_hashes

RULE_THRESHOLD = 0.5
SURGE_MIN_PRIOR = 24  # miner_surge_rule: blocks before a recent window it needs


SubjectKind = Literal["node", "block", "tx", "miner"]


@dataclass(frozen=True)
class RuleHit:
    rule: str
    family: str  # Finding.family: fork_risk, miner, tx
    severity: Severity
    chain_id: int
    node: str
    subject_kind: SubjectKind
    subject: str
    block_number: int | None
    score: float
    summary: str
    details: dict[str, object] = field(default_factory=dict)

    def to_finding(self, now: float, episode: str | None = None, *,
                   chain_level: bool = False) -> Finding:
        """The Finding for this hit, observed at `now`.

        The event id is (rule, node, subject[, episode]): miner hits keep one subject while
        the window slides, so pass an episode (e.g. the window's first block) to report a
        later, separate occurrence again. `chain_level`: a fact about the chain, not about
        what one node saw (a producer's share): the id leaves the node out, so every node
        that sees it reports the same finding, counted once.
        """
        key = self.subject if episode is None else f"{self.subject}|{episode}"
        return Finding(
            chain_id=self.chain_id,
            node=self.node,
            event_id=Finding.id_for(self.chain_id, "" if chain_level else self.node,
                                    self.rule, key),
            observed_at=now,
            detector=self.rule,
            family=self.family,
            severity=self.severity,
            score=self.score,
            threshold=RULE_THRESHOLD,
            subject_kind=self.subject_kind,
            subject=self.subject,
            block_number=self.block_number,
            summary=self.summary,
        )


def count_score(count: float, limit: float) -> float:
    return min(count / (2.0 * limit), 1.0) if limit > 0 else 1.0


def miner_share_rule(
    miner_frame: pl.DataFrame, limit: float = 0.5, min_blocks: int = 20
) -> list[RuleHit]:
    """Miners whose share of the window is above `limit` (from `miner_window_features`).

    Needs a window of at least `min_blocks` blocks: 3 of 4 blocks is luck, not power.
    Score = the share; critical above 0.5 (a majority producer can outpace everyone).
    """
    hits = miner_frame.filter(
        pl.col("window_blocks") >= min_blocks, pl.col("block_share") > limit
    )
    out: list[RuleHit] = []
    for row in hits.iter_rows(named=True):  # one row per offending miner: a handful at most
        share = float(row["block_share"])
        out.append(
            RuleHit(
                rule="miner_share_rule",
                family="miner",
                severity="critical" if share > 0.5 else "warning",
                chain_id=int(row["chain_id"]),
                node=str(row["node"]),
                subject_kind="miner",
                subject=str(row["miner"]),
                block_number=None,
                score=min(max(share, 0.0), 1.0),
                summary=(
                    f"miner {row['miner']} produced {row['blocks']} of the last "
                    f"{row['window_blocks']} blocks on {row['node']} ({share:.0%}, "
                    f"limit {limit:.0%})"
                ),
                details={
                    "blocks": int(row["blocks"]),
                    "window_blocks": int(row["window_blocks"]),
                    "block_share": share,
                    "window_hhi": float(row["window_hhi"]),
                    "limit": limit,
                },
            )
        )
    return out


def empty_blocks_rule(
    blocks: Sequence[Block],
    snapshots: Sequence[Snapshot],
    pending_threshold: int = 50,
    min_count: int = 2,
) -> list[RuleHit]:
    """Miners with >= `min_count` empty blocks while the pool held > `pending_threshold` txs.

    Blocks and snapshots of one node; snapshot = (observed_at, pending_count), the pool
    "before" a block is the last snapshot strictly before the node saw it.
    """
    if not blocks:
        return []
    frame = window_blocks_frame(blocks)
    frame = frame.with_columns(empty_with_mempool(frame, snapshots, pending_threshold))
    offenders = (
        frame.filter(pl.col("empty_with_mempool"))
        .group_by("chain_id", "node", "miner")
        .agg(pl.col("number").sort().alias("numbers"))
        .filter(pl.col("numbers").list.len() >= min_count)
        .sort("miner")
    )
    out: list[RuleHit] = []
    for row in offenders.iter_rows(named=True):
        numbers = [int(n) for n in row["numbers"]]
        out.append(
            RuleHit(
                rule="empty_blocks_rule",
                family="miner",
                severity="warning",
                chain_id=int(row["chain_id"]),
                node=str(row["node"]),
                subject_kind="miner",
                subject=str(row["miner"]),
                block_number=numbers[-1],
                score=count_score(len(numbers), min_count),
                summary=(
                    f"miner {row['miner']} produced {len(numbers)} empty block(s) while "
                    f"{row['node']}'s mempool held more than {pending_threshold} pending txs"
                ),
                details={
                    "block_numbers": numbers,
                    "pending_threshold": pending_threshold,
                    "min_count": min_count,
                },
            )
        )
    return out


_BLOCK_KEY = ("chain_id", "node", "block_hash")


def _with_runs(frame: pl.DataFrame, blocks: np.ndarray | None = None) -> pl.DataFrame:
    """A tx frame with a `run` number per block (the rows of a block are together):
    `blocks` when the caller has them (each row's block, non-decreasing, a new number
    for each block: numbering the struct of block keys took ~13 ms per 75k rows)."""
    if blocks is not None:
        return frame.with_columns(pl.Series("run", blocks))
    return frame.with_columns(pl.struct(*_BLOCK_KEY).rle_id().alias("run"))


def _in_index_order(framed: pl.DataFrame) -> pl.DataFrame:
    """`_with_runs`' frame with each block's txs by transaction index (a stable sort, as
    collectors send them)."""
    ordered = framed.select(
        (pl.col("tx_index").diff().fill_null(1) > 0) | (pl.col("run").diff() != 0)
    ).to_series().all()
    return framed if ordered else framed.sort("run", "tx_index", maintain_order=True)


def sandwich_rule(frame: pl.DataFrame) -> list[RuleHit]:
    """Same sender right before and right after a victim tx, all three to one contract.

    `frame`: the included txs of one or more blocks (a tx frame: addresses lower-cased,
    each block's rows together); hits block by block, in index order. Adjacent indices
    only, the victim from another sender. Bots that trade through their own contract
    (to_address differs from the victim's) are not caught: a known-bad pattern, not an
    MEV classifier.
    """
    return [hit for _, hit in _sandwiches(_with_runs(frame))]


def _sandwiches(framed: pl.DataFrame) -> list[tuple[int, RuleHit]]:
    """`sandwich_rule` over `_with_runs`' frame, each hit with its block's run number.
    Vectorised over the frame: only the matches become Python objects."""
    if framed.height < 3:
        return []
    f = _in_index_order(framed)
    run, sender = pl.col("run"), pl.col("from_address")
    # candidates at C speed: the same sender two rows later, in the same block
    first = f.select(
        ((run == run.shift(-2)) & (sender == sender.shift(-2))).fill_null(False)
    ).to_series().arg_true().to_numpy()
    if not len(first):
        return []
    triples = f[np.column_stack((first, first + 1, first + 2)).ravel()]
    cols = {c: triples[c].to_list() for c in (
        "run", "chain_id", "node", "block_number", "block_hash", "hash", "from_address",
        "to_address", "tx_index")}
    senders, receivers, indices, hashes = (cols["from_address"], cols["to_address"],
                                           cols["tx_index"], cols["hash"])
    matched = []
    for a in range(0, len(senders), 3):
        b, c = a + 1, a + 2
        contract = receivers[b] or ""
        if (
            contract
            and senders[b] != senders[a]
            and (receivers[a] or "") == contract == (receivers[c] or "")
            and indices[a] == indices[b] - 1
            and indices[c] == indices[b] + 1
        ):
            matched.append({
                "run": cols["run"][a], "chain_id": cols["chain_id"][a],
                "node": cols["node"][a], "block_number": cols["block_number"][a],
                "block_hash": cols["block_hash"][a], "from_address": senders[a],
                "victim_sender": senders[b], "victim": hashes[b], "contract": contract,
                "tx_index": indices[a], "victim_index": indices[b], "back_index": indices[c],
                "hash": hashes[a], "back_hash": hashes[c],
            })
    out: list[tuple[int, RuleHit]] = []
    for row in matched:
        number, victim, contract = row["block_number"], row["victim"], row["contract"]
        out.append((row["run"],
            RuleHit(
                rule="sandwich_rule",
                family="tx",
                severity="warning",
                chain_id=row["chain_id"],
                node=row["node"],
                subject_kind="tx",
                subject=str(victim),
                block_number=number,
                score=1.0,
                summary=(
                    f"possible sandwich in block {number}: {row['from_address']} traded "
                    f"with {contract} right before and after tx {victim}"
                ),
                details={
                    "attacker": row["from_address"],
                    "victim": victim,
                    "victim_sender": row["victim_sender"],
                    "contract": contract,
                    "indices": [row["tx_index"], row["victim_index"], row["back_index"]],
                    "front_hash": row["hash"],
                    "back_hash": row["back_hash"],
                    "block_hash": row["block_hash"],
                },
            )))
    return out


def nonce_replacement_spam_rule(
    lifecycles: Sequence[TxLifecycle], window_seconds: float = 60.0, limit: int = 5
) -> list[RuleHit]:
    """A sender replacing one nonce more than `limit` times within `window_seconds`.

    Counts `replaced` lifecycles per (node, sender, nonce) in a sliding window on their
    observed_at; duplicates (same event_id) count once. Fee-bump spam floods the pool and
    every peer's bandwidth while paying for one transaction at most.
    """
    replaced = [r for r in lifecycles if r.fate == "replaced"]
    if not replaced:
        return []
    frame = (
        pl.DataFrame(
            {
                "chain_id": [r.chain_id for r in replaced],
                "node": [r.node for r in replaced],
                "event_id": [r.event_id for r in replaced],
                "sender": [r.from_address.lower() for r in replaced],
                "nonce": [str(r.nonce) for r in replaced],  # str: nonces may exceed Int64
                "at_ms": [round(r.observed_at * 1000) for r in replaced],
                "hash": [r.hash for r in replaced],
            },
            schema={"chain_id": pl.Int64, "node": pl.Utf8, "event_id": pl.Utf8,
                    "sender": pl.Utf8, "nonce": pl.Utf8, "at_ms": pl.Int64, "hash": pl.Utf8},
        )
        .unique(subset="event_id", keep="first", maintain_order=True)
        .sort("at_ms")
    )
    group = ["chain_id", "node", "sender", "nonce"]
    windows = frame.rolling(
        index_column="at_ms", period=f"{round(window_seconds * 1000)}i", group_by=group
    ).agg(pl.len().alias("count"), pl.col("at_ms").min().alias("first_ms"), pl.col("hash"))
    worst = (
        windows.filter(pl.col("count") > limit)
        .sort("count", "at_ms", descending=[True, False])
        .unique(subset=group, keep="first", maintain_order=True)
        .sort(group)
    )
    out: list[RuleHit] = []
    for row in worst.iter_rows(named=True):
        count = int(row["count"])
        out.append(
            RuleHit(
                rule="nonce_replacement_spam_rule",
                family="tx",
                severity="warning",
                chain_id=int(row["chain_id"]),
                node=str(row["node"]),
                subject_kind="tx",
                subject=f"{row['sender']}#{row['nonce']}",
                block_number=None,
                score=count_score(count, limit),
                summary=(
                    f"{row['sender']} replaced nonce {row['nonce']} {count} times within "
                    f"{window_seconds:g}s on {row['node']} (limit {limit})"
                ),
                details={
                    "sender": row["sender"],
                    "nonce": int(row["nonce"]),
                    "replacements": count,
                    "window_seconds": window_seconds,
                    "first_at": row["first_ms"] / 1000.0,
                    "last_at": row["at_ms"] / 1000.0,
                    "hashes": list(row["hash"]),
                },
            )
        )
    return out


def sender_burst_rule(
    frame: pl.DataFrame, min_txs: int = 50, min_share: float = 0.3, min_share_txs: int = 20
) -> list[RuleHit]:
    """One sender filling a block: >= `min_txs` txs, or >= `min_share` of it (and >= 20).

    `frame` as for `sandwich_rule`; hits block by block, senders in order. Spam bursts
    crowd out everyone else for a block or two; busy bots on mainnet send a handful per
    block, so the limits sit well above normal traffic.
    """
    return [hit for _, hit in _bursts(_with_runs(frame), min_txs, min_share, min_share_txs)]


def block_tx_rules(frame: pl.DataFrame, blocks: np.ndarray | None = None) -> list[RuleHit]:
    """The per-block tx rules over a batch's included txs (`frame` as for
    `sandwich_rule`): each block's sandwiches, then its spam bursts, block by block.
    `blocks`: each row's block number in the batch if known (`AsOf.block`)."""
    framed = _with_runs(frame, blocks)  # the blocks numbered once for both rules
    hits = _sandwiches(framed) + _bursts(framed)
    return [hit for _, hit in sorted(hits, key=operator.itemgetter(0))]  # stable


def _bursts(
    framed: pl.DataFrame, min_txs: int = 50, min_share: float = 0.3, min_share_txs: int = 20
) -> list[tuple[int, RuleHit]]:
    """`sender_burst_rule` over `_with_runs`' frame, each hit with its block's run number."""
    floor = min(min_txs, min_share_txs)  # a sender with fewer txs meets neither limit
    if framed.height < floor or framed.height == 0:
        return []
    # senders with `floor` txs in a block, counted on numbers made from their hashes in
    # one compiled pass (the group-by of (block, hash) took ~5 ms per 75k rows): hash
    # collisions can only add candidates, which the exact count below drops
    ids, _ = dense_ids(string_hashes(framed["from_address"]))
    heavy = _heavy_rows(framed["run"].to_numpy(), ids, floor)
    if not heavy.any():
        return []
    candidates = framed.filter(pl.Series(heavy))
    totals = framed.group_by("run").len().rename({"len": "total"})
    busy = (
        candidates.group_by("run", "from_address", maintain_order=True)
        .agg(pl.len().alias("n"), pl.col("hash"),
             pl.first("chain_id", "node", "block_number"))
        .filter(pl.col("n") >= floor)
        .join(totals, on="run", how="left")
        .sort("run", "from_address", maintain_order=True)
    )
    out: list[tuple[int, RuleHit]] = []
    for row in busy.iter_rows(named=True):
        n, total, sender, hashes = row["n"], row["total"], row["from_address"], row["hash"]
        share = n / total
        if n < min_txs and not (share >= min_share and n >= min_share_txs):
            continue
        number = row["block_number"]
        out.append((row["run"],
            RuleHit(
                rule="sender_burst_rule",
                family="tx",
                severity="warning",
                chain_id=row["chain_id"],
                node=row["node"],
                subject_kind="tx",
                subject=hashes[0],
                block_number=number,
                score=max(count_score(n, min_txs), min(share / (2 * min_share), 1.0)),
                summary=(
                    f"{sender} sent {n} of the {total} txs in block {number} "
                    f"({share:.0%}): a spam burst"
                ),
                details={"sender": sender, "txs": n, "share": share, "hashes": hashes[:10]},
            )))
    return out


@compiled
def _heavy_rows(runs: np.ndarray, ids: np.ndarray, floor: int) -> np.ndarray:  # pragma: no cover
    """Rows whose id occurs at least `floor` times in their run (runs: each block's rows
    together, non-decreasing numbers)."""
    counts = np.zeros(ids.max() + 1 if len(ids) else 0, dtype=np.int64)
    heavy = np.zeros(len(ids), dtype=np.bool_)
    start = 0
    while start < len(ids):
        end = start
        while end < len(ids) and runs[end] == runs[start]:
            counts[ids[end]] += 1
            end += 1
        for i in range(start, end):
            heavy[i] = counts[ids[i]] >= floor
        for i in range(start, end):
            counts[ids[i]] = 0
        start = end
    return heavy


def beta_binomial_tail(k: int, n: int, seen: float, unseen: float) -> float:
    """P(X >= k) of n draws whose success rate is only known from `seen` successes and
    `unseen` failures before (Beta(seen, unseen) belief; exact, n is small here).

    Unlike a binomial at the estimated rate, it allows for the estimate being off: a
    producer seen 0 times in 76 blocks may well make 5% of them.
    """
    def log_beta(a: float, b: float) -> float:
        return math.lgamma(a) + math.lgamma(b) - math.lgamma(a + b)

    base = log_beta(seen, unseen)
    return sum(
        math.comb(n, i) * math.exp(log_beta(i + seen, n - i + unseen) - base)
        for i in range(k, n + 1)
    )


def miner_surge_rule(
    miners: Sequence[str],
    *,
    chain_id: int,
    node: str,
    head: int,
    windows: Sequence[int] = (3, 4, 5, 6, 8, 12, 16, 24, 32),
    alpha: float = 1e-6,
    newcomer_alpha: float = 1e-5,
    min_prior: int = SURGE_MIN_PRIOR,
) -> list[RuleHit]:
    """Producers that suddenly make far more of the recent blocks than their history allows.

    `miners` is the node's window of producers, one per height, oldest first. For each
    recent window of n blocks, a miner's count k is tested against its record before that
    window: the chance of k or more under a Beta(seen + 1/2, unseen + 1/2) belief about
    its share (Jeffreys prior; a beta-binomial tail), so a newcomer is not judged against
    a share of zero, and a share estimated from few blocks counts as uncertain. The chance
    of a false alarm per miner and window stays under `alpha`, or `newcomer_alpha` for a
    producer absent from the blocks before the window: such a producer's true share is
    small, so it makes 3 of 4 blocks by chance far less often than the rule's prior says
    (~4 share^3), and a takeover with an honest block in its first four is flagged by its
    fourth (chance 6.9e-6; 3 in a row 1.8e-6). A known producer's takeover needs ~6-10
    blocks; the share rule needs ~50.
    """
    best: dict[str, tuple[float, int, int, float, float]] = {}  # miner -> (p, k, n, p0, limit)
    for n in windows:
        prior = miners[:-n]
        if len(prior) < min_prior:
            continue
        recent = miners[-n:]
        prior_counts: dict[str, int] = {}
        for m in prior:
            prior_counts[m] = prior_counts.get(m, 0) + 1
        recent_counts: dict[str, int] = {}
        for m in recent:
            recent_counts[m] = recent_counts.get(m, 0) + 1
        for miner, k in recent_counts.items():
            seen = prior_counts.get(miner, 0) + 0.5
            unseen = len(prior) - prior_counts.get(miner, 0) + 0.5
            p0 = seen / (seen + unseen)
            if k <= n * p0:
                continue
            p = beta_binomial_tail(k, n, seen, unseen)
            limit = newcomer_alpha if miner not in prior_counts else alpha
            if p < limit and p < best.get(miner, (1.0, 0, 0, 0.0, 0.0))[0]:
                best[miner] = (p, k, n, p0, limit)
    out: list[RuleHit] = []
    for miner, (p, k, n, p0, limit) in sorted(best.items()):
        # -log10(p) at the limit scores 0.5, at the limit squared 1.0
        score = min(math.log10(max(p, 1e-300)) / (2 * math.log10(limit)), 1.0)
        out.append(RuleHit(
            rule="miner_surge_rule", family="miner",
            severity="critical" if k / n > 0.5 else "warning",
            chain_id=chain_id, node=node, subject_kind="miner", subject=miner,
            block_number=head, score=score,
            summary=(f"miner {miner} produced {k} of the last {n} blocks on {node} "
                     f"(expected share {p0:.0%}; chance {p:.1e})"),
            details={"blocks": k, "window_blocks": n, "expected_share": p0, "p_value": p},
        ))
    return out


class Stamp(NamedTuple):
    """A block's clock facts as one node saw them (all seconds). A named tuple: one is
    made per block, ~0.4 us against a frozen dataclass's ~0.9."""

    number: int
    miner: str
    timestamp: float
    observed_at: float


# seconds by which a clock check's batch-wide pre-selection errs towards checking a block
SUSPECT_SLACK = 1e-6


@compiled
def _insert_sorted(values: np.ndarray, n: int, value: float) -> None:  # pragma: no cover
    """Put `value` into the ascending values[:n] (room for one more)."""
    at = np.searchsorted(values[:n], value)
    values[at + 1 : n + 1] = values[at:n].copy()
    values[at] = value


@compiled
def _remove_sorted(values: np.ndarray, n: int, value: float) -> None:  # pragma: no cover
    """Take one `value` out of the ascending values[:n] (it is there)."""
    at = np.searchsorted(values[:n], value)
    values[at : n - 1] = values[at + 1 : n].copy()


@compiled
def _middle(values: np.ndarray, n: int) -> float:  # pragma: no cover - compiled
    """The median of the ascending values[:n] as np.median computes it: the middle one,
    or the mean of the two middle ones; NaN when n is 0."""
    if n == 0:
        return np.nan
    return values[(n - 1) // 2] if n % 2 == 1 else (values[(n - 1) // 2] + values[n // 2]) / 2.0


@compiled
def _clock_figures(  # pragma: no cover - compiled; tests compare it with numpy's steps
    ts: np.ndarray, seen: np.ndarray, numbers: np.ndarray, first: int, window: int,
    figures: np.ndarray, counts: np.ndarray,
) -> None:
    """`ClockWindow.of`'s figures of each stamp from `first` on. Row r (stamp q = first
    + r) reads the pairs (p, p + 1) for p from q - window to q - 2 that exist: figures
    rows usual_gap, usual_lead, usual_interval, follows (1.0 or 0.0) and interval;
    counts rows gaps and leads.

    The window slides one pair per row: its intervals, its consecutive heights' gaps and
    those pairs' leads are kept sorted (one insertion and one removal a row), so a median
    is read, not sorted for. The pairs that count for the lead (arrived live) depend on
    the row's usual gap: the sorted leads are scanned for them. The same floats as
    sorting each row's values gives (a median is an order statistic)."""
    n = len(ts)
    room = max(window, 1)
    intervals = np.empty(room)  # every pair's gap, ascending
    gaps = np.empty(room)  # the gaps of consecutive heights, ascending
    leads = np.empty(room)  # those pairs' leads, ascending, with their mismatch and pair
    mismatches = np.empty(room)
    owners = np.empty(room, dtype=np.int64)
    n_intervals = n_gaps = n_leads_kept = 0
    low = high = max(first - window, 0)  # the pairs [low, high) are in the window
    for r in range(n - first):
        q = first + r
        start = max(q - window, 0)
        end = max(q - 1, start)
        while low < start:  # the oldest pairs leave
            gap = ts[low + 1] - ts[low]
            if low < high and not np.isnan(gap):
                _remove_sorted(intervals, n_intervals, gap)
                n_intervals -= 1
                if numbers[low + 1] == numbers[low] + 1:
                    _remove_sorted(gaps, n_gaps, gap)
                    n_gaps -= 1
                    for k in range(n_leads_kept):
                        if owners[k] == low:
                            leads[k : n_leads_kept - 1] = leads[k + 1 : n_leads_kept].copy()
                            mismatches[k : n_leads_kept - 1] = (
                                mismatches[k + 1 : n_leads_kept].copy())
                            owners[k : n_leads_kept - 1] = owners[k + 1 : n_leads_kept].copy()
                            n_leads_kept -= 1
                            break
            low += 1
        high = max(high, low)
        while high < end:  # the newest pairs come in
            gap = ts[high + 1] - ts[high]
            if not np.isnan(gap):  # (never from valid records) unknown, as numpy skips it
                _insert_sorted(intervals, n_intervals, gap)
                n_intervals += 1
                if numbers[high + 1] == numbers[high] + 1:
                    _insert_sorted(gaps, n_gaps, gap)
                    n_gaps += 1
                    lead = ts[high + 1] - seen[high + 1]
                    mismatch = abs((seen[high + 1] - seen[high]) - gap)
                    if not (np.isnan(lead) or np.isnan(mismatch)):
                        at = np.searchsorted(leads[:n_leads_kept], lead)
                        leads[at + 1 : n_leads_kept + 1] = leads[at:n_leads_kept].copy()
                        mismatches[at + 1 : n_leads_kept + 1] = (
                            mismatches[at:n_leads_kept].copy())
                        owners[at + 1 : n_leads_kept + 1] = owners[at:n_leads_kept].copy()
                        leads[at] = lead
                        mismatches[at] = mismatch
                        owners[at] = high
                        n_leads_kept += 1
            high += 1
        usual_gap = _middle(gaps, n_gaps)
        # blocks that arrived live: as far apart on arrival as in their stamps
        limit = max(usual_gap / 2, 1.0)
        n_leads = 0
        for k in range(n_leads_kept):
            if mismatches[k] < limit:
                n_leads += 1
        usual_lead = np.nan
        if n_leads > 0:
            want_low, want_high = (n_leads - 1) // 2, n_leads // 2
            seen_live = 0
            lead_low = lead_high = np.nan
            for k in range(n_leads_kept):
                if mismatches[k] < limit:
                    if seen_live == want_low:
                        lead_low = leads[k]
                    if seen_live == want_high:
                        lead_high = leads[k]
                        break
                    seen_live += 1
            usual_lead = lead_low if n_leads % 2 == 1 else (lead_low + lead_high) / 2.0
        figures[0, r] = usual_gap
        figures[1, r] = usual_lead
        figures[2, r] = _middle(intervals, n_intervals)
        follows = q > 0 and numbers[q - 1] == numbers[q] - 1
        figures[3, r] = 1.0 if follows else 0.0
        figures[4, r] = ts[q] - ts[q - 1] if q > 0 else np.nan
        counts[0, r] = n_gaps
        counts[1, r] = n_leads


@dataclass(frozen=True)
class ClockWindow:
    """What the timestamp rules compare a block with: its node's window of the `window`
    blocks before it. Per block of a batch (NaN where unknown):

    - `usual_gap`: median interval between consecutive heights in the window, and
      `gaps`, how many such pairs there are;
    - `usual_lead`: median lead (timestamp - arrival) of the window's blocks that arrived
      live (as far apart on arrival as in their stamps), `leads` how many;
    - `usual_interval`: median interval between the window's neighbours, heights or not;
    - `follows`: the block's height is its predecessor's + 1; `known`: blocks before it;
    - `interval`: its timestamp less its predecessor's, `lead`: its timestamp less its
      arrival.
    """

    usual_gap: np.ndarray
    gaps: np.ndarray
    usual_lead: np.ndarray
    leads: np.ndarray
    usual_interval: np.ndarray
    follows: np.ndarray
    known: np.ndarray
    interval: np.ndarray
    lead: np.ndarray

    @staticmethod
    def of(stamps: Sequence[Stamp], first: int, window: int) -> ClockWindow:
        """For each of `stamps[first:]`, its window being the (up to) `window` stamps
        before it: one compiled pass for a batch instead of a Python pass per block."""
        ts = np.array([s.timestamp for s in stamps], dtype=np.float64)
        seen = np.array([s.observed_at for s in stamps], dtype=np.float64)
        numbers = np.array([s.number for s in stamps], dtype=np.int64)
        rows = max(len(stamps) - first, 0)
        figures = np.empty((5, rows))
        counts = np.empty((2, rows), dtype=np.int64)
        _clock_figures(ts, seen, numbers, first, window, figures, counts)
        positions = np.arange(first, len(stamps))
        return ClockWindow(figures[0], counts[0], figures[1], counts[1], figures[2],
                           figures[3] == 1.0, np.minimum(positions, window), figures[4],
                           ts[positions] - seen[positions])

    def drift_suspects(self, future_limit: float, min_blocks: int = 10) -> np.ndarray:
        """Rows where `drift_hit` may fire: its conditions on the row's figures, with a
        little slack, so that the exact check runs only there (a superset, never fewer)."""
        excess = self.lead - self.usual_lead
        half_gap = np.maximum(self.usual_gap / 2, 1.0)
        return (
            (self.known >= min_blocks) & self.follows
            & (self.gaps >= min_blocks // 2) & (self.leads >= min_blocks // 2)
            & ((excess > future_limit - SUSPECT_SLACK) | (-excess > half_gap - SUSPECT_SLACK))
        )


def timestamp_drift_rule(
    window: Sequence[Stamp],
    *,
    chain_id: int,
    node: str,
    future_limit: float = 15.0,
    min_blocks: int = 10,
) -> RuleHit | None:
    """The newest block of `window` carries a timestamp its producer made up.

    Ahead: stamped more than `future_limit` seconds further ahead of the moment the node
    saw it than usual (geth refuses blocks more than 15 s in the future), AND further from
    its parent than the usual interval: the producer moved the chain's clock forward.
    Honest successors that can only add 1 s to a clock already ahead are not blamed.
    Behind: stamped earlier than usual relative to its arrival by more than half the usual
    interval, AND closer to its parent than half the usual interval: a backdated block.
    A node that lags sees every block late, but at usual intervals: neither fires.
    "Usual" is the window's median interval and the median lead of the blocks that arrived
    live (not a backfill's burst), so a constant clock offset between the node and the
    collector cancels out.
    """
    clock = ClockWindow.of(window, len(window) - 1, len(window) - 1)
    return drift_hit(window[-1], window[-2] if len(window) > 1 else None, clock, 0,
                     chain_id=chain_id, node=node, future_limit=future_limit,
                     min_blocks=min_blocks)


def drift_hit(
    block: Stamp, parent: Stamp | None, clock: ClockWindow, i: int, *, chain_id: int,
    node: str, future_limit: float = 15.0, min_blocks: int = 10,
) -> RuleHit | None:
    """timestamp_drift_rule's verdict on `block` from its window's figures (`clock`, row i)."""
    if clock.known[i] < min_blocks or parent is None or not clock.follows[i]:
        return None
    if clock.gaps[i] < min_blocks // 2:
        return None
    usual_gap = float(clock.usual_gap[i])
    if clock.leads[i] < min_blocks // 2:
        return None  # too few live arrivals to know this node's usual lead
    usual_lead = float(clock.usual_lead[i])
    excess = (block.timestamp - block.observed_at) - usual_lead
    interval = block.timestamp - parent.timestamp
    if excess > future_limit and interval > usual_gap:
        verdict, amount = "ahead of", excess
        limit = future_limit
    elif -excess > max(usual_gap / 2, 1.0) and interval < usual_gap / 2:
        verdict, amount = "behind", -excess
        limit = max(usual_gap / 2, 1.0)
    else:
        return None
    return RuleHit(
        rule="timestamp_drift_rule", family="miner", severity="warning",
        chain_id=chain_id, node=node, subject_kind="miner", subject=block.miner,
        block_number=block.number, score=count_score(amount, limit),
        summary=(f"block {block.number} by {block.miner} is stamped {amount:.0f}s {verdict} "
                 f"the time {node} received it, relative to the usual (interval to its "
                 f"parent {interval:.0f}s, usual {usual_gap:.0f}s)"),
        details={"excess_seconds": excess, "interval_seconds": interval,
                 "usual_interval_seconds": usual_gap},
    )


@dataclass(frozen=True)
class Offer:
    """What a pending transaction offers a producer."""

    fee_cap: int  # max_fee_per_gas, or gas_price
    tip_cap: int  # max_priority_fee_per_gas, or gas_price
    gas: int
    first_seen_at: float
    sender: str
    nonce: int


def block_min_tip(txs: BlockTxs, quantile: float = 0.1) -> float | None:
    """A low quantile of the effective tips a block accepted (None when it has no txs).

    A low quantile, not the minimum: builders end blocks with their own zero-tip payouts.
    """
    tips = [tip for tip in txs.tips if not math.isnan(tip)]
    return float(np.quantile(tips, quantile)) if tips else None


def skipped_by(offer: Offer, block: Block, parent_seen_at: float | None,
               min_tip: float | None, next_nonce: int | None) -> bool:
    """Did `block`'s producer leave out a transaction it could and should have taken?

    It could: the tx was known a whole slot earlier (seen before the node saw the parent,
    and before the block's own timestamp), its fee cap covers the base fee, and it is its
    sender's next nonce (`next_nonce`: one above the sender's last included nonce; None
    when unknown) - a later nonce waits for a cheaper predecessor whatever it pays. It
    should: the block had gas left for it, or it accepted txs paying less than it would.
    """
    if next_nonce is not None and offer.nonce != next_nonce:
        return False
    known_before = min(parent_seen_at if parent_seen_at is not None else -math.inf,
                       float(block.timestamp))
    if offer.first_seen_at > known_before:
        return False
    base = block.base_fee_per_gas or 0
    if offer.fee_cap < base:
        return False
    room = block.gas_limit - block.gas_used >= offer.gas
    tip = min(offer.tip_cap, offer.fee_cap - base)
    return room or (min_tip is not None and tip > min_tip)
