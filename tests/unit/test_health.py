"""Node states (up, lagging, stalled, unreachable) and pairwise chain splits."""

from chainwatch.metrics import Metrics
from chainwatch.schema import NodeStatus
from detector.engine import Detector, DetectorConfig
from detector.health import HealthConfig
from tests.fakes import make_block

T0 = 1_700_000_000.0


class Clock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def blocks(node: str, count: int, branch: str = "a", start: int = 0, parent: str | None = None):
    out, parent_hash = [], parent or "0x" + "00" * 32
    for n in range(start, start + count):
        block = make_block(n, parent_hash, branch, node=node, observed_at=T0 + 12 * n)
        out.append(block)
        parent_hash = block.hash
    return out


def status(node: str, reachable: bool, at: float, block_time: float = 12.0) -> NodeStatus:
    return NodeStatus(chain_id=1, node=node, event_id=f"{node}-{at}-{reachable}", observed_at=at,
                      reachable=reachable, expected_block_time_seconds=block_time)


def rig(clock: Clock, **health) -> tuple[Detector, Metrics]:
    metrics = Metrics()
    return Detector(DetectorConfig(health=HealthConfig(**health)), metrics, clock=clock), metrics


def state_of(metrics: Metrics, node: str) -> str:
    for state in ("up", "lagging", "stalled", "unreachable"):
        if metrics.registry.get_sample_value(
            "chainwatch_node_state", {"chain_id": "1", "node": node, "state": state}
        ) == 1:
            return state
    return "none"


def test_lagging_starts_at_three_behind_and_clears_only_at_one():
    chain = blocks("a", 12)
    clock = Clock(T0 + 12 * 11)
    detector, metrics = rig(clock)
    b_blocks = [blk.model_copy(update={"node": "b", "event_id": f"b{blk.number}"})
                for blk in chain]
    detector.process(chain)
    detector.process(b_blocks[:10])  # 2 behind: still up
    assert state_of(metrics, "b") == "up"
    # a moves on: b is 3 behind
    more = blocks("a", 1, start=12, parent=chain[-1].hash)
    clock.now = T0 + 12 * 12
    findings = detector.process(more)
    assert state_of(metrics, "b") == "lagging"
    assert [f.detector for f in findings] == ["node_state"]
    assert findings[0].severity == "warning"
    # b catches up to 2 behind: hysteresis keeps it lagging, at 1 behind it clears
    detector.process(b_blocks[10:11])
    assert state_of(metrics, "b") == "lagging"
    detector.process(b_blocks[11:12])
    assert state_of(metrics, "b") == "up"
    transitions = metrics.registry.get_sample_value(
        "chainwatch_node_state_transitions_total",
        {"chain_id": "1", "node": "b", "state": "lagging"},
    )
    assert transitions == 1


def test_no_new_head_for_three_block_times_is_stalled_and_a_new_head_clears_it():
    chain = blocks("a", 3)
    clock = Clock(chain[-1].observed_at)
    detector, metrics = rig(clock)
    detector.process([status("a", True, clock.now, block_time=2.0), *chain])
    assert state_of(metrics, "a") == "up"
    clock.now += 5.9
    assert detector.tick() == []
    clock.now += 0.2  # 6.1 s > 3 x 2 s
    [finding] = detector.tick()
    assert state_of(metrics, "a") == "stalled"
    assert finding.detector == "node_state" and "no new head" in finding.summary
    [new_head] = blocks("a", 1, start=3, parent=chain[-1].hash)
    detector.process([new_head.model_copy(update={"observed_at": clock.now})])
    assert state_of(metrics, "a") == "up"


def test_unreachable_from_the_collectors_status_and_back():
    chain = blocks("a", 2)
    clock = Clock(chain[-1].observed_at + 1)
    detector, metrics = rig(clock)
    detector.process([*chain, status("a", True, clock.now)])
    [finding] = detector.process([status("a", False, clock.now + 1)])
    assert state_of(metrics, "a") == "unreachable"
    assert finding.severity == "critical"
    detector.process([status("a", True, clock.now + 2)])
    assert state_of(metrics, "a") == "up"
    for state, expected in (("unreachable", 1), ("up", 2)):
        assert metrics.registry.get_sample_value(
            "chainwatch_node_state_transitions_total",
            {"chain_id": "1", "node": "a", "state": state},
        ) == expected


def test_two_nodes_on_different_branches_are_a_split_with_its_height_and_length():
    common = blocks("a", 5)
    a_branch = blocks("a", 4, branch="x", start=5, parent=common[-1].hash)
    b_common = [blk.model_copy(update={"node": "b", "event_id": f"b{blk.number}"})
                for blk in common]
    b_branch = blocks("b", 3, branch="y", start=5, parent=common[-1].hash)
    clock = Clock(T0 + 12 * 8)
    detector, metrics = rig(clock)
    detector.process([*common, *a_branch, *b_common])
    assert detector.health.splits == {}
    findings = detector.process(b_branch)
    [split] = [f for f in findings if f.detector == "chain_split"]
    assert split.block_number == 5  # first height where they differ
    assert "3 block(s)" in split.summary and "last common block 4" in split.summary
    assert split.severity == "critical"  # 3 blocks >= split_critical_blocks
    labels = {"chain_id": "1", "node": "a", "other_node": "b"}
    assert metrics.registry.get_sample_value("chainwatch_chain_split_blocks", labels) == 3
    assert metrics.registry.get_sample_value(
        "chainwatch_chain_split_point_block_number", labels) == 4
    assert metrics.registry.get_sample_value("chainwatch_chain_splits_total",
                                             {"chain_id": "1"}) == 1
    # the same split seen again is not a second finding
    assert [f for f in detector.process(blocks("b", 1, "y", 8, b_branch[-1].hash))
            if f.detector == "chain_split"] == []


def test_a_node_behind_on_the_same_chain_is_not_a_split():
    chain = blocks("a", 6)
    b = [blk.model_copy(update={"node": "b", "event_id": f"b{blk.number}"}) for blk in chain[:4]]
    detector, _ = rig(Clock(T0 + 12 * 6))
    findings = detector.process([*chain, *b])
    assert [f for f in findings if f.detector == "chain_split"] == []
    assert detector.health.splits == {}


def test_a_restarted_detector_gives_the_same_transition_and_split_the_same_ids():
    """Re-processing after a crash (findings published, offsets not committed) must not
    publish the same node state change or split under a new id: ids held the clock."""

    def run(clock_offset: float) -> list[str]:
        common = blocks("a", 5)
        b_common = [blk.model_copy(update={"node": "b", "event_id": f"b{blk.number}"})
                    for blk in common]
        clock = Clock(T0 + 12 * 8 + clock_offset)
        detector, _ = rig(clock)
        found = detector.process([*common, *blocks("a", 4, "x", 5, common[-1].hash), *b_common])
        found += detector.process(blocks("b", 3, "y", 5, common[-1].hash))
        found += detector.process([status("b", True, clock.now), status("b", False, clock.now)])
        return sorted(f.event_id for f in found if f.detector in ("node_state", "chain_split"))

    first = run(0.0)
    assert len(first) >= 2  # the split and b unreachable at least
    assert run(0.25) == first
