"""Raw JSON-RPC payloads to schema records (ethereum-etl's mapper layer).

Pure functions, no I/O. Anything missing or malformed raises MalformedRpcPayload,
so a bad payload is a counted skip for the caller, never a crash.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from pydantic import ValidationError

from chainwatch.exceptions import MalformedRpcPayload
from chainwatch.schema import Block, TxSummary


def hex_to_int(value: Any, field: str) -> int:
    """Quantity as the node sends it ("0x1a"); ints pass through (some clients send them)."""
    if isinstance(value, bool):
        raise MalformedRpcPayload(f"field {field}: expected a hex quantity, got bool")
    if isinstance(value, int):
        if value < 0:
            raise MalformedRpcPayload(f"field {field}: negative quantity")
        return value
    if isinstance(value, str) and value[:2] in ("0x", "0X"):
        try:
            return int(value, 16)
        except ValueError:
            pass
    raise MalformedRpcPayload(f"field {field}: expected a hex quantity, got {_short(value)}")


def _opt_int(raw: Mapping[str, Any], key: str) -> int | None:
    value = raw.get(key)
    return None if value is None else hex_to_int(value, key)


def _req(raw: Mapping[str, Any], key: str) -> Any:
    try:
        value = raw[key]
    except KeyError:
        raise MalformedRpcPayload(f"missing field {key}") from None
    if value is None:
        raise MalformedRpcPayload(f"field {key} is null")
    return value


# Hex digits only: a JSON "\ud800" escape decodes to a lone surrogate, which crashed the
# collector when the record was hashed or serialized (found by tests/property).
_HEX_STR = re.compile(r"0x[0-9a-fA-F]*")
_HASH_CHARS = 64  # hex digits of a 32-byte hash
_ADDRESS_CHARS = 40


def _hex_str(raw: Mapping[str, Any], key: str) -> str:
    value = _req(raw, key)
    return _check_hex(value, key)


def _check_hex(value: Any, key: str, chars: int | None = None) -> str:
    if not isinstance(value, str) or not _HEX_STR.fullmatch(value):
        raise MalformedRpcPayload(f"field {key}: expected 0x-hex string, got {_short(value)}")
    if chars is not None and len(value) != chars + 2:
        # a short "hash" would be published, then taken for a fork by the next block
        raise MalformedRpcPayload(f"field {key}: expected {chars // 2} bytes, got {_short(value)}")
    return value.lower()


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def map_transaction(raw: Any) -> TxSummary:
    """One transaction object of eth_getBlockByNumber(..., true)."""
    if not isinstance(raw, Mapping):
        raise MalformedRpcPayload(f"transaction: expected an object, got {_short(raw)}")
    tx_input = raw.get("input", raw.get("data", "0x"))
    if not isinstance(tx_input, str) or not _HEX_STR.fullmatch(tx_input):
        raise MalformedRpcPayload("field input: expected 0x-hex string")
    body = tx_input[2:]
    to_address = raw.get("to")
    if to_address is not None and to_address != "":
        to_address = _check_hex(to_address, "to")
    try:
        return TxSummary(
            hash=_hex_str(raw, "hash"),
            transaction_index=hex_to_int(raw.get("transactionIndex", "0x0"), "transactionIndex"),
            from_address=_hex_str(raw, "from"),
            to_address=to_address or None,
            value=hex_to_int(_req(raw, "value"), "value"),
            gas=hex_to_int(_req(raw, "gas"), "gas"),
            gas_price=_opt_int(raw, "gasPrice"),
            max_fee_per_gas=_opt_int(raw, "maxFeePerGas"),
            max_priority_fee_per_gas=_opt_int(raw, "maxPriorityFeePerGas"),
            nonce=hex_to_int(_req(raw, "nonce"), "nonce"),
            tx_type=hex_to_int(raw.get("type") or "0x0", "type"),
            input_size=len(body) // 2,
            method_id=("0x" + body[:8].lower()) if len(body) >= 8 else None,
            is_contract_creation=not to_address,
        )
    except ValidationError as exc:
        raise MalformedRpcPayload(f"transaction: {exc.errors()[0]['msg']}") from None


def map_block(raw: Any, *, chain_id: int, node: str, observed_at: float) -> Block:
    """A full block (transactions as objects) to a `block` record."""
    if not isinstance(raw, Mapping):
        raise MalformedRpcPayload(f"block: expected an object, got {_short(raw)}")
    txs_raw = raw.get("transactions", [])
    if not isinstance(txs_raw, list):
        raise MalformedRpcPayload("field transactions: expected a list")
    # Hash-only transaction lists mean the caller asked without full objects.
    txs = tuple(map_transaction(t) for t in txs_raw)
    block_hash = _check_hex(_req(raw, "hash"), "hash", _HASH_CHARS)
    miner = raw.get("miner") or raw.get("author")
    if miner is None:
        raise MalformedRpcPayload("missing field miner")
    miner = _check_hex(miner, "miner", _ADDRESS_CHARS)
    try:
        return Block(
            chain_id=chain_id,
            node=node,
            event_id=Block.id_for(chain_id, node, block_hash),
            observed_at=observed_at,
            number=hex_to_int(_req(raw, "number"), "number"),
            hash=block_hash,
            parent_hash=_check_hex(_req(raw, "parentHash"), "parentHash", _HASH_CHARS),
            timestamp=hex_to_int(_req(raw, "timestamp"), "timestamp"),
            miner=miner.lower(),
            gas_used=hex_to_int(_req(raw, "gasUsed"), "gasUsed"),
            gas_limit=hex_to_int(_req(raw, "gasLimit"), "gasLimit"),
            base_fee_per_gas=_opt_int(raw, "baseFeePerGas"),
            tx_count=len(txs),
            size=_opt_int(raw, "size"),
            transactions=txs,
        )
    except ValidationError as exc:
        raise MalformedRpcPayload(f"block: {exc.errors()[0]['msg']}") from None
