"""Node health across the nodes of a chain: lag, stalls, reachability, chain splits.

Domain code, no I/O: it reads ChainState and the current time, and says what changed.
States, worst first: unreachable (the collector cannot reach the node), stalled (no new
head for `stall_factor` x the expected block time), lagging (≥ `lag_start` blocks behind
the best head, cleared at ≤ `lag_clear`: hysteresis keeps it from flapping), up.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from detector.state import ChainState, NodeKey, NodeState

NODE_STATES: tuple[str, ...] = ("up", "lagging", "stalled", "unreachable")


@dataclass(frozen=True)
class HealthConfig:
    lag_start_blocks: int = 3
    lag_clear_blocks: int = 1
    stall_factor: float = 3.0
    default_block_time: float = 12.0


@dataclass(frozen=True)
class Transition:
    chain_id: int
    node: str
    old: str | None
    new: str
    lag: int
    seconds_since_head: float | None


@dataclass(frozen=True)
class Split:
    """Two nodes disagree on the chain: different hashes at the same height.

    split_point is the last height where they agree (None if it is below both windows);
    length is how many heights, up to the lower of the two heads, they disagree on.
    """

    chain_id: int
    node: str
    other: str
    split_point: int | None
    length: int

    @property
    def first_diverging_height(self) -> int | None:
        return None if self.split_point is None else self.split_point + 1


@dataclass
class NodeHealth:
    config: HealthConfig = field(default_factory=HealthConfig)
    states: dict[NodeKey, str] = field(default_factory=dict)
    lagging: dict[NodeKey, bool] = field(default_factory=dict)
    splits: dict[tuple[int, str, str], Split] = field(default_factory=dict)

    def evaluate(self, chain: ChainState, now: float) -> list[Transition]:
        """Re-derive every node's state; return the nodes whose state changed."""
        out: list[Transition] = []
        for key, node in chain.nodes.items():
            lag = chain.head_lag(*key)
            was_lagging = self.lagging.get(key, False)
            lagging = (
                lag > self.config.lag_clear_blocks
                if was_lagging
                else lag >= self.config.lag_start_blocks
            )
            self.lagging[key] = lagging
            since = self._seconds_since_head(node, now)
            state = self._state(node, lagging, since)
            old = self.states.get(key)
            if state != old:
                self.states[key] = state
                out.append(Transition(key[0], key[1], old, state, lag, since))
        return out

    def _seconds_since_head(self, node: NodeState, now: float) -> float | None:
        reference = node.head_seen_at if node.head_seen_at is not None else node.first_seen_at
        return None if reference is None else max(now - reference, 0.0)

    def _state(self, node: NodeState, lagging: bool, since: float | None) -> str:
        if node.reachable is False:
            return "unreachable"
        block_time = node.expected_block_time or self.config.default_block_time
        if since is not None and since > self.config.stall_factor * block_time:
            return "stalled"
        return "lagging" if lagging else "up"

    def update_splits(self, chain: ChainState, chain_id: int) -> tuple[list[Split], list[Split]]:
        """Recompute pairwise splits of one chain; return (new splits, resolved splits)."""
        nodes = chain.chain_nodes(chain_id)
        current: dict[tuple[int, str, str], Split] = {}
        for i, a in enumerate(nodes):
            for b in nodes[i + 1 :]:
                split = find_split(a, b)
                if split is not None:
                    current[(chain_id, a.node, b.node)] = split
        new = [s for k, s in current.items() if k not in self.splits]
        resolved = [
            s for k, s in self.splits.items() if k[0] == chain_id and k not in current
        ]
        for key in [k for k in self.splits if k[0] == chain_id]:
            del self.splits[key]
        self.splits.update(current)
        return new, resolved


def find_split(a: NodeState, b: NodeState) -> Split | None:
    """Compare two nodes' canonical windows from the lower head down."""
    if a.head_number is None or b.head_number is None:
        return None
    top = min(a.head_number, b.head_number)
    entry_a, entry_b = a.canonical.get(top), b.canonical.get(top)
    if entry_a is None or entry_b is None or entry_a.hash == entry_b.hash:
        return None
    height = top
    while True:
        height -= 1
        entry_a, entry_b = a.canonical.get(height), b.canonical.get(height)
        if entry_a is None or entry_b is None:
            return Split(a.chain_id, a.node, b.node, None, top - height)
        if entry_a.hash == entry_b.hash:
            return Split(a.chain_id, a.node, b.node, height, top - height)
