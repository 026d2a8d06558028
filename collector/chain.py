"""Canonical-chain tracking: turns what a node reports into ordered block and reorg records.

Domain code: no web3, no Kafka. The node is reached through the small `BlockSource`
port, so unit tests drive it with an in-memory chain.

The tracker keeps a window of recent (number, hash, parent) refs in memory; that window
is also what the checkpoint persists, so a reorg that happened while the collector was
down is still found after a restart. A fork whose common ancestor lies below the window
is followed over RPC: the new branch by parent hash, the old branch by asking the node
for the old blocks by hash (nodes keep side-chain blocks for a while), up to
`max_reorg_depth` blocks.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Protocol

from chainwatch.schema import Block, Reorg


@dataclass(frozen=True, slots=True)
class BlockRef:
    number: int
    hash: str
    parent_hash: str

    @classmethod
    def of(cls, block: Block) -> BlockRef:
        return cls(block.number, block.hash, block.parent_hash)


class BlockSource(Protocol):
    """What chain tracking needs from a node. Methods return None for unknown blocks."""

    async def latest_number(self) -> int: ...

    async def block_by_number(self, number: int) -> Block | None: ...

    async def block_by_hash(self, block_hash: str) -> Block | None: ...


class ChainTracker:
    """The last `window` canonical block refs, contiguous by number and linked by parent."""

    def __init__(self, window: int = 64) -> None:
        if window < 2:
            raise ValueError("window must hold at least two blocks")
        self.window = window
        self._refs: dict[int, BlockRef] = {}

    @property
    def head(self) -> BlockRef | None:
        return self._refs[max(self._refs)] if self._refs else None

    @property
    def oldest(self) -> BlockRef | None:
        return self._refs[min(self._refs)] if self._refs else None

    def hash_at(self, number: int) -> str | None:
        ref = self._refs.get(number)
        return ref.hash if ref else None

    def extends(self, block: Block) -> bool:
        head = self.head
        return head is None or (
            block.number == head.number + 1 and block.parent_hash == head.hash
        )

    def append(self, block: Block) -> None:
        if not self.extends(block):
            raise ValueError(f"block {block.number} does not extend the tracked head")
        self._refs[block.number] = BlockRef.of(block)
        while len(self._refs) > self.window:
            del self._refs[min(self._refs)]

    def refs_above(self, number: int) -> list[BlockRef]:
        return [self._refs[n] for n in sorted(self._refs) if n > number]

    def rewind_to(self, number: int) -> None:
        """Forget every ref above `number` (they left the canonical chain)."""
        for n in [n for n in self._refs if n > number]:
            del self._refs[n]

    def reset(self) -> None:
        self._refs.clear()

    def snapshot(self) -> list[list[object]]:
        """Plain data for the checkpoint: [[number, hash, parent_hash], ...] oldest first."""
        return [[r.number, r.hash, r.parent_hash] for _, r in sorted(self._refs.items())]

    @classmethod
    def restore(cls, rows: Iterable[Iterable[object]], window: int = 64) -> ChainTracker:
        tracker = cls(window)
        for number, block_hash, parent_hash in rows:
            ref = BlockRef(int(number), str(block_hash), str(parent_hash))  # type: ignore[call-overload]
            tracker._refs[ref.number] = ref
        while len(tracker._refs) > window:
            del tracker._refs[min(tracker._refs)]
        return tracker


@dataclass(frozen=True)
class ForkResolution:
    """Outcome of following a fork back: the reorg and the new branch, oldest first."""

    reorg: Reorg
    new_branch: list[Block]


async def resolve_fork(
    tracker: ChainTracker,
    tip: Block,
    source: BlockSource,
    *,
    chain_id: int,
    node: str,
    max_reorg_depth: int,
    now: float,
) -> ForkResolution:
    """Find where `tip`'s chain leaves the tracked one, and describe the switch.

    The tracker is left unchanged; the caller adopts the result with `adopt`.
    """
    old_head = tracker.head
    assert old_head is not None, "fork resolution needs a tracked head"
    old_hashes = {r.number: r.hash for r in tracker.refs_above(-1)}
    deep_old_cursor = tracker.oldest  # extended downward over RPC when needed
    if deep_old_cursor is not None and deep_old_cursor.number > 0:
        # the oldest ref also tells its parent's hash: one more height to compare
        old_hashes[deep_old_cursor.number - 1] = deep_old_cursor.parent_hash

    branch: list[Block] = []
    ancestor: tuple[int, str] | None = None
    # the lowest height where the old and new chains were seen to differ (the tip's own
    # height counts: a node restarted with a new genesis differs at 0, where no parent is)
    lowest_compared = tip.number if tip.number in old_hashes else tip.number + 1

    if old_hashes.get(tip.number) == tip.hash:
        ancestor = (tip.number, tip.hash)  # the node went back to a block we already had
    else:
        branch.append(tip)
        cursor = tip
        old_known = True
        while cursor.number > 0 and len(branch) <= max_reorg_depth:
            parent_number = cursor.number - 1
            if old_known and parent_number <= old_head.number:
                while (
                    parent_number not in old_hashes
                    and deep_old_cursor is not None
                    and deep_old_cursor.number > parent_number
                ):
                    older = await source.block_by_hash(deep_old_cursor.parent_hash)
                    deep_old_cursor = BlockRef.of(older) if older is not None else None
                    if deep_old_cursor is not None:
                        old_hashes[deep_old_cursor.number] = deep_old_cursor.hash
                old_hash = old_hashes.get(parent_number)
                if old_hash is None:
                    # The old chain is unknown this deep (below the window, and the node
                    # no longer serves its blocks): the ancestor cannot be found. Follow
                    # the new branch on down to the limit all the same, so no new
                    # canonical block within max_reorg_depth goes undelivered; those that
                    # did not change are duplicates, dropped by event_id downstream.
                    old_known = False
                else:
                    lowest_compared = parent_number
                    if old_hash == cursor.parent_hash:
                        ancestor = (parent_number, old_hash)
                        break
            if len(branch) == max_reorg_depth:
                break
            parent = await source.block_by_hash(cursor.parent_hash)
            if parent is None:
                break
            branch.append(parent)
            cursor = parent
        branch.reverse()

    if ancestor is not None:
        depth = old_head.number - ancestor[0]
        dropped = [h for n, h in sorted(old_hashes.items()) if n > ancestor[0]]
    else:
        depth = old_head.number - lowest_compared + 1
        dropped = [h for n, h in sorted(old_hashes.items()) if n >= lowest_compared]
    new_head_number = branch[-1].number if branch else tip.number
    new_head_hash = branch[-1].hash if branch else tip.hash
    reorg = Reorg(
        chain_id=chain_id,
        node=node,
        event_id=Reorg.id_for(chain_id, node, old_head.hash, new_head_hash),
        observed_at=now,
        old_head_number=old_head.number,
        old_head_hash=old_head.hash,
        new_head_number=new_head_number,
        new_head_hash=new_head_hash,
        common_ancestor_number=ancestor[0] if ancestor else None,
        common_ancestor_hash=ancestor[1] if ancestor else None,
        depth=max(depth, 1),
        dropped_block_hashes=tuple(dropped),
        ancestor_found=ancestor is not None,
    )
    return ForkResolution(reorg=reorg, new_branch=branch)


def adopt(tracker: ChainTracker, resolution: ForkResolution) -> None:
    """Make the resolved branch canonical in the tracker."""
    reorg = resolution.reorg
    if reorg.ancestor_found and reorg.common_ancestor_number is not None:
        tracker.rewind_to(reorg.common_ancestor_number)
        if tracker.head is None:  # ancestor was below the window
            tracker.reset()
    else:
        tracker.reset()
    for block in resolution.new_branch:
        if not tracker.extends(block):
            tracker.reset()
        tracker.append(block)


class ChainFollower:
    """One step at a time, bring the tracked chain up to the node's head.

    `step` returns the records to publish, in order (a reorg before its new branch),
    at most `batch_size` blocks per call so the caller can checkpoint in between.
    """

    def __init__(
        self,
        source: BlockSource,
        tracker: ChainTracker,
        *,
        chain_id: int,
        node: str,
        max_reorg_depth: int = 128,
        batch_size: int = 100,
        start_block: int | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.source = source
        self.tracker = tracker
        self.chain_id = chain_id
        self.node = node
        self.max_reorg_depth = max_reorg_depth
        self.batch_size = batch_size
        self.start_block = start_block
        self.clock = clock
        self.node_head: int | None = None  # last head number the node reported

    async def step(self) -> list[Block | Reorg]:
        latest = await self.source.latest_number()
        self.node_head = latest
        head = self.tracker.head
        if head is None:
            return await self._start(latest)

        out: list[Block | Reorg] = []
        if latest <= head.number:
            current = await self.source.block_by_number(latest)
            if current is None or (latest == head.number and current.hash == head.hash):
                return out
            out.extend(await self._switch_to(current))
            return out

        next_number = head.number + 1
        blocks_out = 0
        while next_number <= latest and blocks_out < self.batch_size:
            block = await self.source.block_by_number(next_number)
            if block is None:
                break  # the node has not got it (yet, or any more): next step retries
            if self.tracker.extends(block):
                self.tracker.append(block)
                out.append(block)
                blocks_out += 1
            else:
                switched = await self._switch_to(block)
                out.extend(switched)
                blocks_out += len(switched) - 1
            next_number = self.tracker.head.number + 1  # type: ignore[union-attr]
        return out

    async def _start(self, latest: int) -> list[Block | Reorg]:
        number = latest if self.start_block is None else min(self.start_block, latest)
        block = await self.source.block_by_number(number)
        if block is None:
            return []
        self.tracker.append(block)
        return [block]

    async def _switch_to(self, tip: Block) -> list[Block | Reorg]:
        resolution = await resolve_fork(
            self.tracker,
            tip,
            self.source,
            chain_id=self.chain_id,
            node=self.node,
            max_reorg_depth=self.max_reorg_depth,
            now=self.clock(),
        )
        adopt(self.tracker, resolution)
        return [resolution.reorg, *resolution.new_branch]

    @property
    def lag_blocks(self) -> int:
        """How far the delivered head trails the node's last reported head."""
        head = self.tracker.head
        if head is None or self.node_head is None:
            return 0
        return max(self.node_head - head.number, 0)
