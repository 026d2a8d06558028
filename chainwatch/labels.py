"""Ground-truth labels: the one label type and the one rule for "this finding detects it".

Labels come from the scenario runner (`labels.jsonl` of a `chainwatch evaluate` recording)
or from an analyst (`chainwatch replay --labels`); both are scored by
`detector.evaluation`, so a label file means the same to both commands. The file format
and the matching rule are documented in docs/replay-format.md (Labels); this module and
that section change together. Pure code except `read_labels`.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from chainwatch.exceptions import ChainwatchError
from chainwatch.schema import Finding

# a chain finding up to this many blocks after a label's range still detects it
MATCH_SLACK_BLOCKS = 3

KIND_FAMILY: dict[str, str] = {
    "reorg": "fork_risk", "fee_outlier": "tx", "spam_burst": "tx", "sandwich": "tx",
    "miner_dominance": "miner", "empty_blocks": "miner", "timestamp_manipulation": "miner",
    "censorship": "miner",
}


class LabelError(ChainwatchError):
    """A label that cannot be read; the message is one line."""


def _low(value: Any) -> str | None:
    return str(value).lower() if value else None


def _height(raw: Mapping[str, Any], key: str) -> int | None:
    value = raw.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | str):
        raise LabelError(f"{key}: expected a block number, got {value!r}")
    try:
        number = int(value, 0) if isinstance(value, str) else value
    except ValueError:
        raise LabelError(f"{key}: expected a block number, got {value!r}") from None
    if number < 0:
        raise LabelError(f"{key}: negative block number {number}")
    return number


@dataclass(frozen=True)
class Label:
    """One known incident. Only `family` is required; what else is given narrows matching.

    Addresses and hashes are kept lower-case. `injected_at` (recorded clock) is where the
    latency in seconds starts when the recording has nothing earlier for the label.
    """

    family: str
    first_block: int | None = None
    last_block: int | None = None
    kind: str | None = None
    node: str | None = None
    chain_id: int | None = None
    tx_hashes: tuple[str, ...] = ()
    miner: str | None = None
    sender: str | None = None
    id: str = ""
    scenario: str | None = None
    injected_at: float | None = None
    injected_wall_at: float | None = None
    details: Mapping[str, Any] = field(default_factory=dict, compare=False)
    hash_set: frozenset[str] = field(default=frozenset(), init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        set_ = object.__setattr__  # frozen: normalise once, here
        set_(self, "tx_hashes", tuple(h.lower() for h in self.tx_hashes if h))
        set_(self, "hash_set", frozenset(self.tx_hashes))  # for matching; order kept above
        set_(self, "miner", _low(self.miner))
        set_(self, "sender", _low(self.sender))
        if self.first_block is not None and self.last_block is None:
            set_(self, "last_block", self.first_block)

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any], *, default_id: str = "") -> Label:
        """A label from its JSON object (scenario runner's or hand-written); LabelError if bad."""
        family = raw.get("family")
        if not isinstance(family, str) or not family:
            raise LabelError("missing family")
        first, last = _height(raw, "first_block"), _height(raw, "last_block")
        if first is None and last is not None:
            raise LabelError("last_block without first_block")
        if first is not None and last is not None and last < first:
            raise LabelError(f"last_block {last} is before first_block {first}")
        hashes = raw.get("tx_hashes") or []
        if not isinstance(hashes, list) or not all(isinstance(h, str) for h in hashes):
            raise LabelError("tx_hashes: expected a list of strings")
        details = raw.get("details") or {}
        if not isinstance(details, dict):
            raise LabelError("details: expected a JSON object")
        chain_id = raw.get("chain_id")
        if chain_id is not None and (isinstance(chain_id, bool) or not isinstance(chain_id, int)):
            raise LabelError(f"chain_id: expected an integer, got {chain_id!r}")
        label = cls(
            family=family,
            first_block=first,
            last_block=last,
            kind=str(raw["kind"]) if raw.get("kind") else None,
            node=str(raw["node"]) if raw.get("node") else None,
            chain_id=chain_id,
            tx_hashes=tuple(hashes),
            miner=raw.get("miner"),
            sender=raw.get("sender"),
            id=str(raw.get("id") or default_id),
            scenario=str(raw.get("scenario") or raw.get("kind") or family),
            injected_at=_seconds(raw, "injected_at"),
            injected_wall_at=_seconds(raw, "injected_wall_at"),
            details=details,
        )
        if first is None and not label.has_subject:
            raise LabelError("give first_block, or tx_hashes / miner / sender")
        return label

    def to_json(self) -> str:
        """One line of labels.jsonl, in the format the scenario runner has always written."""
        body = {
            "id": self.id, "scenario": self.scenario, "family": self.family, "kind": self.kind,
            "chain_id": self.chain_id, "node": self.node, "first_block": self.first_block,
            "last_block": self.last_block, "tx_hashes": list(self.tx_hashes),
            "miner": self.miner, "sender": self.sender, "injected_at": self.injected_at,
            "injected_wall_at": self.injected_wall_at, "details": dict(self.details),
        }
        return json.dumps(body, sort_keys=True)

    @property
    def has_subject(self) -> bool:
        return bool(self.tx_hashes or self.miner or self.sender)

    @property
    def onset_block(self) -> int | None:
        """Where detection latency starts: a reorg shows at its last replaced height."""
        return self.last_block if self.kind == "reorg" else self.first_block

    def about(self, chain_id: int, node: str) -> bool:
        """Is this chain's node one the label is about? (no chain / node given: any)"""
        return (self.chain_id is None or self.chain_id == chain_id) and (
            self.node is None or self.node == node
        )

    def names_actor(self, subject: str) -> bool:
        """Does a finding's subject (lower-case) name this label's miner or sender?"""
        return any(who and who in subject for who in (self.miner, self.sender))

    def in_range(self, number: int | None, slack: int = 0) -> bool:
        if number is None or self.first_block is None or self.last_block is None:
            return False
        return self.first_block <= number <= self.last_block + slack


def _seconds(raw: Mapping[str, Any], key: str) -> float | None:
    value = raw.get(key)
    if value is None:
        return None
    try:
        return float(value)
    except (TypeError, ValueError):
        raise LabelError(f"{key}: expected unix seconds, got {value!r}") from None


def matches(finding: Finding, label: Label) -> bool:
    """Does this finding detect this label? The rule of docs/replay-format.md (Labels)."""
    if finding.family != label.family:
        return False
    if label.chain_id is not None and finding.chain_id != label.chain_id:
        return False
    if label.node is not None and finding.node != label.node:
        pair = finding.subject.split("|")  # a chain split is about both of its nodes
        if len(pair) != 2 or label.node not in pair:
            return False
    subject = finding.subject.lower()
    if subject in label.hash_set:
        return True  # a transaction hash names one incident, whatever the height
    if label.names_actor(subject):
        # an address outlives the incident: only inside the label's blocks, when both have one
        if finding.block_number is None or label.first_block is None:
            return True
        return label.in_range(finding.block_number, MATCH_SLACK_BLOCKS)
    about_chain = finding.family == "fork_risk" or finding.subject_kind == "block"
    if finding.block_number is None or not (about_chain or not label.has_subject):
        return False
    rewind = label.kind == "reorg" and label.first_block == finding.block_number + 1
    return rewind or label.in_range(finding.block_number, MATCH_SLACK_BLOCKS)


def read_labels(
    path: Path, on_error: Callable[[str, str], None] | None = None
) -> list[Label]:
    """Labels of a JSONL file. A bad line raises LabelError (`file:line: reason`), or, with
    `on_error(where, reason)`, is reported there and skipped."""
    try:
        lines = path.read_bytes().splitlines()
    except OSError as exc:
        raise LabelError(f"cannot read labels {path}: {exc.strerror}") from None
    labels: list[Label] = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        where = f"{path.name}:{number}"
        try:
            try:
                text = line.decode("utf-8")
            except UnicodeDecodeError:
                raise LabelError("not UTF-8 text") from None
            raw = json.loads(text)
            if not isinstance(raw, dict):
                raise LabelError("expected a JSON object")
            labels.append(Label.from_dict(raw, default_id=where))
        except (LabelError, ValueError) as exc:
            reason = f"not JSON ({exc.msg})" if isinstance(exc, json.JSONDecodeError) else str(exc)
            if on_error is None:
                raise LabelError(f"{where}: {reason}") from None
            on_error(where, f"label: {reason}")
    return labels
