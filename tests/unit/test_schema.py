"""Wire schema v1: what producers write, consumers read back, and what they refuse."""

import contextlib
import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from chainwatch.exceptions import InvalidRecord
from chainwatch.schema import (
    Block,
    FeatureDeviation,
    Finding,
    Reorg,
    TxSummary,
    decode,
    encode,
)
from tests.fakes import make_block

HASH_A = "0x" + "aa" * 32
HASH_B = "0x" + "bb" * 32
HASH_C = "0x" + "cc" * 32


def tx(index: int, *, to: str | None = "0x" + "22" * 20) -> TxSummary:
    return TxSummary(
        hash="0x" + f"{index:064x}",
        transaction_index=index,
        from_address="0x" + "33" * 20,
        to_address=to,
        value=10**20 + index,  # beyond 64 bits: must survive JSON
        gas=21_000,
        gas_price=None,
        max_fee_per_gas=3 * 10**10,
        max_priority_fee_per_gas=10**9,
        nonce=7,
        tx_type=2,
        input_size=68 if to else 1000,
        method_id="0xa9059cbb" if to else None,
        is_contract_creation=to is None,
    )


def block_with_txs() -> Block:
    base = make_block(17_173_049, HASH_A, tx_count=2)
    return base.model_copy(update={"transactions": (tx(0), tx(1, to=None))})


def reorg() -> Reorg:
    return Reorg(
        chain_id=1,
        node="geth-1",
        event_id=Reorg.id_for(1, "geth-1", HASH_A, HASH_B),
        observed_at=1_700_000_000.25,
        old_head_number=100,
        old_head_hash=HASH_A,
        new_head_number=101,
        new_head_hash=HASH_B,
        common_ancestor_number=98,
        common_ancestor_hash=HASH_C,
        depth=2,
        dropped_block_hashes=(HASH_C, HASH_A),
    )


def finding() -> Finding:
    return Finding(
        chain_id=1,
        node="geth-1",
        event_id=Finding.id_for(1, "geth-1", "block_iforest", HASH_A),
        observed_at=1_700_000_001.5,
        detector="block_iforest",
        family="block",
        severity="warning",
        score=0.93,
        threshold=0.7,
        subject_kind="block",
        subject=HASH_A,
        block_number=100,
        explanation=(
            FeatureDeviation(feature="interval_seconds", value=300.0, normal=12.0, deviation=48.2),
        ),
        summary="abnormal block 100",
        model_version="iforest-1-n200-s42",
    )


# --- round trips ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "make", [block_with_txs, reorg, finding], ids=["block", "reorg", "finding"]
)
def test_encode_then_decode_gives_back_an_equal_record(make):
    record = make()
    back = decode(encode(record))
    assert type(back) is type(record)
    assert back == record


def test_block_round_trip_keeps_transactions_and_big_integers():
    back = decode(encode(block_with_txs()))
    assert isinstance(back, Block)
    assert [t.value for t in back.transactions] == [10**20, 10**20 + 1]
    assert back.transactions[1].is_contract_creation is True
    assert back.transactions[1].to_address is None


def test_decode_accepts_str_as_well_as_bytes():
    record = reorg()
    assert decode(encode(record).decode()) == record


# --- ids and keys ---------------------------------------------------------------------


def test_event_ids_are_deterministic():
    assert Block.id_for(1, "n1", HASH_A) == Block.id_for(1, "n1", HASH_A)
    assert Reorg.id_for(1, "n1", HASH_A, HASH_B) == Reorg.id_for(1, "n1", HASH_A, HASH_B)
    assert Finding.id_for(1, "n1", "reorg_depth", "x") == Finding.id_for(
        1, "n1", "reorg_depth", "x"
    )


def test_event_ids_differ_per_node_chain_hash_and_kind():
    ids = {
        Block.id_for(1, "n1", HASH_A),
        Block.id_for(1, "n2", HASH_A),
        Block.id_for(5, "n1", HASH_A),
        Block.id_for(1, "n1", HASH_B),
        Reorg.id_for(1, "n1", HASH_A, HASH_B),
        Reorg.id_for(1, "n1", HASH_B, HASH_A),
        Finding.id_for(1, "n1", "reorg_depth", HASH_A),
        Finding.id_for(1, "n1", "block_iforest", HASH_A),
    }
    assert len(ids) == 8


