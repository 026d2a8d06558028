"""Quality of the detectors on labelled history: precision, recall, F1, latency.

Pure code (no I/O): records and labels come in as values, a report goes out. Used by
`chainwatch evaluate` (a scenario recording) and `chainwatch replay --labels` (any
history), so one label file scores the same way in both. Labels and the matching rule
are `chainwatch.labels` (documented in docs/replay-format.md, Labels).

The recording is replayed through `detector.engine.Detector` with replay's own loop
(`replay.driver.Replayer`), on a clock that is the recording's `observed_at`, so a run is
deterministic and needs no node. `chainwatch evaluate` batches as a caught-up consumer
polls (`EVALUATION_REPLAY`): one batch per delivered block, so a finding's head is the
block that made it and latency in blocks is exact, and no batch longer than one recorded
second, so pending transactions are seen as a live consumer sees them (it polls every
0.5 s), not only with the next block; the detector is ticked after each
batch and every recorded second until the next, as the live loop ticks. `chainwatch
replay` batches up to 500 records unless `--per-block`, so there heads, and latencies,
include that batching.

Scoring: findings of the generic block model (family "block") never detect a label; they
count as false unless they fall in some label's block range (then they are "excused").
Findings of another family that name a label's miner or sender inside its blocks are
excused too (the actor of an injected incident, seen by a detector of another family).
Latency: from the label's onset (first_block; for a reorg the last replaced height, where
the switch becomes visible) to the node's head when the first matching finding was made,
in blocks; and from the label's earliest record (first sight of one of its transactions,
else the first block at its onset, else `injected_at`) to the finding's observed_at, in
seconds. Normal blocks are heights not inside any label's [first_block, last_block].
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from chainwatch.labels import KIND_FAMILY, MATCH_SLACK_BLOCKS, Label, matches
from chainwatch.metrics import Metrics
from chainwatch.schema import AnyRecord, Block, Finding, PendingTx, Reorg
from detector.engine import Detector, DetectorConfig
from replay.driver import POLL_SECONDS, ReplayClock, ReplayConfig, Replayer

__all__ = ["KIND_FAMILY", "MATCH_SLACK_BLOCKS", "Label", "matches"]  # re-exported

FAMILIES: tuple[str, ...] = ("fork_risk", "tx", "miner")

TARGET_FALSE_PER_1000 = 1.0
TARGET_RECALL = 0.9
TARGET_REORG_BLOCKS = 1
TARGET_MINER_BLOCKS = 3

# a caught-up consumer: one batch per block (= `chainwatch replay --per-block`)
EVALUATION_REPLAY = ReplayConfig(per_block=True, max_batch_seconds=POLL_SECONDS)


# --- replay -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Observed:
    """A finding and the node's head when the detector made it."""

    finding: Finding
    head: int | None


@dataclass
class Replay:
    findings: list[Observed] = field(default_factory=list)
    heights: dict[tuple[int, str], set[int]] = field(default_factory=dict)
    first_seen: dict[str, float] = field(default_factory=dict)  # tx hash -> first seen
    block_seen: dict[tuple[int, str, int], float] = field(default_factory=dict)  # first record
    records: int = 0
    batches: int = 0
    failed: int = 0


