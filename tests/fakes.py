"""In-memory stand-ins for unit tests (the real ones are exercised by integration tests)."""

from __future__ import annotations

from collections.abc import Iterable

from chainwatch.bus import Bus, Consumer
from chainwatch.exceptions import BusError
from chainwatch.schema import AnyRecord, Block, make_event_id


def make_block(
    number: int,
    parent_hash: str,
    branch: str = "a",
    *,
    chain_id: int = 1,
    node: str = "n1",
    timestamp: int | None = None,
    tx_count: int = 0,
    observed_at: float | None = None,
) -> Block:
    block_hash = "0x" + make_event_id(branch, number, parent_hash).ljust(64, "0")
    ts = timestamp if timestamp is not None else 1_700_000_000 + 12 * number
    return Block(
        chain_id=chain_id,
        node=node,
        event_id=Block.id_for(chain_id, node, block_hash),
        observed_at=observed_at if observed_at is not None else ts + 0.5,
        number=number,
        hash=block_hash,
        parent_hash=parent_hash,
        timestamp=ts,
        miner="0x" + "11" * 20,
        gas_used=15_000_000,
        gas_limit=30_000_000,
        base_fee_per_gas=10**10,
        tx_count=tx_count,
        size=1000,
    )


class FakeChain:
    """A node's view: every block it ever had (by hash) and the canonical one by number."""

    def __init__(self, length: int = 1) -> None:
        self.by_hash: dict[str, Block] = {}
        self.canonical: list[Block] = []
        self.forget_side_blocks = False
        genesis = make_block(0, "0x" + "00" * 32)
        self._add(genesis)
        self.mine(length - 1)

    def _add(self, block: Block) -> None:
        self.by_hash[block.hash] = block
        del self.canonical[block.number :]
        self.canonical.append(block)

    @property
    def head(self) -> Block:
        return self.canonical[-1]

    def mine(self, count: int, branch: str = "a") -> None:
        for _ in range(count):
            self._add(make_block(self.head.number + 1, self.head.hash, branch))

    def reorg(self, depth: int, new_length: int | None = None, branch: str = "b") -> None:
        """Replace the last `depth` blocks by `new_length` (default: depth) new ones."""
        dropped = self.canonical[-depth:]
        del self.canonical[-depth:]
        if self.forget_side_blocks:
            for block in dropped:
                self.by_hash.pop(block.hash, None)
        self.mine(new_length if new_length is not None else depth, branch)

    async def latest_number(self) -> int:
        return self.head.number

    async def block_by_number(self, number: int) -> Block | None:
        return self.canonical[number] if 0 <= number < len(self.canonical) else None

    async def block_by_hash(self, block_hash: str) -> Block | None:
        return self.by_hash.get(block_hash)


class FlakyBus(Bus):
    """A broker that refuses every flush while `down`; what it acknowledged is kept."""

    def __init__(self, *, down: bool = False) -> None:
        self.down = down
        self._unacked: list[bytes] = []
        self.acked: list[bytes] = []

    def publish(self, topic: str, key: str | None, value: bytes) -> None:
        self._unacked.append(value)

    def flush(self, timeout: float = 30.0) -> None:
        unacked, self._unacked = self._unacked, []
        if self.down:
            raise BusError("broker unavailable")
        self.acked.extend(unacked)

    def consumer(self, topics: list[str], group: str) -> Consumer:
        raise NotImplementedError


def only_blocks(records: Iterable[AnyRecord]) -> list[Block]:
    """The records of a source a test knows gives blocks only, typed as blocks."""
    blocks = []
    for record in records:
        assert isinstance(record, Block), record
        blocks.append(record)
    return blocks
