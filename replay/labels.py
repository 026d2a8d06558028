"""Ground-truth labels for a replay, and precision / recall / detection latency.

Label file: JSONL, one incident per line:
`{"family", "kind", "node", "first_block", "last_block", "tx_hashes", "miner"}`
(every key but `family` and `first_block` optional). This is the shared contract with
`detector/evaluation.py`; that module did not exist when this was written, so this is a
small matcher of its own. Pure code except `read_labels`.

A finding matches a label when the families agree, the label's node (if any) is the
finding's node or one side of a split, the finding's block is inside
[first_block, last_block], and for tx / miner labels its subject is one of the label's
transactions / its miner.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from chainwatch.schema import Finding
from replay.exceptions import ReplayError, RowError
from replay.rows import InvalidRows, get_int


@dataclass(frozen=True)
class Label:
    family: str
    first_block: int
    last_block: int
    kind: str | None = None
    node: str | None = None
    tx_hashes: frozenset[str] = frozenset()
    miner: str | None = None

    def matches(self, f: Finding) -> bool:
        if f.family != self.family or f.block_number is None:
            return False
        if not self.first_block <= f.block_number <= self.last_block:
            return False
        if self.node is not None and self.node != f.node and self.node not in f.subject.split("|"):
            return False
        if self.tx_hashes and (f.subject_kind != "tx" or f.subject.lower() not in self.tx_hashes):
            return False
        return not (
            self.miner is not None
            and (f.subject_kind != "miner" or f.subject.lower() != self.miner)
        )


def parse_label(raw: Mapping[str, Any]) -> Label:
    family = raw.get("family")
    if not isinstance(family, str) or not family:
        raise RowError("missing family")
    first = get_int(raw, "first_block")
    last = get_int(raw, "last_block", required=False, default=first)
    assert first is not None and last is not None
    if last < first:
        raise RowError(f"last_block {last} is before first_block {first}")
    hashes = raw.get("tx_hashes") or []
    if not isinstance(hashes, list) or not all(isinstance(h, str) for h in hashes):
        raise RowError("tx_hashes: expected a list of strings")
    miner = raw.get("miner")
    node = raw.get("node")
    kind = raw.get("kind")
    return Label(
        family=family,
        first_block=first,
        last_block=last,
        kind=str(kind) if kind else None,
        node=str(node) if node else None,
        tx_hashes=frozenset(h.lower() for h in hashes),
        miner=str(miner).lower() if miner else None,
    )


def read_labels(path: Path, invalid: InvalidRows) -> list[Label]:
    try:
        lines = path.read_text().splitlines()
    except OSError as exc:
        raise ReplayError(f"cannot read labels {path}: {exc.strerror}") from None
    labels: list[Label] = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            raw = json.loads(line)
            if not isinstance(raw, dict):
                raise RowError("expected a JSON object")
            labels.append(parse_label(raw))
        except (RowError, ValueError) as exc:
            invalid.add(f"{path.name}:{number}", f"label: {exc}")
    return labels


@dataclass(frozen=True)
class FamilyScore:
    family: str
    findings: int
    true_positives: int  # findings that match a label
    labels: int
    detected: int  # labels matched by at least one finding
    latency_blocks_median: float | None  # first matching finding's block - first_block
    latency_seconds_median: float | None  # its observed_at - the first block's observed_at

    @property
    def precision(self) -> float | None:
        return self.true_positives / self.findings if self.findings else None

    @property
    def recall(self) -> float | None:
        return self.detected / self.labels if self.labels else None


def _median(values: list[float]) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    mid = len(ordered) // 2
    return ordered[mid] if len(ordered) % 2 else (ordered[mid - 1] + ordered[mid]) / 2


def evaluate(
    findings: Iterable[Finding], labels: list[Label], block_seen_at: Mapping[int, float]
) -> list[FamilyScore]:
    """Per labelled family: precision over its findings, recall and latency over its labels."""
    findings = list(findings)
    out: list[FamilyScore] = []
    for family in sorted({label.family for label in labels}):
        fam_labels = [lb for lb in labels if lb.family == family]
        fam_findings = [f for f in findings if f.family == family]
        tp = sum(any(lb.matches(f) for lb in fam_labels) for f in fam_findings)
        lat_blocks: list[float] = []
        lat_seconds: list[float] = []
        detected = 0
        for label in fam_labels:
            hits = [f for f in fam_findings if label.matches(f)]
            if not hits:
                continue
            detected += 1
            first = min(hits, key=lambda f: (f.observed_at, f.block_number or 0))
            assert first.block_number is not None
            lat_blocks.append(float(first.block_number - label.first_block))
            seen = block_seen_at.get(label.first_block)
            if seen is not None:
                lat_seconds.append(max(first.observed_at - seen, 0.0))
        out.append(
            FamilyScore(family, len(fam_findings), tp, len(fam_labels), detected,
                        _median(lat_blocks), _median(lat_seconds))
        )
    return out
