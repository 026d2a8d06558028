"""Pending transactions followed to their fate. Domain code: no I/O, time passed in.

The tracker sees three streams: new pending transactions (subscription or txpool),
the canonical chain the block collector delivered (blocks, reorgs), and occasional
full pool listings. From them it says what happened to each transaction: included,
replaced (same sender and nonce, new hash), dropped, or re-queued after a reorg.
Memory is bounded; evictions are counted, never silent.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from pydantic import ValidationError

from chainwatch.exceptions import MalformedRpcPayload
from chainwatch.schema import Block, MempoolSnapshot, PendingTx, Reorg, TxLifecycle
from collector.mappers import hex_to_int


def _hex(value: Any, field: str, *, required: bool = True) -> str | None:
    """0x-hex string from a hex string or bytes (web3 formats hashes as HexBytes)."""
    if value is None:
        if required:
            raise MalformedRpcPayload(f"pending tx: missing field {field}")
        return None
    if isinstance(value, bytes | bytearray):
        return "0x" + bytes(value).hex()
    if isinstance(value, str) and value[:2] in ("0x", "0X"):
        return value.lower()
    raise MalformedRpcPayload(f"pending tx: field {field} is not hex")


def _opt_int(raw: Mapping[str, Any], key: str) -> int | None:
    value = raw.get(key)
    return None if value is None else hex_to_int(value, key)


def map_pending_tx(raw: Any, *, chain_id: int, node: str, first_seen_at: float) -> PendingTx:
    """A full pending transaction (subscription payload or txpool_content entry)."""
    if not isinstance(raw, Mapping):
        raise MalformedRpcPayload("pending tx: expected an object")
    tx_hash = _hex(raw.get("hash"), "hash")
    assert tx_hash is not None
    data = _hex(raw.get("input", raw.get("data", "0x")), "input") or "0x"
    to_address = _hex(raw.get("to"), "to", required=False)
    body = data[2:]
    try:
        return PendingTx(
            chain_id=chain_id,
            node=node,
            event_id=PendingTx.id_for(chain_id, node, tx_hash),
            observed_at=first_seen_at,
            first_seen_at=first_seen_at,
            hash=tx_hash,
            from_address=_hex(raw.get("from"), "from") or "",
            to_address=to_address if to_address and to_address != "0x" else None,
            nonce=hex_to_int(raw.get("nonce"), "nonce"),
            value=hex_to_int(raw.get("value", 0), "value"),
            gas=hex_to_int(raw.get("gas"), "gas"),
            gas_price=_opt_int(raw, "gasPrice"),
            max_fee_per_gas=_opt_int(raw, "maxFeePerGas"),
            max_priority_fee_per_gas=_opt_int(raw, "maxPriorityFeePerGas"),
            tx_type=hex_to_int(raw.get("type") or 0, "type"),
            input_size=len(body) // 2,
            method_id=("0x" + body[:8]) if len(body) >= 8 else None,
            is_contract_creation=not to_address or to_address == "0x",
        )
    except ValidationError as exc:
        raise MalformedRpcPayload(f"pending tx: {exc.errors()[0]['msg']}") from None


def parse_txpool_status(raw: Any) -> tuple[int, int]:
    if not isinstance(raw, Mapping):
        raise MalformedRpcPayload("txpool_status: expected an object")
    return hex_to_int(raw.get("pending"), "pending"), hex_to_int(raw.get("queued"), "queued")


def parse_txpool_content(raw: Any) -> tuple[list[Mapping[str, Any]], list[Mapping[str, Any]]]:
    """{"pending": {addr: {nonce: tx}}, "queued": {...}} -> (pending txs, queued txs)."""
    if not isinstance(raw, Mapping):
        raise MalformedRpcPayload("txpool_content: expected an object")
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


def _fee(tx: PendingTx) -> int | None:
    """The fee that competes for inclusion: priority fee, else legacy gas price."""
    if tx.max_priority_fee_per_gas is not None:
        return tx.max_priority_fee_per_gas
    if tx.gas_price is not None:
        return tx.gas_price
    return tx.max_fee_per_gas


def _percentile(sorted_values: list[int], q: float) -> int | None:
    if not sorted_values:
        return None
    rank = max(int(-(-q * len(sorted_values) // 1)), 1)  # nearest rank
    return sorted_values[min(rank, len(sorted_values)) - 1]


@dataclass(frozen=True, slots=True)
class _Included:
    hash: str
    from_address: str
    nonce: int
    tx: PendingTx | None  # the pending record, when we saw it pending


class MempoolTracker:
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
        self.chain_id = chain_id
        self.node = node
        self.max_tracked = max_tracked
        self.drop_after_seconds = drop_after_seconds
        self.grace_seconds = grace_seconds
        self.remember_blocks = remember_blocks
        self._pending: OrderedDict[str, PendingTx] = OrderedDict()  # oldest first
        self._by_slot: dict[tuple[str, int], str] = {}  # (sender, nonce) -> hash
        self._included: OrderedDict[str, tuple[int, list[_Included]]] = OrderedDict()
        self.included = self.replaced = self.dropped = self.requeued = self.evicted = 0

    @property
    def tracked_count(self) -> int:
        return len(self._pending)

    def _lifecycle(self, tx: PendingTx, fate: str, now: float, **extra: Any) -> TxLifecycle:
        block_hash = extra.get("block_hash")
        return TxLifecycle(
            chain_id=self.chain_id,
            node=self.node,
            event_id=TxLifecycle.id_for(self.chain_id, self.node, tx.hash, fate, block_hash),
            observed_at=now,
            hash=tx.hash,
            fate=fate,  # type: ignore[arg-type]
            from_address=tx.from_address,
            nonce=tx.nonce,
            **extra,
        )

    def _untrack(self, tx_hash: str) -> PendingTx | None:
        tx = self._pending.pop(tx_hash, None)
        if tx is not None and self._by_slot.get((tx.from_address, tx.nonce)) == tx_hash:
            del self._by_slot[(tx.from_address, tx.nonce)]
        return tx

    def _track(self, tx: PendingTx) -> None:
        self._pending[tx.hash] = tx
        self._by_slot[(tx.from_address, tx.nonce)] = tx.hash
        while len(self._pending) > self.max_tracked:
            oldest = next(iter(self._pending))
            self._untrack(oldest)
            self.evicted += 1

    def on_pending(self, tx: PendingTx) -> list[PendingTx | TxLifecycle]:
        if tx.hash in self._pending:
            return []
        out: list[PendingTx | TxLifecycle] = []
        previous_hash = self._by_slot.get((tx.from_address, tx.nonce))
        if previous_hash is not None and previous_hash != tx.hash:
            old = self._untrack(previous_hash)
            if old is not None:
                old_fee, new_fee = _fee(old), _fee(tx)
                bump = new_fee / old_fee if old_fee and new_fee is not None else None
                self.replaced += 1
                out.append(
                    self._lifecycle(
                        old, "replaced", tx.first_seen_at, replaced_by=tx.hash,
                        fee_bump_ratio=bump,
                    )
                )
        self._track(tx)
        out.append(tx)
        return out

    def on_blocks(self, records: list[Block | Reorg], now: float) -> list[TxLifecycle]:
        out: list[TxLifecycle] = []
        dropped_blocks: list[str] = []
        reincluded: set[str] = set()
        for record in records:
            if isinstance(record, Reorg):
                dropped_blocks.extend(record.dropped_block_hashes)
                continue
            remembered: list[_Included] = []
            for tx in record.transactions:
                reincluded.add(tx.hash)
                pending = self._untrack(tx.hash)
                if pending is not None:
                    self.included += 1
                    out.append(
                        self._lifecycle(
                            pending, "included", now, block_number=record.number,
                            block_hash=record.hash,
                            inclusion_delay_seconds=max(
                                record.observed_at - pending.first_seen_at, 0.0
                            ),
                        )
                    )
                else:
                    slot_hash = self._by_slot.get((tx.from_address, tx.nonce))
                    if slot_hash is not None and slot_hash != tx.hash:
                        loser = self._untrack(slot_hash)
                        if loser is not None:
                            self.replaced += 1
                            out.append(self._lifecycle(loser, "replaced", now,
                                                       replaced_by=tx.hash))
                remembered.append(_Included(tx.hash, tx.from_address, tx.nonce, pending))
            self._remember(record, remembered)
        for block_hash in dropped_blocks:
            entry = self._included.pop(block_hash, None)
            if entry is None:
                continue
            for inc in entry[1]:
                if inc.hash in reincluded or inc.tx is None:
                    continue
                self.requeued += 1
                out.append(self._lifecycle(inc.tx, "requeued", now, block_hash=block_hash,
                                           block_number=entry[0]))
                self._track(inc.tx)
        return out

    def _remember(self, block: Block, txs: list[_Included]) -> None:
        self._included[block.hash] = (block.number, txs)
        while len(self._included) > self.remember_blocks:
            self._included.popitem(last=False)

    def on_pool_contents(self, pending_hashes: set[str], now: float) -> list[TxLifecycle]:
        out: list[TxLifecycle] = []
        for tx_hash, tx in list(self._pending.items()):
            if tx_hash not in pending_hashes and now - tx.first_seen_at > self.grace_seconds:
                self._untrack(tx_hash)
                self.dropped += 1
                out.append(self._lifecycle(tx, "dropped", now))
        return out

    def expire(self, now: float) -> list[TxLifecycle]:
        out: list[TxLifecycle] = []
        # a full scan: re-queued txs keep their old first_seen_at, so the tracking order
        # is not the age order (this runs once per snapshot interval)
        for tx in [t for t in self._pending.values()
                   if now - t.first_seen_at > self.drop_after_seconds]:
            self._untrack(tx.hash)
            self.dropped += 1
            out.append(self._lifecycle(tx, "dropped", now))
        return out

    def snapshot(
        self, now: float, pending_count: int | None, queued_count: int | None, source: str
    ) -> MempoolSnapshot:
        fees = sorted(f for f in (_fee(t) for t in self._pending.values()) if f is not None)
        max_fees = sorted(
            t.max_fee_per_gas for t in self._pending.values() if t.max_fee_per_gas is not None
        )
        return MempoolSnapshot(
            chain_id=self.chain_id,
            node=self.node,
            event_id=MempoolSnapshot.id_for(self.chain_id, self.node, now),
            observed_at=now,
            pending_count=pending_count if pending_count is not None else len(self._pending),
            queued_count=queued_count,
            tracked_count=len(self._pending),
            sender_count=len({t.from_address for t in self._pending.values()}),
            priority_fee_p50=_percentile(fees, 0.5),
            priority_fee_p90=_percentile(fees, 0.9),
            priority_fee_p99=_percentile(fees, 0.99),
            max_fee_p50=_percentile(max_fees, 0.5),
            source="txpool" if source == "txpool" else "subscription",
        )