class RunRecorder:
    """Gathers what scoring needs through a Replayer's hooks: heads, first sights, findings.

    `watch`: the transaction hashes whose first sight is kept (None: all of them; a long
    replay with the mempool would otherwise keep every pending hash).
    """

    def __init__(self, detector: Detector, watch: Collection[str] | None = None) -> None:
        self.detector = detector
        self.watch = watch
        self.run = Replay()
        self.heads: dict[tuple[int, str], int] = {}

    def before_batch(self, batch: list[AnyRecord]) -> None:
        out, heads = self.run, self.heads
        out.batches += 1
        for record in batch:
            out.records += 1
            key = (record.chain_id, record.node)
            if isinstance(record, Block):
                heads[key] = max(heads.get(key, record.number), record.number)
                out.heights.setdefault(key, set()).add(record.number)
                out.block_seen.setdefault((*key, record.number), record.observed_at)
            elif isinstance(record, Reorg):
                heads[key] = max(heads.get(key, record.new_head_number), record.new_head_number)
            elif isinstance(record, PendingTx):
                tx = record.hash.lower()
                if self.watch is None or tx in self.watch:
                    out.first_seen.setdefault(tx, record.first_seen_at)

    def sink(self, findings: list[Finding]) -> None:
        for f in findings:
            self.run.findings.append(Observed(f, self.heads.get((f.chain_id, f.node))))

    def after_batch(self, _stats: object, _batch: list[AnyRecord]) -> None:
        self.run.failed += len(self.detector.failed)  # reset by every process()


def replay(
    records: Iterable[AnyRecord],
    config: DetectorConfig | None = None,
    make_detector: Callable[[ReplayClock], Detector] | None = None,
    replay_config: ReplayConfig = EVALUATION_REPLAY,
) -> Replay:
    """Feed the recording through a fresh Detector on the recording's clock."""
    clock = ReplayClock()
    detector = (
        make_detector(clock)
        if make_detector is not None
        else Detector(config or DetectorConfig(), Metrics(), clock=clock,
                      clock_follows_records=True)
    )
    recorder = RunRecorder(detector)
    Replayer(detector, clock, replay_config, recorder.sink, before_batch=recorder.before_batch,
             on_batch=recorder.after_batch).run(records)
    return recorder.run


# --- scoring ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Latency:
    blocks: tuple[int, ...]
    seconds: tuple[float, ...]

    def p50_blocks(self) -> float | None:
        return float(np.median(self.blocks)) if self.blocks else None

    def max_blocks(self) -> int | None:
        return max(self.blocks) if self.blocks else None

    def p50_seconds(self) -> float | None:
        return float(np.median(self.seconds)) if self.seconds else None

    def max_seconds(self) -> float | None:
        return max(self.seconds) if self.seconds else None


@dataclass(frozen=True)
class Score:
    """Quality of one family, detector or kind."""

    name: str
    labels: int
    detected: int
    findings: int
    true_findings: int
    false_findings: int
    excused: int
    latency: Latency
    normal_blocks: int

    @property
    def recall(self) -> float | None:
        return self.detected / self.labels if self.labels else None

    @property
    def precision(self) -> float | None:
        judged = self.true_findings + self.false_findings
        return self.true_findings / judged if judged else None

    @property
    def f1(self) -> float | None:
        p, r = self.precision, self.recall
        if p is None or r is None or p + r == 0:
            return None if p is None or r is None else 0.0
        return 2 * p * r / (p + r)

    @property
    def false_per_1000(self) -> float | None:
        return 1000 * self.false_findings / self.normal_blocks if self.normal_blocks else None


@dataclass(frozen=True)
class LabelOutcome:
    label: Label
    detected_by: tuple[str, ...]
    first_detector: str | None
    latency_blocks: int | None
    latency_seconds: float | None


@dataclass(frozen=True)
class Evaluation:
    families: tuple[Score, ...]
    detectors: tuple[Score, ...]
    kinds: tuple[Score, ...]
    overall: Score
    outcomes: tuple[LabelOutcome, ...]
    blocks: int
    normal_blocks: int
    records: int
    findings: int
    failed_records: int

    def family(self, name: str) -> Score | None:
        return next((s for s in self.families if s.name == name), None)

    def kind(self, name: str) -> Score | None:
        return next((s for s in self.kinds if s.name == name), None)


def _onset_seconds(label: Label, run: Replay) -> float | None:
    times = [run.first_seen[h] for h in label.tx_hashes if h in run.first_seen]
    onset = label.onset_block
    if label.kind == "reorg" and onset is not None:
        onset += 1  # the new branch's tip is what makes the switch visible
    if onset is not None and not times:
        times = [seen for (chain_id, node) in run.heights if label.about(chain_id, node)
                 if (seen := run.block_seen.get((chain_id, node, onset))) is not None]
    return min(times) if times else label.injected_at


