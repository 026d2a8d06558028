"""Raw eth_getBlockByNumber payloads to block records, on real mainnet replies."""

import copy
import json
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from chainwatch.exceptions import MalformedRpcPayload
from chainwatch.schema import Block
from collector.mappers import map_block, map_transaction

RPC_FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "rpc"  # from ../shared

needs_fixtures = pytest.mark.skipif(
    not RPC_FIXTURES.is_dir(), reason=f"RPC fixtures not found at {RPC_FIXTURES}"
)


def load(number_hex: str) -> dict:
    path = RPC_FIXTURES / f"eth_getBlockByNumber_{number_hex}_true.json"
    if not path.is_file():
        pytest.skip(f"fixture {path.name} not found")
    return json.loads(path.read_text())["result"]


def mapped(raw, **kw) -> Block:
    return map_block(raw, chain_id=1, node="mainnet-1", observed_at=1_700_000_000.0, **kw)


# --- real mainnet blocks ----------------------------------------------------------------


@needs_fixtures
@pytest.mark.parametrize(
    ("number_hex", "number", "block_hash", "tx_count", "gas_used", "gas_limit", "timestamp"),
    [
        (
            "0x0",
            0,
            "0xd4e56740f876aef8c010b86a40d5f56745a118d0906a34e69aec8c0db1cb8fa3",
            0,
            0,
            5000,
            0,
        ),
        (
            "0xb872",
            47218,
            "0x889c421abc62a48641eee140519e6da8c9dc01d85d8f5c4fbc3c13e3c6e4cb3e",
            2,
            42000,
            42085,
            1438936285,
        ),
        (
            "0x76250",
            483920,
            "0x246edb4b351d93c27926f4649bcf6c24366e2a7c7c718dc9158eea20c03bc6ae",
            4,
            143706,
            3141592,
            1446561880,
        ),
    ],
)
def test_real_mainnet_blocks_map_to_exact_numbers(
    number_hex, number, block_hash, tx_count, gas_used, gas_limit, timestamp
):
    block = mapped(load(number_hex))
    assert block.number == number
    assert block.hash == block_hash
    assert block.tx_count == tx_count == len(block.transactions)
    assert (block.gas_used, block.gas_limit, block.timestamp) == (gas_used, gas_limit, timestamp)
    assert block.base_fee_per_gas is None  # all three predate London
    assert block.event_id == Block.id_for(1, "mainnet-1", block_hash)
    assert (block.chain_id, block.node, block.observed_at) == (1, "mainnet-1", 1_700_000_000.0)


@needs_fixtures
def test_block_483920_transactions_are_summarised():
    block = mapped(load("0x76250"))
    assert block.parent_hash == (
        "0x2610dc6eb941f4bcbddfd2362b999087ccd956e978f0ece4f8da96851283a2ba"
    )
    assert block.miner == "0x52bc44d5378309ee2abf1539bf71de1b7d7be3b5"
    assert block.size == 0x459
    first = block.transactions[0]
    assert first.hash == "0x04cbcb236043d8fb7839e07bbc7f5eed692fb2ca55d897f1101eac3e3ad4fab8"
    assert first.method_id == "0xa9059cbb"  # ERC-20 transfer(address,uint256)
    assert first.input_size == 68
    assert first.to_address == "0xf4eced2f682ce333f96f2d8966c613ded8fc95dd"
    assert first.from_address == "0x1b63142628311395ceafeea5667e7c9026c862ca"
    assert (first.gas, first.gas_price, first.nonce, first.tx_type) == (150853, 5 * 10**10, 12, 0)
    assert first.is_contract_creation is False
    plain = block.transactions[3]
    assert plain.method_id is None and plain.input_size == 0
    assert plain.value == 1_530_219_620_000_000_000
    assert [t.transaction_index for t in block.transactions] == [0, 1, 2, 3]


@needs_fixtures
def test_author_is_used_when_miner_is_absent():
    raw = load("0x76250")
    raw.pop("miner")
    assert mapped(raw).miner == "0x52bc44d5378309ee2abf1539bf71de1b7d7be3b5"


def _upper_hex(value: str) -> str:
    return "0x" + value[2:].upper()


@needs_fixtures
def test_hashes_and_addresses_are_lowercased():
    raw = load("0x76250")
    expected = mapped(raw)
    shouting = copy.deepcopy(raw)
    for key in ("hash", "parentHash", "miner"):
        shouting[key] = _upper_hex(shouting[key])
    for t in shouting["transactions"]:
        for key in ("hash", "from", "to", "input"):
            t[key] = _upper_hex(t[key])
    block = mapped(shouting)
    assert block.hash == expected.hash
    assert block.parent_hash == expected.parent_hash
    assert block.miner == expected.miner
    assert block.transactions == expected.transactions
    assert block.event_id == expected.event_id  # same id whatever the node's casing


# --- hand-built transactions ------------------------------------------------------------


def eip1559_tx(**changes) -> dict:
    tx = {
        "hash": "0x" + "ab" * 32,
        "transactionIndex": "0x5",
        "from": "0x" + "11" * 20,
        "to": "0x" + "22" * 20,
        "value": "0xde0b6b3a7640000",
        "gas": "0x5208",
        "gasPrice": "0x4a817c800",
        "maxFeePerGas": "0x6fc23ac00",
        "maxPriorityFeePerGas": "0x3b9aca00",
        "nonce": "0x2a",
        "type": "0x2",
        "input": "0x",
    }
    tx.update(changes)
    return tx


