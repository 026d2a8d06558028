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

SCHEMA_VERSION = 1


def make_event_id(*parts: object) -> str:
    """A stable id from the parts that identify an observation (32 hex chars)."""
    joined = "\x1f".join(str(p) for p in parts)
    return hashlib.sha256(joined.encode()).hexdigest()[:32]


class _Record(BaseModel):
    # Unknown fields are ignored so that a v1 reader survives additive changes.
    model_config = ConfigDict(extra="ignore", frozen=True)

    schema_version: Literal[1] = SCHEMA_VERSION
    chain_id: int = Field(ge=0)
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
    transaction_index: int = Field(ge=0)
    from_address: str
    to_address: str | None
    value: int = Field(ge=0)
    gas: int = Field(ge=0)
    gas_price: int | None = Field(default=None, ge=0)
    max_fee_per_gas: int | None = Field(default=None, ge=0)
    max_priority_fee_per_gas: int | None = Field(default=None, ge=0)
    nonce: int = Field(ge=0)
    tx_type: int = Field(default=0, ge=0)
    input_size: int = Field(ge=0)
    method_id: str | None
    is_contract_creation: bool


class Block(_Record):
    type: Literal["block"] = "block"
    number: int = Field(ge=0)
    hash: str
    parent_hash: str
    timestamp: int = Field(ge=0)
    miner: str
    gas_used: int = Field(ge=0)
    gas_limit: int = Field(ge=0)
    base_fee_per_gas: int | None = Field(default=None, ge=0)
    tx_count: int = Field(ge=0)
    size: int | None = Field(default=None, ge=0)
    transactions: tuple[TxSummary, ...] = ()

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
    old_head_number: int = Field(ge=0)
    old_head_hash: str
    new_head_number: int = Field(ge=0)
    new_head_hash: str
    common_ancestor_number: int | None = Field(default=None, ge=0)
    common_ancestor_hash: str | None = None
    depth: int = Field(ge=1)
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
    block_number: int | None = Field(default=None, ge=0)
    explanation: tuple[FeatureDeviation, ...] = ()
    summary: str = ""
    model_version: str | None = None

    @staticmethod
    def id_for(chain_id: int, node: str, detector: str, subject: str) -> str:
        return make_event_id("finding", chain_id, node, detector, subject)


Record = Annotated[Block | Reorg | Finding, Field(discriminator="type")]
_RECORD_ADAPTER: TypeAdapter[Block | Reorg | Finding] = TypeAdapter(Record)


def encode(record: Block | Reorg | Finding) -> bytes:
    """Record to JSON bytes for the wire."""
    return record.model_dump_json().encode()


def decode(payload: bytes | str) -> Block | Reorg | Finding:
    """JSON bytes to a record; anything else raises InvalidRecord with a one-line reason."""
    try:
        return _RECORD_ADAPTER.validate_json(payload)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first.get("loc", ())) or "record"
        raise InvalidRecord(
            f"invalid record at {where}: {first.get('msg', 'invalid')}"
            f" ({exc.error_count()} error(s))"
        ) from None
    except (UnicodeDecodeError, ValueError, TypeError) as exc:
        raise InvalidRecord(f"undecodable record: {type(exc).__name__}") from None
