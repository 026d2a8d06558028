"""Garbled input at every decoder and mapper: a typed error or a good result, never a crash.

A crash is any exception other than the project's typed error for that input
(InvalidRecord, MalformedRpcPayload, ConfigError), a typed error whose message is not one
line, or a result that cannot be published on the bus. The example counts keep the suite
under a minute; `python -m bench.fuzz` runs the same targets with many more.
"""

from __future__ import annotations

import time
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings

from chainwatch.schema import encode
from tests.property import targets
from tests.property.targets import Target, all_targets

TARGETS: dict[str, Target] = {t.name: t for t in all_targets()}
FAST = settings(
    max_examples=300,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)


def _fuzz(name: str, examples: int) -> None:
    target = TARGETS[name]

    @settings(FAST, max_examples=examples)
    @given(target.strategy)
    def run(value: Any) -> None:
        target.run(value)

    run()
    assert target.tried > 0
    assert not target.crashes, target.crashes[:3]


@pytest.mark.parametrize(
    ("name", "examples"),
    [
        ("schema.decode", 600),
        ("mappers.map_block", 400),
        ("mappers.map_transaction", 400),
        ("mempool.map_pending_tx", 400),
        ("mempool.txpool_content/status", 300),
        ("peers.PeerTracker.observe", 400),
        ("nodes.load_nodes", 300),
        ("rpc.check_url", 400),
        ("cli flags and CHAINWATCH_* env", 150),
        ("replay: ethereum-etl tables", 200),
        ("replay: archive file", 150),
        ("replay: JSONL records", 200),
        ("replay --labels", 300),
        ("detector: decoded records", 150),
    ],
)
def test_garbled_input_gives_a_typed_error_or_a_good_result(name: str, examples: int) -> None:
    _fuzz(name, examples)


def test_every_target_is_fuzzed() -> None:
    """A new target in targets.py must get a line in the list above."""
    marks = test_garbled_input_gives_a_typed_error_or_a_good_result.pytestmark  # type: ignore[attr-defined]
    listed = {name for mark in marks for name, _ in mark.args[1]}
    assert listed == set(TARGETS)


# Inputs that crashed before the fixes they name; kept as fixed regression cases because
# a 300-example run does not always draw them again.
def _with(template: dict[str, Any], **changes: Any) -> dict[str, Any]:
    return {**template, **changes}


LAUGHS = "a0: &a0 [" + ",".join(['"lol"'] * 10) + "]\n" + "".join(
    f"a{i}: &a{i} [" + ",".join([f"*a{i - 1}"] * 10) + "]\n" for i in range(1, 9)
) + 'nodes: [{name: x, rpc: "http://h:1"}]\n'


@pytest.mark.parametrize(
    ("name", "value"),
    [
        # collector/mappers.py: a lone surrogate (JSON "\ud800") in a hash crashed the
        # collector loop with UnicodeEncodeError; in miner/to/input it failed at publish
        ("mappers.map_block", _with(targets.BLOCK, hash="0x\ud800")),
        ("mappers.map_block", _with(targets.BLOCK, miner="0xab\ud800")),
        ("mappers.map_transaction", _with(targets.TX_1559, to="0x\udcff")),
        ("mappers.map_transaction", _with(targets.TX_1559, input="0xa9059cbb\ud800")),
        # collector/peers.py: the same in an admin_peers id
        ("peers.PeerTracker.observe", ("0x1", [_with(targets.ADMIN_PEERS[0], id="\ud800")])),
        # chainwatch/nodes.py: a nodes file that is not UTF-8 gave a traceback
        ("nodes.load_nodes", b"\x80"),
        # chainwatch/nodes.py: 500 bytes of nested YAML aliases took 50 s and GBs to expand
        ("nodes.load_nodes", LAUGHS.encode()),
        # ... an odd key was echoed with its newline: a two-line error (bench/fuzz.py)
        ("nodes.load_nodes", b'nodes: [{name: x, rpc: "http://h:1", "\\n": 1}]\n'),
        ("nodes.load_nodes", b'"a\\nb": 1\nnodes: [{name: x, rpc: "http://h:1"}]\n'),
        # ... and a self-referencing alias recursed without end
        ("nodes.load_nodes", b'a: &a [*a]\nnodes: [{name: x, rpc: "http://h:1"}]\n'),
        # replay/sources.py: a transactions.csv that is not UTF-8 gave a traceback
        ("replay: ethereum-etl tables", ("transactions", ".csv", b"hash\n\x80\n")),
        # replay/archive.py: an archive file cut short gave a traceback
        ("replay: archive file", b"PAR1"),
        # chainwatch/labels.py: a --labels line that is not UTF-8 gave a traceback
        ("replay --labels", b"\x80\n"),
        # chainwatch/schema.py: a chain id or height past 2^63 - 1 passed the schema and
        # failed the detector's fork-risk and tx steps of that chain, batch after batch
        ("detector: decoded records", [encode(targets.RECORDS[0]).replace(
            b'"chain_id":31337', b'"chain_id":9223372036854775808')]),
        ("detector: decoded records", [encode(targets.RECORDS[3]).replace(
            b'"head_number":5', b'"head_number":9223372036854775808')]),
        # collector/peers.py, mempool.py: so a node's count past 2^63 - 1 is malformed
        ("peers.PeerTracker.observe", ("0x8000000000000000", None)),
        ("mempool.txpool_content/status", {"pending": "0x8000000000000000", "queued": "0x0"}),
    ],
)
def test_inputs_that_once_crashed_are_typed_errors_now(name: str, value: Any) -> None:
    target = all_targets_by_name()[name]
    started = time.monotonic()
    target.run(value)
    assert time.monotonic() - started < 5
    assert not target.crashes and target.rejected + target.accepted == 1


def all_targets_by_name() -> dict[str, Target]:
    return {t.name: t for t in all_targets()}
