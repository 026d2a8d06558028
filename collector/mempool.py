"""Pending transactions followed to their fate. Domain code: no I/O, time passed in.

The tracker sees three streams: new pending transactions (subscription or txpool),
the canonical chain the block collector delivered (blocks, reorgs), and occasional
full pool listings. From them it says what happened to each transaction: included,
replaced (same sender and nonce, new hash), dropped, or re-queued after a reorg.
Memory is bounded; evictions are counted, never silent.

The streams race each other (a pool listing can be older or newer than the last
delivered block), so the tracker remembers the txs of recent blocks: a stale listing
does not resurrect an included tx, and a tx must stay absent from the pool for the
grace period before it counts as dropped.

`export`/`restore` carry the tracked txs over a collector restart, so the txs that left
the pool (or were mined) while it was down still get their fate.
"""

from __future__ import annotations

import re
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from pydantic import ValidationError

from chainwatch.exceptions import MalformedRpcPayload
from chainwatch.schema import (
    INT64_MAX,
    Block,
    MempoolSnapshot,
    PendingTx,
    Reorg,
    TxFate,
    TxLifecycle,
)
from collector.mappers import hex_to_int

_HEX = re.compile(r"0x(?:[0-9a-f]{2})*")
_HASH_CHARS = 64
_ADDRESS_CHARS = 40
STATE_FORMAT = "chainwatch.mempool"  # what `export` writes, checked by `restore`
STATE_VERSION = 1
# remembered blocks kept in the state: the block collector's checkpoint window (64 by
# default), the most a reorg it finds at a restart can drop (~4 MB of JSON at mainnet size)
SAVED_BLOCKS = 64


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _hex(value: Any, field: str, chars: int | None = None) -> str:
    """Lower-case 0x-hex from a hex string, bytes, or a HexBytes-like `.hex()` object."""
    if isinstance(value, bytes | bytearray | memoryview):  # HexBytes is a bytes subclass
        text = "0x" + bytes(value).hex()
    elif isinstance(value, str):
        text = value.lower()
    elif hasattr(value, "hex") and not isinstance(value, int | float):  # float.hex exists
        try:
            text = value.hex()
        except Exception:  # a foreign object: any failure is a malformed payload
            raise MalformedRpcPayload(f"pending tx: field {field} is not hex") from None
        if not isinstance(text, str):
            raise MalformedRpcPayload(f"pending tx: field {field} is not hex")
        text = text.lower()
        text = text if text.startswith("0x") else "0x" + text
    elif value is None:
        raise MalformedRpcPayload(f"pending tx: missing field {field}")
    else:
        raise MalformedRpcPayload(f"pending tx: field {field} is not hex: {_short(value)}")
    if not _HEX.fullmatch(text) or (chars is not None and len(text) != chars + 2):
        raise MalformedRpcPayload(f"pending tx: field {field} is not hex: {_short(value)}")
    return text


def _opt_int(raw: Mapping[str, Any], key: str) -> int | None:
    value = raw.get(key)
    return None if value is None else hex_to_int(value, key)