def _latency_seconds(finding: Finding, label: Label, run: Replay) -> float | None:
    onset = _onset_seconds(label, run)
    return None if onset is None else round(max(finding.observed_at - onset, 0.0), 3)


def _excused(finding: Finding, labels: Sequence[Label]) -> bool:
    """Neither a detection nor a false alarm: a finding about an injected incident.

    Block-model findings inside a label's blocks (that model has no labels of its own),
    and findings of another family that name a label's actor inside its blocks (the
    reorg's attacker did produce 7 of 8 blocks: true, but not what the label is about).
    """
    subject = finding.subject.lower()
    for lb in labels:
        if not (lb.about(finding.chain_id, finding.node)
                and lb.in_range(finding.block_number, MATCH_SLACK_BLOCKS)):
            continue
        if finding.family == "block" or lb.names_actor(subject):
            return True
    return False


def evaluate(run: Replay, labels: Sequence[Label]) -> Evaluation:
    """Match the replay's findings against the labels and score them."""
    findings = run.findings
    hit: list[list[int]] = [[] for _ in findings]  # finding index -> label indices
    for i, obs in enumerate(findings):
        hit[i] = [j for j, label in enumerate(labels) if matches(obs.finding, label)]
    excused = [not hit[i] and _excused(obs.finding, labels) for i, obs in enumerate(findings)]
    labelled: dict[tuple[int, str], set[int]] = {key: set() for key in run.heights}
    for lb in labels:
        if lb.first_block is not None and lb.last_block is not None:
            for key, heights in labelled.items():
                if lb.about(*key):
                    heights.update(range(lb.first_block, lb.last_block + 1))
    all_blocks = sum(len(h) for h in run.heights.values())
    normal = sum(len(h - labelled[k]) for k, h in run.heights.items())

    outcomes: list[LabelOutcome] = []
    for j, label in enumerate(labels):
        matched = [i for i in range(len(findings)) if j in hit[i]]
        if not matched:
            outcomes.append(LabelOutcome(label, (), None, None, None))
            continue
        first = findings[matched[0]]
        onset = label.onset_block
        head = first.head if first.head is not None else first.finding.block_number
        blocks = max(head - onset, 0) if head is not None and onset is not None else None
        seconds = _latency_seconds(first.finding, label, run)
        found_by = tuple(sorted({findings[i].finding.detector for i in matched}))
        outcomes.append(LabelOutcome(label, found_by, first.finding.detector, blocks, seconds))

    def score(name: str, finding_ids: list[int], label_ids: list[int],
              detector: str | None = None) -> Score:
        detected = [j for j in label_ids if outcomes[j].detected_by
                    and (detector is None or detector in outcomes[j].detected_by)]
        lat_b: list[int] = []
        lat_s: list[float] = []
        for j in detected:
            if detector is None:
                b, s = outcomes[j].latency_blocks, outcomes[j].latency_seconds
            else:
                b, s = _detector_latency(detector, labels[j], findings, hit, j, run)
            if b is not None:
                lat_b.append(b)
            if s is not None:
                lat_s.append(s)
        true = sum(1 for i in finding_ids if hit[i])
        exc = sum(1 for i in finding_ids if excused[i])
        return Score(
            name=name, labels=len(label_ids), detected=len(detected),
            findings=len(finding_ids), true_findings=true,
            false_findings=len(finding_ids) - true - exc, excused=exc,
            latency=Latency(tuple(lat_b), tuple(lat_s)), normal_blocks=normal,
        )

    everything = list(range(len(findings)))
    fams = sorted(set(FAMILIES) | {o.finding.family for o in findings})
    families = tuple(
        score(fam, [i for i in everything if findings[i].finding.family == fam],
              [j for j, lb in enumerate(labels) if lb.family == fam])
        for fam in fams
    )
    detector_names = sorted({o.finding.detector for o in findings})
    detectors = tuple(
        score(name, [i for i in everything if findings[i].finding.detector == name],
              [j for j, lb in enumerate(labels)
               if lb.family == _family_of(name, findings)], detector=name)
        for name in detector_names
    )
    kinds = tuple(
        score(kind, [i for i in everything if any(_kind(labels[j]) == kind for j in hit[i])],
              [j for j, lb in enumerate(labels) if _kind(lb) == kind])
        for kind in sorted({_kind(lb) for lb in labels})
    )
    overall = score("all", everything, list(range(len(labels))))
    return Evaluation(
        families=families, detectors=detectors, kinds=kinds, overall=overall,
        outcomes=tuple(outcomes), blocks=all_blocks, normal_blocks=normal,
        records=run.records, findings=len(findings), failed_records=run.failed,
    )


