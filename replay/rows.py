"""Table rows (CSV or Parquet, replay format or ethereum-etl) to chainwatch records.

Pure functions, no I/O. A row is a mapping of column name to value as the reader gave
it (strings from CSV, typed values from Parquet); anything wrong raises `RowError` with
a one-line reason, so the reader can report the row with its line and skip it. The
format is documented in docs/replay-format.md; keep the two in step.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from pydantic import ValidationError

from chainwatch.schema import Block, PeerSnapshot, Reorg, TxSummary
from replay.exceptions import RowError

Row = Mapping[str, Any]


def _missing(value: Any) -> bool:
    return value is None or (isinstance(value, str) and value.strip() == "") or (
        isinstance(value, float) and math.isnan(value)
    )


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def get_int(row: Row, *names: str, required: bool = True, default: int | None = None) -> int | None:
    """First present column of `names` as a non-negative int (decimal or 0x-hex text)."""
    for name in names:
        value = row.get(name)
        if _missing(value):
            continue
        if isinstance(value, bool):
            raise RowError(f"{name}: expected an integer, got {_show(value)}")
        if isinstance(value, int):
            out = value
        elif isinstance(value, float):
            if not value.is_integer():
                raise RowError(f"{name}: expected an integer, got {_show(value)}")
            out = int(value)
        else:
            text = str(value).strip()
            try:
                out = int(text, 16) if text[:2] in ("0x", "0X") else int(text)
            except ValueError:
                raise RowError(f"{name}: expected an integer, got {_show(value)}") from None
        if out < 0:
            raise RowError(f"{name}: negative value {out}")
        return out
    if required:
        raise RowError(f"missing {names[0]}")
    return default


def get_float(row: Row, name: str, *, required: bool = True) -> float | None:
    value: Any = row.get(name)
    if _missing(value):
        if required:
            raise RowError(f"missing {name}")
        return None
    try:
        out = float(value)
    except (TypeError, ValueError):
        raise RowError(f"{name}: expected a number, got {_show(value)}") from None
    if not math.isfinite(out) or out < 0:
        raise RowError(f"{name}: expected a finite non-negative number, got {_show(value)}")
    return out


def get_hex(row: Row, name: str, *, required: bool = True) -> str | None:
    """A 0x-hex string (hash, address), lower-cased like the collector's mappers do."""
    value = row.get(name)
    if _missing(value):
        if required:
            raise RowError(f"missing {name}")
        return None
    text = str(value).strip()
    if not text.startswith(("0x", "0X")):
        raise RowError(f"{name}: expected a 0x-hex string, got {_show(value)}")
    try:
        if len(text) > 2:
            int(text[2:], 16)
    except ValueError:
        raise RowError(f"{name}: not hexadecimal: {_show(value)}") from None
    return text.lower()


def get_str(row: Row, name: str, *, default: str | None = None) -> str | None:
    value = row.get(name)
    return default if _missing(value) else str(value).strip()


def get_bool(row: Row, name: str, *, default: bool) -> bool:
    value = row.get(name)
    if _missing(value):
        return default
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("true", "1", "yes", "t"):
        return True
    if text in ("false", "0", "no", "f"):
        return False
    raise RowError(f"{name}: expected true or false, got {_show(value)}")


def get_list(row: Row, name: str) -> tuple[str, ...]:
    """A list column: a Parquet list, a JSON array, or `;`-separated text."""
    value = row.get(name)
    if value is None or (isinstance(value, str) and not value.strip()):
        return ()
    if isinstance(value, list | tuple):
        return tuple(str(v) for v in value)
    text = str(value).strip()
    if text.startswith("["):
        try:
            items = json.loads(text)
        except ValueError:
            raise RowError(f"{name}: not a JSON array: {_show(value)}") from None
        return tuple(str(v) for v in items)
    return tuple(part.strip() for part in text.split(";") if part.strip())