def map_pending_tx(raw: Any, *, chain_id: int, node: str, first_seen_at: float) -> PendingTx:
    """A full pending transaction: a txpool_content entry, or the subscription payload
    (web3 hands that over with ints and HexBytes instead of hex strings)."""
    if not isinstance(raw, Mapping):
        raise MalformedRpcPayload(f"pending tx: expected an object, got {_short(raw)}")
    tx_hash = _hex(raw.get("hash"), "hash", _HASH_CHARS)
    data = _hex(raw.get("input", raw.get("data", "0x")), "input")
    to_raw = raw.get("to")
    to_address = None if to_raw in (None, "", "0x", b"") else _hex(to_raw, "to", _ADDRESS_CHARS)
    body = data[2:]
    try:
        return PendingTx(
            chain_id=chain_id,
            node=node,
            event_id=PendingTx.id_for(chain_id, node, tx_hash),
            observed_at=first_seen_at,
            first_seen_at=first_seen_at,
            hash=tx_hash,
            from_address=_hex(raw.get("from"), "from", _ADDRESS_CHARS),
            to_address=to_address,
            nonce=hex_to_int(raw.get("nonce"), "nonce"),
            value=hex_to_int(raw.get("value"), "value"),
            gas=hex_to_int(raw.get("gas"), "gas"),
            gas_price=_opt_int(raw, "gasPrice"),
            max_fee_per_gas=_opt_int(raw, "maxFeePerGas"),
            max_priority_fee_per_gas=_opt_int(raw, "maxPriorityFeePerGas"),
            tx_type=hex_to_int(raw.get("type") or 0, "type"),
            input_size=len(body) // 2,
            method_id=("0x" + body[:8]) if len(body) >= 8 else None,
            is_contract_creation=to_address is None,
        )
    except ValidationError as exc:
        raise MalformedRpcPayload(f"pending tx: {exc.errors()[0]['msg']}") from None


def parse_txpool_status(raw: Any) -> tuple[int, int]:
    """txpool_status -> (pending, queued)."""
    if not isinstance(raw, Mapping):
        raise MalformedRpcPayload(f"txpool_status: expected an object, got {_short(raw)}")
    counts = hex_to_int(raw.get("pending"), "pending"), hex_to_int(raw.get("queued"), "queued")
    if max(counts) > INT64_MAX:  # a count no record (or pool) can hold
        raise MalformedRpcPayload(f"txpool_status: {max(counts)} is not a pool size")
    return counts


def parse_txpool_content(raw: Any) -> tuple[list[Mapping[str, Any]], list[Mapping[str, Any]]]:
    """{"pending": {addr: {nonce: tx}}, "queued": {...}} -> (pending txs, queued txs).

    The txs stay raw: each goes through `map_pending_tx`, so one bad tx is one skip.
    """
    if not isinstance(raw, Mapping):
        raise MalformedRpcPayload(f"txpool_content: expected an object, got {_short(raw)}")
    out: list[list[Mapping[str, Any]]] = []
    for section in ("pending", "queued"):
        by_sender = raw.get(section)
        if by_sender is None:
            by_sender = {}
        if not isinstance(by_sender, Mapping):
            raise MalformedRpcPayload(f"txpool_content: {section} is not an object")
        txs: list[Mapping[str, Any]] = []
        for by_nonce in by_sender.values():
            if not isinstance(by_nonce, Mapping):
                raise MalformedRpcPayload(f"txpool_content: {section} entry is not an object")
            for tx in by_nonce.values():
                if not isinstance(tx, Mapping):
                    raise MalformedRpcPayload(f"txpool_content: {section} tx is not an object")
                txs.append(tx)
        out.append(txs)
    return out[0], out[1]


class _Fees(Protocol):
    @property
    def gas_price(self) -> int | None: ...

    @property
    def max_fee_per_gas(self) -> int | None: ...

    @property
    def max_priority_fee_per_gas(self) -> int | None: ...


def fee_bump_ratio(old: _Fees, new: _Fees) -> float | None:
    """new fee / old fee, comparing like with like: the priority fee when both have one
    (what a replacement must raise), else gas price, else max fee; None when unknown."""
    for name in ("max_priority_fee_per_gas", "gas_price", "max_fee_per_gas"):
        old_fee, new_fee = getattr(old, name), getattr(new, name)
        if old_fee is not None and new_fee is not None:
            return new_fee / old_fee if old_fee > 0 else None
    return None


def _tip(tx: PendingTx) -> int | None:
    """The fee a tx bids for inclusion: its priority fee, or its gas price when legacy."""
    if tx.max_priority_fee_per_gas is not None:
        return tx.max_priority_fee_per_gas
    return tx.gas_price


