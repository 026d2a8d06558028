"""Event schema v1: flat snake_case records with a `type` discriminator.

Every record carries `type`, `schema_version`, `chain_id`, `node`, a deterministic
`event_id` (so consumers can drop duplicates of at-least-once delivery) and
`observed_at` (unix seconds when chainwatch saw it). JSON on the wire.
Documented in docs/schema.md; keep the two in step.
"""

from __future__ import annotations

import hashlib
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError

from chainwatch.exceptions import InvalidRecord

SCHEMA_VERSION: Literal[1] = 1

INT64_MAX = 2**63 - 1
# chain ids, heights, times, counts: the detectors and the archive keep them in signed
# 64-bit columns, so a larger one is an invalid record (dead-lettered, counted), never a
# value that fails the detector's steps for its chain batch after batch. Wei amounts and
# a transaction's gas are read as floats, its nonce clamped: those stay unbounded.
Count = Annotated[int, Field(ge=0, le=INT64_MAX)]


def make_event_id(*parts: object) -> str:
    """A stable id from the parts that identify an observation (32 hex chars)."""
    joined = "\x1f".join(str(p) for p in parts)
    return hashlib.sha256(joined.encode()).hexdigest()[:32]


class _Record(BaseModel):
    # Unknown fields are ignored so that a v1 reader survives additive changes.
    model_config = ConfigDict(extra="ignore", frozen=True, allow_inf_nan=False)

    schema_version: Literal[1] = SCHEMA_VERSION
    chain_id: Count
    node: str = Field(min_length=1, max_length=128)
    event_id: str = Field(min_length=1, max_length=128)
    observed_at: float = Field(ge=0)

    def stream_key(self) -> str:
        """Kafka key of node streams: keeps one node's events in order on one partition."""
        return f"{self.chain_id}:{self.node}"


class TxSummary(BaseModel):
    """What the detectors need from one transaction, without calldata."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    hash: str
    transaction_index: Count
    from_address: str
    to_address: str | None
    value: int = Field(ge=0)
    gas: int = Field(ge=0)
    gas_price: int | None = Field(default=None, ge=0)
    max_fee_per_gas: int | None = Field(default=None, ge=0)
    max_priority_fee_per_gas: int | None = Field(default=None, ge=0)
    nonce: int = Field(ge=0)  # EIP-2681: up to 2^64 - 1 (the tx frame clamps)
    tx_type: Count = 0
    input_size: Count
    method_id: str | None
    is_contract_creation: bool


class Block(_Record):
    type: Literal["block"] = "block"
    number: Count
    hash: str
    parent_hash: str
    timestamp: Count
    miner: str
    gas_used: Count
    gas_limit: Count
    base_fee_per_gas: int | None = Field(default=None, ge=0)
    tx_count: Count
    size: Count | None = None
    transactions: tuple[TxSummary, ...] = ()
    # true when the summaries were cut to keep the message under the bus's size limit;
    # tx_count still holds the real number
    transactions_truncated: bool = False

    @staticmethod
    def id_for(chain_id: int, node: str, block_hash: str) -> str:
        return make_event_id("block", chain_id, node, block_hash)


class Reorg(_Record):
    """The node's canonical chain switched branches.

    depth = number of blocks dropped from the old canonical chain
    (old_head_number - common_ancestor_number). When the common ancestor lies deeper
    than the collector's reorg limit, `ancestor_found` is false, the ancestor fields
    are null and depth is a lower bound.
    """

    type: Literal["reorg"] = "reorg"
    old_head_number: Count
    old_head_hash: str
    new_head_number: Count
    new_head_hash: str
    common_ancestor_number: Count | None = None
    common_ancestor_hash: str | None = None
    depth: Annotated[int, Field(ge=1, le=INT64_MAX)]
    dropped_block_hashes: tuple[str, ...] = ()
    ancestor_found: bool = True

    @staticmethod
    def id_for(chain_id: int, node: str, old_head_hash: str, new_head_hash: str) -> str:
        return make_event_id("reorg", chain_id, node, old_head_hash, new_head_hash)


Severity = Literal["info", "warning", "critical"]


class FeatureDeviation(BaseModel):
    """One line of a finding's explanation: how far a feature is from normal."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    feature: str
    value: float
    normal: float
    deviation: float  # robust z-score: (value - median) / scaled IQR


class Finding(_Record):
    """Something a detector flagged. `subject` names what it is about (node, block...)."""

    type: Literal["finding"] = "finding"
    detector: str
    family: str
    severity: Severity
    score: float = Field(ge=0, le=1)
    threshold: float = Field(ge=0, le=1)
    subject_kind: Literal["node", "block", "tx", "miner"]
    subject: str
    block_number: Count | None = None
    explanation: tuple[FeatureDeviation, ...] = ()
    summary: str = ""
    model_version: str | None = None

    @staticmethod
    def id_for(chain_id: int, node: str, detector: str, subject: str) -> str:
        return make_event_id("finding", chain_id, node, detector, subject)


