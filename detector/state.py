"""Per-node chain state as the detector sees it. Domain code: no I/O.

Blocks and reorgs arrive at least once and, per node, in order (one Kafka key per
node). Duplicates are dropped by `event_id`. Each node keeps a bounded canonical
window (height -> hash, timestamp, base fee) for intervals and for inspection.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field
from typing import NamedTuple

from chainwatch.schema import Block, NodeStatus, Reorg

NodeKey = tuple[int, str]  # (chain_id, node)


class CanonicalEntry(NamedTuple):  # (named tuples: one of each per block, ~2x quicker made)
    hash: str
    parent_hash: str
    timestamp: int
    base_fee_per_gas: int | None


@dataclass
class NodeState:
    chain_id: int
    node: str
    window: int = 4096
    # ascending heights; an OrderedDict because trim drops from the front, where a dict's
    # next(iter()) scans past every slot deleted since its last resize (10x slower)
    canonical: OrderedDict[int, CanonicalEntry] = field(default_factory=OrderedDict)
    head_number: int | None = None
    head_timestamp: int | None = None
    head_seen_at: float | None = None
    blocks_observed: int = 0
    reorgs: int = 0
    first_seen_at: float | None = None
    reachable: bool | None = None  # from the collector's node_status heartbeats
    error_kind: str | None = None
    expected_block_time: float | None = None

    def trim(self) -> None:
        # `canonical` is kept in ascending height order (see apply_block): oldest first
        while len(self.canonical) > self.window:
            self.canonical.popitem(last=False)


class BlockUpdate(NamedTuple):
    """What a new block changed, with the parent facts the features need."""

    node: NodeState
    new_head: bool
    parent_timestamp: int | None
    parent_base_fee_per_gas: int | None


class SeenIds:
    """Bounded memory of event ids already processed (at-least-once delivery)."""

    def __init__(self, capacity: int = 200_000) -> None:
        self.capacity = capacity
        self._ids: OrderedDict[str, None] = OrderedDict()

    def add(self, event_id: str) -> bool:
        """True if new; False for a duplicate."""
        if event_id in self._ids:
            self._ids.move_to_end(event_id)
            return False
        self._ids[event_id] = None
        if len(self._ids) > self.capacity:
            self._ids.popitem(last=False)
        return True


class ChainState:
    def __init__(self, window: int = 4096) -> None:
        self.window = window
        self.nodes: dict[NodeKey, NodeState] = {}

    def node(self, chain_id: int, node: str) -> NodeState:
        key = (chain_id, node)
        state = self.nodes.get(key)
        if state is None:
            state = self.nodes[key] = NodeState(chain_id, node, window=self.window)
        return state

    def apply_block(self, block: Block) -> BlockUpdate:
        state = self.node(block.chain_id, block.node)
        parent = state.canonical.get(block.number - 1)
        linked = parent is not None and parent.hash == block.parent_hash
        # A block replaces whatever the node had at its height and above: either the
        # collector announced a reorg first, or we joined the stream mid-way. Deleting
        # first keeps the dict in ascending height order, so the common case is O(1).
        if state.head_number is not None and block.number <= state.head_number:
            for n in [n for n in state.canonical if n >= block.number]:
                del state.canonical[n]
        state.canonical[block.number] = CanonicalEntry(
            block.hash, block.parent_hash, block.timestamp, block.base_fee_per_gas
        )
        if len(state.canonical) > state.window:
            state.trim()
        state.blocks_observed += 1
        if state.first_seen_at is None:
            state.first_seen_at = block.observed_at
        new_head = state.head_number is None or block.number >= state.head_number
        state.head_number = block.number
        state.head_timestamp = block.timestamp
        if new_head:
            state.head_seen_at = block.observed_at
        return BlockUpdate(
            node=state,
            new_head=new_head,
            parent_timestamp=parent.timestamp if linked and parent else None,
            parent_base_fee_per_gas=parent.base_fee_per_gas if linked and parent else None,
        )

    def apply_status(self, status: NodeStatus) -> NodeState:
        state = self.node(status.chain_id, status.node)
        state.reachable = status.reachable
        state.error_kind = status.error_kind
        state.expected_block_time = status.expected_block_time_seconds
        if state.first_seen_at is None:
            state.first_seen_at = status.observed_at
        return state

    def apply_reorg(self, reorg: Reorg) -> NodeState:
        state = self.node(reorg.chain_id, reorg.node)
        state.reorgs += 1
        keep_up_to = (
            reorg.common_ancestor_number
            if reorg.common_ancestor_number is not None
            else reorg.old_head_number - reorg.depth
        )
        for n in [n for n in state.canonical if n > keep_up_to]:
            del state.canonical[n]
        return state

    def best_head(self, chain_id: int) -> int | None:
        heads = [
            s.head_number
            for (cid, _), s in self.nodes.items()
            if cid == chain_id and s.head_number is not None
        ]
        return max(heads) if heads else None

    def head_lag(self, chain_id: int, node: str) -> int:
        best = self.best_head(chain_id)
        head = self.node(chain_id, node).head_number
        return 0 if best is None or head is None else best - head

    def chain_nodes(self, chain_id: int) -> list[NodeState]:
        return [s for (cid, _), s in sorted(self.nodes.items()) if cid == chain_id]

    def describe(self, last: int = 256) -> list[dict[str, object]]:
        """JSON-ready view of each node's canonical window, for /api/v1/chain."""
        out: list[dict[str, object]] = []
        for (chain_id, node), s in sorted(self.nodes.items()):
            heights = sorted(s.canonical)[-last:] if last else sorted(s.canonical)
            out.append(
                {
                    "chain_id": chain_id,
                    "node": node,
                    "head_number": s.head_number,
                    "blocks_observed": s.blocks_observed,
                    "reorgs": s.reorgs,
                    "canonical": [[n, s.canonical[n].hash] for n in heights],
                }
            )
        return out