def test_stream_key_is_chain_id_colon_node():
    assert make_block(1, HASH_A, chain_id=137, node="erigon-2").stream_key() == "137:erigon-2"
    assert reorg().stream_key() == "1:geth-1"
    assert finding().stream_key() == "1:geth-1"


# --- invalid records ------------------------------------------------------------------


def _valid_block_dict() -> dict:
    return json.loads(encode(make_block(10, HASH_A)))


def _with(**changes) -> bytes:
    d = _valid_block_dict()
    d.update(changes)
    return json.dumps(d).encode()


def _without(key: str) -> bytes:
    d = _valid_block_dict()
    del d[key]
    return json.dumps(d).encode()


INVALID = {
    "not json": b"garbage",
    "truncated json": encode(make_block(10, HASH_A))[:-5],
    "not utf-8": b"\xff\xfe\x00{",
    "json array": b"[1, 2, 3]",
    "json string": b'"block"',
    "json null": b"null",
    "empty": b"",
    "no type": _without("type"),
    "unknown type": _with(type="transfer"),
    "missing field": _without("hash"),
    "missing chain_id": _without("chain_id"),
    "negative number": _with(number=-1),
    "negative observed_at": _with(observed_at=-0.5),
    "schema_version 2": _with(schema_version=2),
    "wrong type: number is a string": _with(number="ten"),
    "wrong type: hash is an int": _with(hash=123),
    "wrong type: transactions is a dict": _with(transactions={"a": 1}),
    "reorg depth 0": json.dumps({**json.loads(encode(reorg())), "depth": 0}).encode(),
    "finding score > 1": json.dumps({**json.loads(encode(finding())), "score": 1.5}).encode(),
    "finding unknown severity": json.dumps(
        {**json.loads(encode(finding())), "severity": "panic"}
    ).encode(),
}


@pytest.mark.parametrize("payload", INVALID.values(), ids=INVALID.keys())
def test_invalid_payloads_raise_invalid_record_with_a_one_line_message(payload):
    with pytest.raises(InvalidRecord) as info:
        decode(payload)
    message = str(info.value)
    assert message
    assert len(message.splitlines()) == 1, message


def test_unknown_type_with_a_newline_still_gives_a_one_line_message():
    with pytest.raises(InvalidRecord) as info:
        decode(b'{"type": "x\\ny"}')
    assert "\n" not in str(info.value)


def test_invalid_record_message_says_where_the_problem_is():
    with pytest.raises(InvalidRecord, match=r"block\.number"):
        decode(_with(number=-1))
    with pytest.raises(InvalidRecord, match=r"block\.schema_version"):
        decode(_with(schema_version=2))


JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
    lambda children: st.lists(children, max_size=4)
    | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=20,
)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200))
def test_arbitrary_bytes_only_ever_raise_invalid_record(payload):
    with contextlib.suppress(InvalidRecord):
        decode(payload)


@settings(max_examples=300, deadline=None)
@given(
    key=st.sampled_from(sorted(_valid_block_dict())),
    value=JSON,
)
def test_block_with_any_field_replaced_decodes_or_raises_invalid_record(key, value):
    try:
        record = decode(_with(**{key: value}))
    except InvalidRecord:
        return
    assert isinstance(record, Block)


# --- forward compatibility --------------------------------------------------------------


def test_unknown_extra_fields_are_ignored():
    d = _valid_block_dict()
    d["added_in_v1_1"] = {"anything": [1, 2]}
    d["transactions"] = [{**json.loads(tx(0).model_dump_json()), "blob_gas": 5}]
    record = decode(json.dumps(d).encode())
    assert isinstance(record, Block)
    assert record.hash == d["hash"]
    assert record.transactions[0].hash == tx(0).hash
    assert not hasattr(record, "added_in_v1_1")