class NodeStatus(_Record):
    """Heartbeat of one followed node, from its collector (every poll or on change).

    Tells the detector what it cannot see from blocks alone: the node stopped answering
    (unreachable) versus answering without new heads (stalled), and how fast it should
    produce blocks.
    """

    type: Literal["node_status"] = "node_status"
    reachable: bool
    head_number: Count | None = None
    expected_block_time_seconds: float = Field(gt=0)
    error_kind: str | None = None  # rpc, malformed, ... when not reachable

    @staticmethod
    def id_for(chain_id: int, node: str, observed_at: float) -> str:
        return make_event_id("node_status", chain_id, node, repr(observed_at))


class PendingTx(_Record):
    """A transaction the node's mempool announced for the first time."""

    type: Literal["pending_tx"] = "pending_tx"
    first_seen_at: float = Field(ge=0)
    hash: str
    from_address: str
    to_address: str | None
    nonce: int = Field(ge=0)  # EIP-2681: up to 2^64 - 1 (the tx frame clamps)
    value: int = Field(ge=0)
    gas: int = Field(ge=0)
    gas_price: int | None = Field(default=None, ge=0)
    max_fee_per_gas: int | None = Field(default=None, ge=0)
    max_priority_fee_per_gas: int | None = Field(default=None, ge=0)
    tx_type: Count = 0
    input_size: Count
    method_id: str | None
    is_contract_creation: bool

    @staticmethod
    def id_for(chain_id: int, node: str, tx_hash: str) -> str:
        return make_event_id("pending_tx", chain_id, node, tx_hash)


class MempoolSnapshot(_Record):
    """Periodic summary of the node's mempool."""

    type: Literal["mempool_snapshot"] = "mempool_snapshot"
    pending_count: Count
    queued_count: Count | None = None
    tracked_count: Count  # pending txs chainwatch follows to their fate
    sender_count: Count
    priority_fee_p50: int | None = Field(default=None, ge=0)
    priority_fee_p90: int | None = Field(default=None, ge=0)
    priority_fee_p99: int | None = Field(default=None, ge=0)
    max_fee_p50: int | None = Field(default=None, ge=0)
    source: Literal["txpool", "subscription"] = "subscription"

    @staticmethod
    def id_for(chain_id: int, node: str, observed_at: float) -> str:
        return make_event_id("mempool_snapshot", chain_id, node, repr(observed_at))


TxFate = Literal["included", "replaced", "dropped", "requeued"]


class TxLifecycle(_Record):
    """What became of a pending transaction.

    included: mined in `block_number` after `inclusion_delay_seconds` (from first seen);
    replaced: same sender and nonce, new hash `replaced_by`, fee bumped by `fee_bump_ratio`;
    dropped: gone from the pool without inclusion; requeued: its block left the canonical
    chain in a reorg and the new branch does not hold it.
    """

    type: Literal["tx_lifecycle"] = "tx_lifecycle"
    hash: str
    fate: TxFate
    from_address: str
    nonce: int = Field(ge=0)  # EIP-2681: up to 2^64 - 1 (the tx frame clamps)
    block_number: Count | None = None
    block_hash: str | None = None
    inclusion_delay_seconds: float | None = None
    replaced_by: str | None = None
    fee_bump_ratio: float | None = None

    @staticmethod
    def id_for(chain_id: int, node: str, tx_hash: str, fate: str, block_hash: str | None) -> str:
        return make_event_id("tx_lifecycle", chain_id, node, tx_hash, fate, block_hash or "")


class PeerSnapshot(_Record):
    """The node's peer set. Peer ids appear only hashed (sha256, 16 hex chars)."""

    type: Literal["peer_snapshot"] = "peer_snapshot"
    peer_count: Count  # net_peerCount
    detailed: bool  # admin_peers answered; the fields below are filled
    inbound: Count | None = None
    outbound: Count | None = None
    clients: dict[str, Count] = Field(default_factory=dict)  # client name -> peers
    client_versions: dict[str, Count] = Field(default_factory=dict)  # "Geth/v1.17.10" -> peers
    connected: tuple[str, ...] = ()  # hashed ids of peers new since the last snapshot
    disconnected: tuple[str, ...] = ()  # hashed ids of peers gone since the last snapshot

    @staticmethod
    def id_for(chain_id: int, node: str, observed_at: float) -> str:
        return make_event_id("peer_snapshot", chain_id, node, repr(observed_at))


AnyRecord = (
    Block | Reorg | Finding | NodeStatus | PendingTx | MempoolSnapshot | TxLifecycle | PeerSnapshot
)
Record = Annotated[AnyRecord, Field(discriminator="type")]
_RECORD_ADAPTER: TypeAdapter[AnyRecord] = TypeAdapter(Record)


def encode(record: AnyRecord) -> bytes:
    """Record to JSON bytes for the wire."""
    return record.model_dump_json().encode()


def decode(payload: bytes | str) -> AnyRecord:
    """JSON bytes to a record; anything else raises InvalidRecord with a one-line reason."""
    try:
        return _RECORD_ADAPTER.validate_json(payload)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first.get("loc", ())) or "record"
        reason = " ".join(str(first.get("msg", "invalid")).split())  # one line, always
        raise InvalidRecord(
            f"invalid record at {where[:80]}: {reason[:200]} ({exc.error_count()} error(s))"
        ) from None
    except (UnicodeDecodeError, ValueError, TypeError) as exc:
        raise InvalidRecord(f"undecodable record: {type(exc).__name__}") from None