def _family_of(detector: str, findings: Sequence[Observed]) -> str:
    return next(o.finding.family for o in findings if o.finding.detector == detector)


def _detector_latency(detector: str, label: Label, findings: Sequence[Observed],
                      hit: Sequence[list[int]], j: int,
                      run: Replay) -> tuple[int | None, float | None]:
    first = next(o for i, o in enumerate(findings)
                 if j in hit[i] and o.finding.detector == detector)
    head = first.head if first.head is not None else first.finding.block_number
    onset = label.onset_block
    blocks = max(head - onset, 0) if head is not None and onset is not None else None
    return blocks, _latency_seconds(first.finding, label, run)


def _kind(label: Label) -> str:
    return label.kind or "-"


# --- targets and the report -------------------------------------------------------------


@dataclass(frozen=True)
class Target:
    name: str
    value: str
    met: bool | None  # None: nothing to judge (no labels of that kind)


def targets(ev: Evaluation) -> list[Target]:
    """The issue's targets (reported, not asserted)."""
    out: list[Target] = []
    rate = ev.overall.false_per_1000
    out.append(Target(f"<= {TARGET_FALSE_PER_1000:g} false finding per 1,000 normal blocks",
                      _num(rate, 2), None if rate is None else rate <= TARGET_FALSE_PER_1000))
    for fam in FAMILIES:
        s = ev.family(fam)
        r = s.recall if s else None
        out.append(Target(f"recall >= {TARGET_RECALL} ({fam})", _num(r),
                          None if r is None else r >= TARGET_RECALL))
    for name, kinds, limit in (("reorgs flagged within one block", ("reorg",),
                                TARGET_REORG_BLOCKS),
                               ("miner behaviour within three blocks",
                                tuple(k for k, f in KIND_FAMILY.items() if f == "miner"),
                                TARGET_MINER_BLOCKS)):
        lat = [o.latency_blocks for o in ev.outcomes if o.label.kind in kinds]
        if not lat:
            out.append(Target(name, "no labels", None))
            continue
        missed = sum(1 for b in lat if b is None)
        worst = max((b for b in lat if b is not None), default=None)
        value = f"max {worst if worst is not None else '-'} blocks"
        value += f", {missed} not detected" if missed else ""
        out.append(Target(name, value, missed == 0 and worst is not None and worst <= limit))
    return out


