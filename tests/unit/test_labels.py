"""One label type for the scenario runner, `chainwatch evaluate` and `replay --labels`: the
runner's files load unchanged, hand-written labels load, bad lines are one-line errors,
and the matching rule treats hand-written labels (no chain, node or subject) sensibly."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from chainwatch.labels import Label, LabelError, matches, read_labels
from chainwatch.schema import Finding

MINER = "0x" + "ab" * 20
TX = "0x" + "11" * 32

# a line as the scenario runner writes it (labels.jsonl of a recording)
RUNNER_LINE = json.dumps({
    "chain_id": 31337, "details": {"adjacent": True, "indices": [0, 1, 2]}, "family": "tx",
    "first_block": 242, "id": "001-sandwich", "injected_at": 1795963902.329,
    "injected_wall_at": 1795961072.827, "kind": "sandwich", "last_block": 242, "miner": None,
    "node": "anvil-scenarios", "scenario": "sandwich", "sender": "0x" + "28" * 20,
    "tx_hashes": [TX, "0x" + "22" * 32],
}, sort_keys=True)


def finding(family: str, subject: str, block: int | None, *, kind: str = "node",
            node: str = "n1", chain_id: int = 1) -> Finding:
    return Finding(
        chain_id=chain_id, node=node, event_id=f"{family}-{subject}-{block}-{node}",
        observed_at=1.0, detector="d", family=family, severity="warning", score=0.9,
        threshold=0.5, subject_kind=kind, subject=subject, block_number=block,
    )


def test_the_runners_format_loads_and_writes_back_byte_identical(tmp_path: Path) -> None:
    path = tmp_path / "labels.jsonl"
    path.write_text(RUNNER_LINE + "\n")
    [label] = read_labels(path)
    assert (label.id, label.kind, label.chain_id, label.node) == (
        "001-sandwich", "sandwich", 31337, "anvil-scenarios")
    assert label.to_json() == RUNNER_LINE


def test_hand_written_labels_need_little(tmp_path: Path) -> None:
    path = tmp_path / "incidents.jsonl"
    path.write_text(
        '{"family": "fork_risk", "kind": "reorg", "node": "geth-1", "first_block": 100}\n\n'
        f'{{"family": "tx", "tx_hashes": ["{TX.upper()}"]}}\n'
    )
    reorg, tx = read_labels(path)
    assert (reorg.first_block, reorg.last_block, reorg.chain_id, reorg.id) == (
        100, 100, None, "incidents.jsonl:1")
    assert tx.tx_hashes == (TX,) and tx.first_block is None


@pytest.mark.parametrize(
    ("line", "reason"),
    [
        ("not json", "not JSON"),
        ("[1]", "expected a JSON object"),
        ('{"first_block": 1}', "missing family"),
        ('{"family": "tx"}', "give first_block, or tx_hashes / miner / sender"),
        ('{"family": "tx", "first_block": 5, "last_block": 4}', "last_block 4 is before"),
        ('{"family": "tx", "first_block": "five"}', "first_block: expected a block number"),
        ('{"family": "tx", "first_block": 1, "tx_hashes": "0xab"}', "tx_hashes: expected a list"),
        ('{"family": "tx", "first_block": 1, "chain_id": "1"}', "chain_id: expected an integer"),
        ('{"family": "tx", "first_block": 1, "details": [1]}', "details: expected a JSON object"),
    ],
)
def test_bad_lines(tmp_path: Path, line: str, reason: str) -> None:
    path = tmp_path / "labels.jsonl"
    path.write_text(f'{{"family": "tx", "first_block": 1}}\n{line}\n')
    with pytest.raises(LabelError) as err:
        read_labels(path)  # the scenario recording: a bad line stops, in one line
    assert str(err.value).startswith("labels.jsonl:2: ") and reason in str(err.value)
    skipped: list[tuple[str, str]] = []
    assert len(read_labels(path, on_error=lambda w, r: skipped.append((w, r)))) == 1
    assert skipped[0][0] == "labels.jsonl:2" and reason in skipped[0][1]  # replay: skipped


def test_matching_without_chain_node_or_subject() -> None:
    anywhere = Label(family="fork_risk", kind="reorg", first_block=100, last_block=102)
    assert matches(finding("fork_risk", "n1", 101), anywhere)
    assert matches(finding("fork_risk", "n7", 105, node="n7", chain_id=5), anywhere)  # + 3
    assert matches(finding("fork_risk", "n1", 99), anywhere)  # a rewind to the ancestor
    assert not matches(finding("fork_risk", "n1", 106), anywhere)
    # no subject named: any finding of the family inside the range
    window = Label(family="miner", first_block=10, last_block=20)
    assert matches(finding("miner", MINER, 15, kind="miner"), window)
    assert not matches(finding("miner", MINER, 30, kind="miner"), window)


def test_matching_node_and_chain() -> None:
    label = Label(family="fork_risk", first_block=100, node="n2", chain_id=1)
    assert matches(finding("fork_risk", "n1|n2", 100), label)  # a split names both nodes
    assert not matches(finding("fork_risk", "n1", 100), label)
    assert not matches(finding("fork_risk", "n2", 100, node="n2", chain_id=5), label)


def test_an_address_matches_inside_the_incident_a_hash_anywhere() -> None:
    miner = Label(family="miner", first_block=10, last_block=20, miner=MINER.upper())
    assert matches(finding("miner", MINER, 23, kind="miner"), miner)  # last + 3
    assert not matches(finding("miner", MINER, 500, kind="miner"), miner)  # a later incident
    assert matches(finding("miner", MINER, None, kind="miner"), miner)  # no height to judge
    assert not matches(finding("miner", "0x" + "cd" * 20, 15, kind="miner"), miner)
    tx = Label(family="tx", first_block=10, tx_hashes=(TX,))
    assert matches(finding("tx", TX.upper(), None, kind="tx"), tx)  # seen pending
    assert matches(finding("tx", TX, 12, kind="tx"), tx)
    assert not matches(finding("tx", "0x" + "99" * 32, 10, kind="tx"), tx)  # names another


def test_a_line_that_is_not_utf8_is_reported_with_its_number(tmp_path):
    path = tmp_path / "labels.jsonl"
    line = '{{"family": "fork_risk", "kind": "reorg", "first_block": {}}}\n'
    path.write_bytes(line.format(7).encode() + b"\xff\xfe garbage\n" + line.format(9).encode())
    skipped: list[tuple[str, str]] = []
    labels = read_labels(path, on_error=lambda where, reason: skipped.append((where, reason)))
    assert [label.first_block for label in labels] == [7, 9]
    assert skipped == [("labels.jsonl:2", "label: not UTF-8 text")]
    with pytest.raises(LabelError, match=r"^labels\.jsonl:2: not UTF-8 text$"):
        read_labels(path)
