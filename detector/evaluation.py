"""Quality of the detectors on a labelled recording: precision, recall, F1, latency.

Pure code (no I/O): records and labels come in as values, a report goes out. The
recording is replayed through `detector.engine.Detector` exactly as a consumer feeds it
(one batch per delivered block, `tick()` after each), on a clock that is the recording's
own `observed_at`, so a run is deterministic and needs no node.

Matching (the contract with `chainwatch.scenarios`): a finding matches a label when the
families and nodes are equal and
- its subject is one of the label's transactions, or
- its subject contains the label's miner or sender (case-insensitive), or
- it is about the chain (family fork_risk or subject kind block) and its block number is
  within [first_block, last_block + 3] (for a reorg from first_block - 1: a node that
  rewinds before switching is reported with its new head at the common ancestor).
Findings of the generic block model (family "block") never detect a label; they count as
false unless they fall in some label's block range (then they are "excused").

Latency: from the label's onset (first_block; for a reorg the last replaced height,
where the switch becomes visible) to the node's head when the first matching finding was
made, in blocks; and from the label's earliest record (first sight of one of its
transactions, else the first block at its onset) to the finding's observed_at, in
seconds. Normal blocks are heights not inside any label's [first_block, last_block].
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from chainwatch.metrics import Metrics
from chainwatch.schema import AnyRecord, Block, Finding, PendingTx, Reorg
from detector.engine import Detector, DetectorConfig

FAMILIES: tuple[str, ...] = ("fork_risk", "tx", "miner")
MATCH_SLACK_BLOCKS = 3  # a chain finding up to 3 blocks after a label's range still counts

TARGET_FALSE_PER_1000 = 1.0
TARGET_RECALL = 0.9
TARGET_REORG_BLOCKS = 1
TARGET_MINER_BLOCKS = 3


@dataclass(frozen=True)
class Label:
    """One injected anomaly, as written by the scenario runner (labels.jsonl)."""

    id: str
    scenario: str
    family: str
    kind: str
    chain_id: int
    node: str
    first_block: int | None
    last_block: int | None
    tx_hashes: frozenset[str]
    miner: str | None
    sender: str | None
    injected_at: float

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any]) -> Label:
        def low(value: Any) -> str | None:
            return str(value).lower() if value else None

        first, last = raw.get("first_block"), raw.get("last_block")
        return cls(
            id=str(raw["id"]),
            scenario=str(raw.get("scenario") or raw["kind"]),
            family=str(raw["family"]),
            kind=str(raw["kind"]),
            chain_id=int(raw["chain_id"]),
            node=str(raw["node"]),
            first_block=int(first) if first is not None else None,
            last_block=int(last if last is not None else first) if first is not None else None,
            tx_hashes=frozenset(str(h).lower() for h in raw.get("tx_hashes") or ()),
            miner=low(raw.get("miner")),
            sender=low(raw.get("sender")),
            injected_at=float(raw.get("injected_at") or 0.0),
        )

    @property
    def onset_block(self) -> int | None:
        return self.last_block if self.kind == "reorg" else self.first_block

    def in_range(self, number: int | None, slack: int = 0) -> bool:
        if number is None or self.first_block is None or self.last_block is None:
            return False
        return self.first_block <= number <= self.last_block + slack


def matches(finding: Finding, label: Label) -> bool:
    """Does this finding detect this label? (see the module docstring)"""
    if finding.family != label.family or finding.node != label.node:
        return False
    if finding.chain_id != label.chain_id:
        return False
    subject = finding.subject.lower()
    if subject in label.tx_hashes:
        return True
    if any(who and who in subject for who in (label.miner, label.sender)):
        return True
    about_chain = finding.family == "fork_risk" or finding.subject_kind == "block"
    if not about_chain or finding.block_number is None:
        return False
    rewind = label.kind == "reorg" and label.first_block == finding.block_number + 1
    return rewind or label.in_range(finding.block_number, MATCH_SLACK_BLOCKS)


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


def batches(records: Iterable[AnyRecord]) -> Iterable[list[AnyRecord]]:
    """What a consumer would poll: everything up to and including each block."""
    batch: list[AnyRecord] = []
    for record in records:
        batch.append(record)
        if isinstance(record, Block):
            yield batch
            batch = []
    if batch:
        yield batch


def replay(
    records: Iterable[AnyRecord],
    config: DetectorConfig | None = None,
    make_detector: Callable[[Callable[[], float]], Detector] | None = None,
) -> Replay:
    """Feed the recording through a fresh Detector on the recording's clock."""
    now = [0.0]

    def clock() -> float:
        return now[0]

    detector = (
        make_detector(clock)
        if make_detector is not None
        else Detector(config or DetectorConfig(), Metrics(), clock=clock)
    )
    out = Replay()
    heads: dict[tuple[int, str], int] = {}
    for batch in batches(records):
        out.batches += 1
        for record in batch:
            out.records += 1
            now[0] = max(now[0], record.observed_at)
            key = (record.chain_id, record.node)
            if isinstance(record, Block):
                heads[key] = max(heads.get(key, record.number), record.number)
                out.heights.setdefault(key, set()).add(record.number)
                out.block_seen.setdefault((*key, record.number), record.observed_at)
            elif isinstance(record, Reorg):
                heads[key] = max(heads.get(key, record.new_head_number), record.new_head_number)
            elif isinstance(record, PendingTx):
                out.first_seen.setdefault(record.hash.lower(), record.first_seen_at)
        found = detector.process(batch)
        out.failed += len(detector.failed)
        found += detector.tick()
        for f in found:
            out.findings.append(Observed(f, heads.get((f.chain_id, f.node))))
    return out


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