def _percentile(sorted_values: list[int], percent: int) -> int | None:
    """Nearest rank, in integers (no float rounding at the rank boundaries)."""
    if not sorted_values:
        return None
    rank = max((percent * len(sorted_values) + 99) // 100, 1)
    return sorted_values[rank - 1]


@dataclass(slots=True)
class _BlockMemory:
    """What a delivered block held: all its tx hashes, and the txs we had seen pending
    (kept whole so a reorg can put them back as pending)."""

    number: int
    hashes: tuple[str, ...]
    seen: list[PendingTx] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class RememberedBlock:
    """A delivered block as the tracker remembers it, for a reorg that drops it later."""

    hash: str
    number: int
    hashes: tuple[str, ...]  # all its txs
    seen: tuple[PendingTx, ...]  # the ones we had seen pending: re-queued if it is dropped


@dataclass(frozen=True, slots=True)
class TrackerState:
    """What survives a restart, taken at one moment (immutable: encoded in a thread)."""

    txs: tuple[PendingTx, ...]  # tracked, in tracking order
    head_number: int | None  # the last block delivered (see MempoolTracker.head_number)
    blocks: tuple[RememberedBlock, ...] = ()  # oldest first


def state_document(chain_id: int, node: str, state: TrackerState,
                   journal_from: int | None = None) -> dict[str, Any]:
    """What `MempoolTracker.restore` reads: the tracked txs, the head of the last block
    delivery they reflect, and the remembered blocks (so a reorg found after a restart
    still re-queues their txs). Absence timers are left out: a restored tx gets the whole
    grace again (its block may not be backfilled yet). Blocks after `head_number` are
    fetched again after a restart, and the announcements acknowledged after the state are
    read from the journal generations from `journal_from` on (see MempoolCollector)."""
    return {
        "format": STATE_FORMAT,
        "version": STATE_VERSION,
        "chain_id": chain_id,
        "node": node,
        "head_number": state.head_number,
        "journal_from": journal_from,
        "pending": [tx.model_dump(mode="json") for tx in state.txs],
        "blocks": [{"hash": b.hash, "number": b.number, "hashes": list(b.hashes),
                    "seen": [tx.model_dump(mode="json") for tx in b.seen]}
                   for b in state.blocks],
    }


def _restored_blocks(raw: Any) -> list[RememberedBlock]:
    """The "blocks" of a state document, checked; ValueError (one line) if malformed."""
    if not isinstance(raw, list):
        raise ValueError("mempool state: blocks is not a list")
    blocks: list[RememberedBlock] = []
    for entry in raw:
        ok = (isinstance(entry, Mapping) and isinstance(entry.get("hash"), str)
              and type(entry.get("number")) is int and isinstance(entry.get("hashes"), list)
              and all(isinstance(h, str) for h in entry["hashes"])
              and isinstance(entry.get("seen"), list))
        if not ok:
            raise ValueError("mempool state: a remembered block is malformed")
        try:
            seen = tuple(PendingTx.model_validate(tx) for tx in entry["seen"])
        except ValidationError as exc:
            raise ValueError(
                f"mempool state: invalid tx in a block: {exc.errors()[0]['msg']}") from None
        blocks.append(RememberedBlock(entry["hash"], entry["number"], tuple(entry["hashes"]),
                                      seen))
    return blocks


class MempoolTracker:
    """Follows pending txs to their fate. Each method returns the records to publish."""

    def __init__(
        self,
        chain_id: int,
        node: str,
        *,
        max_tracked: int = 50_000,
        drop_after_seconds: float = 3 * 3600,
        grace_seconds: float = 30.0,
        remember_blocks: int = 256,
    ) -> None:
        if max_tracked < 1 or remember_blocks < 1:
            raise ValueError("max_tracked and remember_blocks must be at least 1")
        self.chain_id = chain_id
        self.node = node
        self.max_tracked = max_tracked
        self.drop_after_seconds = drop_after_seconds
        self.grace_seconds = grace_seconds
        self.remember_blocks = remember_blocks
        self._pending: OrderedDict[str, PendingTx] = OrderedDict()  # tracking order
        self._by_slot: dict[tuple[str, int], str] = {}  # (sender, nonce) -> hash
        self._absent_since: dict[str, float] = {}  # tracked hash -> first poll without it
        self._blocks: OrderedDict[str, _BlockMemory] = OrderedDict()  # block hash -> txs
        self._included_in: dict[str, str] = {}  # tx hash -> block hash, remembered blocks
        self.included = self.replaced = self.dropped = self.requeued = self.evicted = 0
        self.head_number: int | None = None  # the last block delivered (on_blocks)
        self.restored_head: int | None = None  # head_number of the restored state
        self.revision = 0  # bumped when the tracked set changes: an unchanged one is not saved

    @property
    def tracked_count(self) -> int:
        return len(self._pending)

    # --- announcements ---------------------------------------------------------------

    def on_pending(self, tx: PendingTx) -> list[PendingTx | TxLifecycle]:
        """A tx the node announced: [replaced record of the one it replaces, tx], or []
        when it is known already (announced twice, or a stale listing of an included tx)."""
        if tx.hash in self._pending or tx.hash in self._included_in:
            return []
        out: list[PendingTx | TxLifecycle] = []
        previous = self._pending.get(self._by_slot.get((tx.from_address, tx.nonce), ""))
        if previous is not None:
            self._untrack(previous.hash)
            self.replaced += 1
            out.append(self._lifecycle(previous, "replaced", tx.first_seen_at,
                                       replaced_by=tx.hash,
                                       fee_bump_ratio=fee_bump_ratio(previous, tx)))
        self._track(tx)
        out.append(tx)
        return out

    # --- the canonical chain -----------------------------------------------------------

    def on_blocks(self, records: Sequence[Block | Reorg], now: float) -> list[TxLifecycle]:
        """One delivery of the block collector, in its order (a reorg before its branch).

        A tx of a dropped block is re-queued unless a later block of the same delivery
        holds it again (or holds another tx in its sender/nonce slot: then it is replaced).
        """
        out: list[TxLifecycle] = []
        # txs whose block left the chain in this delivery: hash -> (tx, block hash, number)
        orphaned: dict[str, tuple[PendingTx, str, int]] = {}
        for record in records:
            if isinstance(record, Reorg):
                for block_hash in record.dropped_block_hashes:
                    memory = self._forget_block(block_hash)
                    if memory is not None:
                        for tx in memory.seen:
                            orphaned[tx.hash] = (tx, block_hash, memory.number)
            elif record.hash not in self._blocks:  # a block delivered twice counts once
                out.extend(self._on_block(record, orphaned, now))
                self.head_number = record.number
        if orphaned:
            for tx, block_hash, number in orphaned.values():
                self.requeued += 1
                out.append(self._lifecycle(tx, "requeued", now, block_hash=block_hash,
                                           block_number=number))
                self._track(tx)
        return out

    def on_refetched_block(self, block: Block, now: float) -> list[TxLifecycle]:
        """A block from before the latest delivery, fetched again after a restore: like
        on_blocks, but it does not move head_number back."""
        head = self.head_number
        out = self.on_blocks([block], now)
        if head is not None:
            self.head_number = max(head, block.number)
        return out

    def _on_block(
        self, block: Block, orphaned: dict[str, tuple[PendingTx, str, int]], now: float
    ) -> list[TxLifecycle]:
        out: list[TxLifecycle] = []
        orphan_slots = {(t.from_address, t.nonce): h for h, (t, _, _) in orphaned.items()}
        memory = _BlockMemory(block.number, tuple(t.hash for t in block.transactions))
        for summary in block.transactions:
            slot = (summary.from_address, summary.nonce)
            if summary.hash in orphaned:  # back in the new branch: still included
                memory.seen.append(orphaned.pop(summary.hash)[0])
                continue
            tx = self._untrack(summary.hash)
            if tx is not None:
                self.included += 1
                memory.seen.append(tx)
                delay = max(block.observed_at - tx.first_seen_at, 0.0)
                out.append(self._lifecycle(tx, "included", now, block_number=block.number,
                                           block_hash=block.hash,
                                           inclusion_delay_seconds=delay))
                continue
            loser = self._untrack(self._by_slot.get(slot, ""))
            if loser is None and slot in orphan_slots:
                loser = orphaned.pop(orphan_slots.pop(slot))[0]
            if loser is not None:
                self.replaced += 1
                out.append(self._lifecycle(loser, "replaced", now, replaced_by=summary.hash,
                                           fee_bump_ratio=fee_bump_ratio(loser, summary)))
        self._remember(block.hash, memory)
        return out

    def _remember(self, block_hash: str, memory: _BlockMemory) -> None:
        self._blocks[block_hash] = memory
        for tx_hash in memory.hashes:
            self._included_in[tx_hash] = block_hash
        while len(self._blocks) > self.remember_blocks:
            self._forget_block(next(iter(self._blocks)))

    def has_block_at(self, number: int) -> bool:
        """A block of this height was delivered (and is still remembered)."""
        return any(m.number == number for m in self._blocks.values())

    def _forget_block(self, block_hash: str) -> _BlockMemory | None:
        memory = self._blocks.pop(block_hash, None)
        for tx_hash in memory.hashes if memory else ():
            if self._included_in.get(tx_hash) == block_hash:
                del self._included_in[tx_hash]
        return memory

    # --- drops -------------------------------------------------------------------------

    def on_pool_contents(self, pending_hashes: set[str], now: float) -> list[TxLifecycle]:
        """Reconcile with a full listing (lower-case hashes; pass queued ones too, a
        demoted tx is not dropped). A tx counts as dropped once first seen more than
        `grace_seconds` ago and absent from every listing for `grace_seconds`: a listing
        can be newer than the last delivered block, and an included tx is not dropped."""
        out: list[TxLifecycle] = []
        for tx_hash, tx in list(self._pending.items()):
            if tx_hash in pending_hashes:
                self._absent_since.pop(tx_hash, None)
                continue
            absent_since = self._absent_since.setdefault(tx_hash, now)
            if (now - tx.first_seen_at > self.grace_seconds
                    and now - absent_since >= self.grace_seconds):
                out.append(self._drop(tx, now))
        return out

    def expire(self, now: float) -> list[TxLifecycle]:
        """Drop txs tracked longer than `drop_after_seconds` (a full scan: re-queued txs
        keep their first_seen_at, so tracking order is not age order)."""
        old = [t for t in self._pending.values()
               if now - t.first_seen_at > self.drop_after_seconds]
        return [self._drop(tx, now) for tx in old]

    def _drop(self, tx: PendingTx, now: float) -> TxLifecycle:
        self._untrack(tx.hash)
        self.dropped += 1
        return self._lifecycle(tx, "dropped", now)

    # --- restarts ----------------------------------------------------------------------

    def tracked(self) -> tuple[PendingTx, ...]:
        """The tracked txs in tracking order (immutable records: safe to export later)."""
        return tuple(self._pending.values())

    def state(self) -> TrackerState:
        """What a restart needs, now: the tracked txs, and the last SAVED_BLOCKS blocks."""
        recent = list(self._blocks.items())[-SAVED_BLOCKS:]
        blocks = tuple(RememberedBlock(h, m.number, m.hashes, tuple(m.seen)) for h, m in recent)
        return TrackerState(self.tracked(), self.head_number, blocks)

    def export(self) -> dict[str, Any]:
        """`state()`, JSON-ready (see `state_document`)."""
        return state_document(self.chain_id, self.node, self.state())

    def restore(self, data: Any, now: float) -> list[TxLifecycle]:
        """Track the txs of an `export` again; returns the dropped records of those
        tracked longer than `drop_after_seconds` meanwhile. Raises ValueError (one line)
        when `data` is not an export of this chain and node, leaving the tracker as it was."""
        if self._pending:
            raise ValueError("mempool state: the tracker already tracks transactions")
        if not isinstance(data, Mapping) or data.get("format") != STATE_FORMAT:
            raise ValueError("not a chainwatch mempool state")
        if data.get("version") != STATE_VERSION:
            raise ValueError(f"mempool state version {_short(data.get('version'))} "
                             f"is not {STATE_VERSION}")
        if data.get("chain_id") != self.chain_id or data.get("node") != self.node:
            raise ValueError("mempool state of another chain or node")
        entries = data.get("pending")
        if not isinstance(entries, list):
            raise ValueError("mempool state: pending is not a list")
        head = data.get("head_number")  # absent in states saved before it existed
        if head is not None and (type(head) is not int or head < 0):
            raise ValueError(f"mempool state: head_number {_short(head)} is not a height")
        blocks = _restored_blocks(data.get("blocks", []))  # absent in older states
        try:
            txs = [PendingTx.model_validate(entry) for entry in entries]
        except ValidationError as exc:
            raise ValueError(f"mempool state: invalid tx: {exc.errors()[0]['msg']}") from None
        seen = [tx for b in blocks for tx in b.seen]
        if any((tx.chain_id, tx.node) != (self.chain_id, self.node) for tx in (*txs, *seen)):
            raise ValueError("mempool state: a tx of another chain or node")
        for b in blocks:
            self._remember(b.hash, _BlockMemory(b.number, b.hashes, list(b.seen)))
        for tx in txs:
            self._track(tx)
        self.restored_head = head
        if self.head_number is None:
            self.head_number = head  # what the restored txs reflect, until a delivery
        return self.expire(now)

    # --- summary -----------------------------------------------------------------------

    def snapshot(
        self, now: float, pending_count: int | None, queued_count: int | None, source: str
    ) -> MempoolSnapshot:
        """Pool counts (the node's when known, else ours) and the fee levels of tracked txs."""
        if source not in ("txpool", "subscription"):
            raise ValueError(f"snapshot source must be txpool or subscription, not {source!r}")
        tracked = self._pending.values()
        tips = sorted(f for f in map(_tip, tracked) if f is not None)
        max_fees = sorted(t.max_fee_per_gas for t in tracked if t.max_fee_per_gas is not None)
        return MempoolSnapshot(
            chain_id=self.chain_id,
            node=self.node,
            event_id=MempoolSnapshot.id_for(self.chain_id, self.node, now),
            observed_at=now,
            pending_count=pending_count if pending_count is not None else len(self._pending),
            queued_count=queued_count,
            tracked_count=len(self._pending),
            sender_count=len({t.from_address for t in tracked}),
            priority_fee_p50=_percentile(tips, 50),
            priority_fee_p90=_percentile(tips, 90),
            priority_fee_p99=_percentile(tips, 99),
            max_fee_p50=_percentile(max_fees, 50),
            source=source,
        )

    # --- bookkeeping -------------------------------------------------------------------

    def _track(self, tx: PendingTx) -> None:
        self.revision += 1
        self._pending[tx.hash] = tx
        self._by_slot[(tx.from_address, tx.nonce)] = tx.hash
        while len(self._pending) > self.max_tracked:
            self._untrack(next(iter(self._pending)))
            self.evicted += 1

    def _untrack(self, tx_hash: str) -> PendingTx | None:
        tx = self._pending.pop(tx_hash, None)
        if tx is not None:
            self.revision += 1
            self._absent_since.pop(tx_hash, None)
            if self._by_slot.get((tx.from_address, tx.nonce)) == tx_hash:
                del self._by_slot[(tx.from_address, tx.nonce)]
        return tx

    def _lifecycle(self, tx: PendingTx, fate: TxFate, now: float, **extra: Any) -> TxLifecycle:
        return TxLifecycle(
            chain_id=self.chain_id,
            node=self.node,
            event_id=TxLifecycle.id_for(self.chain_id, self.node, tx.hash, fate,
                                        extra.get("block_hash")),
            observed_at=now,
            hash=tx.hash,
            fate=fate,
            from_address=tx.from_address,
            nonce=tx.nonce,
            **extra,
        )