def get_counts(row: Row, name: str) -> dict[str, int]:
    """A name -> count column: a JSON object or `Name=3;Other=1` text."""
    value = row.get(name)
    if _missing(value):
        return {}
    if isinstance(value, Mapping):
        items = dict(value)
    else:
        text = str(value).strip()
        if text.startswith("{"):
            try:
                items = json.loads(text)
            except ValueError:
                raise RowError(f"{name}: not a JSON object: {_show(value)}") from None
        else:
            items = {}
            for part in text.split(";"):
                key, sep, count = part.partition("=")
                if not sep:
                    raise RowError(f"{name}: expected Name=count;..., got {_show(value)}")
                items[key.strip()] = count.strip()
    out: dict[str, int] = {}
    for key, count in items.items():
        out[str(key)] = get_int({name: count}, name)  # type: ignore[assignment]
    return out


def _one_line(exc: ValidationError) -> str:
    first = exc.errors()[0]
    where = ".".join(str(p) for p in first.get("loc", ())) or "row"
    return f"{where}: {' '.join(str(first.get('msg', 'invalid')).split())}"


@dataclass(frozen=True)
class Defaults:
    """What ethereum-etl exports do not carry: the chain and the node they came from."""

    chain_id: int = 1
    node: str = "replay"


def map_tx(row: Row) -> TxSummary:
    """One transaction row (replay format or ethereum-etl `transactions.csv`)."""
    to_address = get_hex(row, "to_address", required=False)
    tx_input = get_str(row, "input")
    if tx_input is not None:
        if not tx_input.startswith(("0x", "0X")):
            raise RowError(f"input: expected 0x-hex calldata, got {_show(tx_input)}")
        body = tx_input[2:]
        input_size = len(body) // 2
        method_id = ("0x" + body[:8].lower()) if len(body) >= 8 else None
    else:
        input_size = get_int(row, "input_size") or 0
        method_id = get_str(row, "method_id")
    try:
        return TxSummary(
            hash=get_hex(row, "hash"),
            transaction_index=get_int(row, "transaction_index"),
            from_address=get_hex(row, "from_address"),
            to_address=to_address,
            value=get_int(row, "value", required=False, default=0),
            gas=get_int(row, "gas"),
            gas_price=get_int(row, "gas_price", required=False),
            max_fee_per_gas=get_int(row, "max_fee_per_gas", required=False),
            max_priority_fee_per_gas=get_int(row, "max_priority_fee_per_gas", required=False),
            nonce=get_int(row, "nonce"),
            tx_type=get_int(row, "tx_type", "transaction_type", required=False, default=0),
            input_size=input_size,
            method_id=method_id.lower() if method_id else None,
            is_contract_creation=to_address is None,
        )
    except ValidationError as exc:
        raise RowError(_one_line(exc)) from None


def map_block(row: Row, txs: Sequence[TxSummary], defaults: Defaults) -> Block:
    """One block row with its transactions (already matched by block number)."""
    chain_id = get_int(row, "chain_id", required=False, default=defaults.chain_id)
    node = get_str(row, "node", default=defaults.node)
    block_hash = get_hex(row, "hash")
    timestamp = get_int(row, "timestamp")
    assert chain_id is not None and node is not None and block_hash is not None
    observed_at = get_float(row, "observed_at", required=False)
    tx_count = get_int(row, "tx_count", "transaction_count", required=False, default=len(txs))
    assert tx_count is not None and timestamp is not None
    if len(txs) > tx_count:
        raise RowError(f"{len(txs)} transaction rows but the block says {tx_count}")
    try:
        return Block(
            chain_id=chain_id,
            node=node,
            event_id=get_str(row, "event_id") or Block.id_for(chain_id, node, block_hash),
            observed_at=observed_at if observed_at is not None else float(timestamp),
            number=get_int(row, "number", "block_number"),
            hash=block_hash,
            parent_hash=get_hex(row, "parent_hash"),
            timestamp=timestamp,
            miner=get_hex(row, "miner"),
            gas_used=get_int(row, "gas_used"),
            gas_limit=get_int(row, "gas_limit"),
            base_fee_per_gas=get_int(row, "base_fee_per_gas", required=False),
            tx_count=tx_count,
            size=get_int(row, "size", required=False),
            transactions=tuple(sorted(txs, key=lambda t: t.transaction_index)),
            # fewer transaction rows than the block holds: say so, as the collector does
            transactions_truncated=len(txs) < tx_count,
        )
    except ValidationError as exc:
        raise RowError(_one_line(exc)) from None