def test_eip1559_fee_fields_and_type():
    t = map_transaction(eip1559_tx())
    assert t.tx_type == 2
    assert t.max_fee_per_gas == 30 * 10**9
    assert t.max_priority_fee_per_gas == 10**9
    assert t.gas_price == 20 * 10**9
    assert (t.value, t.gas, t.nonce, t.transaction_index) == (10**18, 21000, 42, 5)


def test_legacy_tx_without_type_or_1559_fields():
    raw = eip1559_tx()
    for key in ("type", "maxFeePerGas", "maxPriorityFeePerGas"):
        raw.pop(key)
    t = map_transaction(raw)
    assert t.tx_type == 0
    assert t.max_fee_per_gas is None and t.max_priority_fee_per_gas is None


def test_contract_creation_when_to_is_null():
    code = "0x6080604052348015600f57600080fd5b50"
    t = map_transaction(eip1559_tx(to=None, input=code))
    assert t.is_contract_creation is True
    assert t.to_address is None
    assert t.input_size == (len(code) - 2) // 2
    assert t.method_id == "0x60806040"


def test_block_with_base_fee_maps_it():
    raw = {
        "number": "0x10",
        "hash": "0x" + "01" * 32,
        "parentHash": "0x" + "02" * 32,
        "timestamp": "0x64",
        "miner": "0x" + "03" * 20,
        "gasUsed": "0x5208",
        "gasLimit": "0x1c9c380",
        "baseFeePerGas": "0x7",
        "transactions": [eip1559_tx()],
    }
    block = mapped(raw)
    assert block.base_fee_per_gas == 7
    assert block.size is None
    assert block.tx_count == 1 and block.transactions[0].tx_type == 2


@pytest.mark.parametrize(
    ("change", "why"),
    [
        ({"number": None}, "null"),
        ({"number": "12"}, "hex quantity"),
        ({"gasUsed": True}, "bool"),
        ({"gasLimit": -1}, "negative"),
        ({"hash": 5}, "hash"),
        ({"transactions": "0x"}, "transactions"),
        ({"transactions": ["0x" + "ab" * 32]}, "transaction"),
    ],
)
def test_malformed_blocks_raise_malformed_rpc_payload(change, why):
    raw = {
        "number": "0x10",
        "hash": "0x" + "01" * 32,
        "parentHash": "0x" + "02" * 32,
        "timestamp": "0x64",
        "miner": "0x" + "03" * 20,
        "gasUsed": "0x0",
        "gasLimit": "0x1",
        "transactions": [],
    }
    raw.update(change)
    with pytest.raises(MalformedRpcPayload, match=why):
        mapped(raw)


# --- properties: never anything but a Block or MalformedRpcPayload ---------------------

JSON_LEAVES = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=True)
    | st.text(max_size=20)
    | st.sampled_from(["0x", "0x0", "0x1f", "0X10", "0xzz", "0x-1", "0x" + "ff" * 40, ""])
)
JSON_VALUES = st.recursive(
    JSON_LEAVES,
    lambda children: st.lists(children, max_size=4)
    | st.dictionaries(st.text(max_size=10), children, max_size=5),
    max_leaves=25,
)


def _block_or_malformed(raw) -> None:
    try:
        result = mapped(raw)
    except MalformedRpcPayload as exc:
        assert str(exc)
        return
    assert isinstance(result, Block)


@settings(max_examples=300, deadline=None)
@given(JSON_VALUES)
def test_arbitrary_json_gives_a_block_or_malformed_rpc_payload(raw):
    _block_or_malformed(raw)


def _fixture_or_none() -> dict | None:
    path = RPC_FIXTURES / "eth_getBlockByNumber_0x76250_true.json"
    return json.loads(path.read_text())["result"] if path.is_file() else None


REAL_BLOCK = _fixture_or_none()


def _paths(value, prefix=()):
    """Every (path) to a dict key or list item inside a JSON value."""
    if isinstance(value, dict):
        for k, v in value.items():
            yield (*prefix, k)
            yield from _paths(v, (*prefix, k))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            yield (*prefix, i)
            yield from _paths(v, (*prefix, i))


REAL_PATHS = sorted(_paths(REAL_BLOCK), key=repr) if REAL_BLOCK else [()]


@st.composite
def mutated_real_block(draw):
    raw = copy.deepcopy(REAL_BLOCK)
    for _ in range(draw(st.integers(min_value=1, max_value=3))):
        path = draw(st.sampled_from(REAL_PATHS))
        parent: Any = raw  # a dict or list along the JSON document
        try:
            for step in path[:-1]:
                parent = parent[step]
            leaf = path[-1]
            parent[leaf]
        except (KeyError, IndexError, TypeError):
            continue
        if draw(st.booleans()):
            del parent[leaf]
        else:
            parent[leaf] = draw(JSON_VALUES)
    return raw


@needs_fixtures
@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(mutated_real_block())
def test_mutated_real_block_gives_a_block_or_malformed_rpc_payload(raw):
    _block_or_malformed(raw)