def _onset_seconds(label: Label, run: Replay) -> float:
    times = [run.first_seen[h] for h in label.tx_hashes if h in run.first_seen]
    onset = label.onset_block
    if label.kind == "reorg" and onset is not None:
        onset += 1  # the new branch's tip is what makes the switch visible
    if onset is not None:
        seen = run.block_seen.get((label.chain_id, label.node, onset))
        if seen is not None and not times:
            times.append(seen)
    return min(times) if times else label.injected_at


def evaluate(run: Replay, labels: Sequence[Label]) -> Evaluation:
    """Match the replay's findings against the labels and score them."""
    findings = run.findings
    hit: list[list[int]] = [[] for _ in findings]  # finding index -> label indices
    for i, obs in enumerate(findings):
        hit[i] = [j for j, label in enumerate(labels) if matches(obs.finding, label)]
    excused = [
        not hit[i] and obs.finding.family == "block"
        and any(lb.node == obs.finding.node and lb.in_range(obs.finding.block_number,
                                                            MATCH_SLACK_BLOCKS)
                for lb in labels)
        for i, obs in enumerate(findings)
    ]
    labelled: dict[tuple[int, str], set[int]] = {}
    for lb in labels:
        if lb.first_block is not None and lb.last_block is not None:
            labelled.setdefault((lb.chain_id, lb.node), set()).update(
                range(lb.first_block, lb.last_block + 1))
    all_blocks = sum(len(h) for h in run.heights.values())
    normal = sum(len(h - labelled.get(k, set())) for k, h in run.heights.items())

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
        seconds = max(first.finding.observed_at - _onset_seconds(label, run), 0.0)
        detectors = tuple(sorted({findings[i].finding.detector for i in matched}))
        outcomes.append(LabelOutcome(label, detectors, first.finding.detector, blocks,
                                     round(seconds, 3)))

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
        score(kind, [i for i in everything if any(labels[j].kind == kind for j in hit[i])],
              [j for j, lb in enumerate(labels) if lb.kind == kind])
        for kind in sorted({lb.kind for lb in labels})
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
    return blocks, round(max(first.finding.observed_at - _onset_seconds(label, run), 0.0), 3)


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


KIND_FAMILY: dict[str, str] = {
    "reorg": "fork_risk", "fee_outlier": "tx", "spam_burst": "tx", "sandwich": "tx",
    "miner_dominance": "miner", "empty_blocks": "miner", "timestamp_manipulation": "miner",
    "censorship": "miner",
}


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
        f"- findings: {ev.findings}; records the detector failed on: {ev.failed_records}",
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
        groups.setdefault(o.label.scenario, []).append(o)
    for name in sorted(groups):
        items = groups[name]
        by = sorted({d for o in items for d in o.detected_by})
        lines.append(
            f"| {name} | {items[0].label.kind} | {items[0].label.family} | {len(items)} "
            f"| {sum(1 for o in items if o.detected_by)} | {', '.join(by) or '-'} |"
        )
    lines += ["", "## Matching rules", "",
              "A finding matches a label when families and nodes are equal and its subject is "
              "one of the label's transactions, or contains the label's miner or sender, or "
              "(fork-risk and block findings) its block is within [first_block, last_block + "
              f"{MATCH_SLACK_BLOCKS}] (a reorg also matches at first_block - 1, the common "
              "ancestor a rewinding node reports as its new head). Block-model findings "
              "(family `block`) never detect a label; inside a label's range they are "
              "*excused*, elsewhere false. Latency in "
              "blocks: node head at the first matching finding minus the label's onset "
              "(first_block; for a reorg its last replaced height). Latency in seconds: on the "
              "recording's clock, from the first sight of the label's transactions (or its "
              "first block) to the finding.", ""]
    if notes:
        lines += ["## What is real and what is simulated", ""]
        lines += [f"- {n}" for n in notes]
        lines.append("")
    return "\n".join(lines)