def _num(value: float | None, digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _score_rows(scores: Iterable[Score]) -> list[str]:
    rows = [
        "| name | labels | detected | recall | findings | true | false | excused | precision "
        "| F1 | latency p50 / max (blocks) | latency p50 / max (s) | false / 1,000 normal blocks |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for s in scores:
        lat = s.latency
        worst = lat.max_blocks() if lat.blocks else "-"
        rows.append(
            f"| {s.name} | {s.labels} | {s.detected} | {_num(s.recall)} | {s.findings} "
            f"| {s.true_findings} | {s.false_findings} | {s.excused} | {_num(s.precision)} "
            f"| {_num(s.f1)} | {_num(lat.p50_blocks(), 1)} / {worst}"
            f" | {_num(lat.p50_seconds(), 1)} / {_num(lat.max_seconds(), 1)} "
            f"| {_num(s.false_per_1000, 2)} |"
        )
    return rows


def render_markdown(ev: Evaluation, *, command: str, session: Mapping[str, Any],
                    notes: Sequence[str] = ()) -> str:
    """docs/quality.md: the tables, the scenarios, the targets and how to rerun."""
    def mark(met: bool | None) -> str:
        return "n/a" if met is None else ("met" if met else "**not met**")

    lines = [
        "# Detection quality on labelled scenarios",
        "",
        "Generated by `chainwatch evaluate` (do not edit by hand). A real anvil node runs",
        "realistic traffic with injected, labelled anomalies; the real collectors record it;",
        "the recording is replayed through the detector (`detector/evaluation.py`).",
        "",
        "Rerun:",
        "",
        "```sh",
        command,
        "```",
        "",
        "## Session",
        "",
        f"- blocks observed: {ev.blocks} ({ev.normal_blocks} normal, i.e. outside every "
        f"label's block range); records replayed: {ev.records}",
        f"- transactions: {session.get('transactions', '-')}; reorgs recorded: "
        f"{session.get('reorgs_recorded', '-')}; recording time: "
        f"{session.get('seconds', '-')} s; seed {session.get('seed', '-')}",
        f"- findings: {ev.findings}; records the detector failed on: {ev.failed_records}; "
        f"invalid record lines skipped: {session.get('invalid_lines', 0)}",
        "",
        "## Targets (issue 4)",
        "",
        "| target | value | status |",
        "|---|---|---|",
    ]
    lines += [f"| {t.name} | {t.value} | {mark(t.met)} |" for t in targets(ev)]
    lines += ["", "## Per family", "", *_score_rows([*ev.families, ev.overall]), "",
              "## Per detector", "",
              "Recall and latency of a detector count the labels of its family that it "
              "matched; precision counts its own findings.", "",
              *_score_rows(ev.detectors), "",
              "## Per injected kind", "",
              "Findings here are those matching a label of the kind.", "",
              *_score_rows(ev.kinds), "",
              "## Scenarios", "",
              "| scenario | kind | family | labels | detected | detected by |",
              "|---|---|---|---:|---:|---|"]
    groups: dict[str, list[LabelOutcome]] = {}
    for o in ev.outcomes:
        groups.setdefault(o.label.scenario or _kind(o.label), []).append(o)
    for name in sorted(groups):
        items = groups[name]
        by = sorted({d for o in items for d in o.detected_by})
        lines.append(
            f"| {name} | {_kind(items[0].label)} | {items[0].label.family} | {len(items)} "
            f"| {sum(1 for o in items if o.detected_by)} | {', '.join(by) or '-'} |"
        )
    lines += ["", "## Matching rules", "",
              "A finding matches a label by the rule of docs/replay-format.md (Labels), the "
              "same for `chainwatch replay --labels`: families, chain and node equal, and its "
              "subject is one of the label's transactions, or names the label's miner or "
              "sender inside [first_block, last_block + "
              f"{MATCH_SLACK_BLOCKS}], or (fork-risk and block findings) its block is in that "
              "range (a reorg also matches at first_block - 1, the common ancestor a "
              "rewinding node reports as its new head). Block-model findings "
              "(family `block`) never detect a label; inside a label's range they are "
              "*excused*, elsewhere false; findings of another family that name a label's "
              "miner or sender inside its range are excused too. Latency in "
              "blocks: node head at the first matching finding minus the label's onset "
              "(first_block; for a reorg its last replaced height). Latency in seconds: on the "
              "recording's clock, from the first sight of the label's transactions (or its "
              "first block) to the finding.", ""]
    if notes:
        lines += ["## What is real and what is simulated", ""]
        lines += [f"- {n}" for n in notes]
        lines.append("")
    return "\n".join(lines)