def map_reorg(row: Row, defaults: Defaults) -> Reorg:
    chain_id = get_int(row, "chain_id", required=False, default=defaults.chain_id)
    node = get_str(row, "node", default=defaults.node)
    old_hash = get_hex(row, "old_head_hash")
    new_hash = get_hex(row, "new_head_hash")
    old_number = get_int(row, "old_head_number")
    ancestor = get_int(row, "common_ancestor_number", required=False)
    assert chain_id is not None and node is not None and old_number is not None
    assert old_hash is not None and new_hash is not None
    depth = get_int(row, "depth", required=False)
    if depth is None:
        if ancestor is None:
            raise RowError("missing depth (and no common_ancestor_number to derive it)")
        depth = old_number - ancestor
    try:
        return Reorg(
            chain_id=chain_id,
            node=node,
            event_id=get_str(row, "event_id") or Reorg.id_for(chain_id, node, old_hash, new_hash),
            observed_at=get_float(row, "observed_at"),
            old_head_number=old_number,
            old_head_hash=old_hash,
            new_head_number=get_int(row, "new_head_number"),
            new_head_hash=new_hash,
            common_ancestor_number=ancestor,
            common_ancestor_hash=get_hex(row, "common_ancestor_hash", required=False),
            depth=depth,
            dropped_block_hashes=tuple(h.lower() for h in get_list(row, "dropped_block_hashes")),
            ancestor_found=get_bool(row, "ancestor_found", default=ancestor is not None),
        )
    except ValidationError as exc:
        raise RowError(_one_line(exc)) from None


def map_peers(row: Row, defaults: Defaults) -> PeerSnapshot:
    chain_id = get_int(row, "chain_id", required=False, default=defaults.chain_id)
    node = get_str(row, "node", default=defaults.node)
    observed_at = get_float(row, "observed_at")
    assert chain_id is not None and node is not None and observed_at is not None
    inbound = get_int(row, "inbound", required=False)
    outbound = get_int(row, "outbound", required=False)
    clients = get_counts(row, "clients")
    try:
        return PeerSnapshot(
            chain_id=chain_id,
            node=node,
            event_id=get_str(row, "event_id")
            or PeerSnapshot.id_for(chain_id, node, observed_at),
            observed_at=observed_at,
            peer_count=get_int(row, "peer_count"),
            detailed=get_bool(row, "detailed", default=bool(clients) or inbound is not None),
            inbound=inbound,
            outbound=outbound,
            clients=clients,
            client_versions=get_counts(row, "client_versions"),
            connected=get_list(row, "connected"),
            disconnected=get_list(row, "disconnected"),
        )
    except ValidationError as exc:
        raise RowError(_one_line(exc)) from None


@dataclass
class InvalidRows:
    """Rows that were skipped, with where and why; keeps a bounded sample and the counts.

    An archive file that cannot be read (wholly, or from some row on) is an entry too,
    counted apart (`files`): how many rows it held is not known, so it is not one row.
    """

    sample_limit: int = 1000
    count: int = 0  # rows
    files: int = 0  # unreadable files, or unreadable rests of files
    samples: list[tuple[str, str]] = field(default_factory=list)
    reasons: Counter[str] = field(default_factory=Counter)

    @property
    def entries(self) -> int:
        """Rows and unreadable files: what `samples` lists (up to `sample_limit`)."""
        return self.count + self.files

    def add(self, where: str, reason: str) -> None:
        self.count += 1
        self._note(where, reason)

    def add_file(self, where: str, reason: str) -> None:
        self.files += 1
        self._note(where, reason)

    def _note(self, where: str, reason: str) -> None:
        self.reasons[reason.split(":")[0]] += 1
        if len(self.samples) < self.sample_limit:
            self.samples.append((where, reason))
