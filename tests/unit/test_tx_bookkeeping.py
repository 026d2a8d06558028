"""The transaction family's bulk bookkeeping equals its one-tx-at-a-time definition.

TxFamily, the tx rules and the tx frame handle a block or batch with C-level bulk steps.
Each test runs the plain per-transaction code they replaced on random inputs (repeated
hashes and senders, mixed-case addresses, shuffled indices, bounds overflowing) and
compares everything a reader could see.
"""

from __future__ import annotations

import random
from collections import OrderedDict, namedtuple

import polars as pl
import pytest

from bench.synthetic import generate
from chainwatch.schema import Block, PendingTx, TxSummary
from detector import families
from detector.families import FamilyConfig, TxFamily, _Bounded
from detector.rules import (
    Offer,
    RuleHit,
    block_tx_rules,
    count_score,
    sandwich_rule,
    sender_burst_rule,
)
from detector.tx_features import (
    _CHUNK,
    _INCLUDED_COLUMNS,
    AsOf,
    _attribute_columns,
    blocks_to_tx_frame,
    included_tx_frame,
    pending_to_tx_frame,
)

SENDERS = ["0x" + f"{i:02x}" * 20 for i in range(0xA0, 0xB8)]  # hex letters: case matters
CONTRACTS = ["0x" + f"{i:02x}" * 20 for i in (0xC1, 0xC2, 0xDD)]


def _cased(rng: random.Random, address: str) -> str:
    return "".join(c.upper() if rng.random() < 0.3 else c for c in address)


def _tx(rng: random.Random, index: int, *, senders: list[str], hashes: list[str]) -> TxSummary:
    fee = rng.choice([None, rng.randrange(10**9, 10**11)])
    return TxSummary(
        hash=rng.choice(hashes) if rng.random() < 0.1 else f"0x{rng.getrandbits(128):032x}",
        transaction_index=index,
        from_address=_cased(rng, rng.choice(senders)),
        to_address=None if rng.random() < 0.15 else _cased(rng, rng.choice(CONTRACTS)),
        value=rng.choice([0, rng.getrandbits(rng.randint(1, 255))]),  # beyond 2**53 and 2**64
        gas=rng.randrange(21_000, 10**7),
        gas_price=rng.randrange(10**9, 10**11) if fee is None else None,
        max_fee_per_gas=fee,
        max_priority_fee_per_gas=None if fee is None else rng.randrange(0, fee),
        nonce=rng.choice([rng.randrange(0, 60), 2**63 + rng.randrange(5)]),
        tx_type=0 if fee is None else 2,
        input_size=rng.randrange(0, 500),
        method_id=rng.choice([None, "0xA9059CBB", "0x095ea7b3"]),
        is_contract_creation=rng.random() < 0.05,
    )


def _block(rng: random.Random, number: int, txs: int, *, senders: list[str],
           hashes: list[str]) -> Block:
    indices = rng.sample(range(txs + 3), txs)  # gaps: not every neighbour is adjacent
    transactions = [_tx(rng, i, senders=senders, hashes=hashes) for i in indices]
    if rng.random() < 0.5:
        transactions.sort(key=lambda t: t.transaction_index)
    return Block(
        chain_id=1, node="n", event_id=f"b{number}", observed_at=1_000.0 + number,
        number=number, hash=f"0x{number:064x}", parent_hash=f"0x{number - 1:064x}",
        timestamp=1_000 + number, miner=SENDERS[0], gas_used=1, gas_limit=30_000_000,
        base_fee_per_gas=rng.choice([None, 10**9]), tx_count=txs,
        transactions=tuple(transactions),
    )


def _random_blocks(seed: int, count: int = 30, most_senders: int = len(SENDERS)) -> list[Block]:
    rng = random.Random(seed)
    senders = rng.sample(SENDERS, rng.randint(1, most_senders))
    hashes = [f"0x{i:064x}" for i in range(12)]
    return [
        _block(rng, n, rng.choice([0, 1, 2, 3, rng.randint(4, 80)]), senders=senders,
               hashes=hashes)
        for n in range(1, count + 1)
    ]


# -- TxFamily._learn_included -----------------------------------------------------------


class _OneByOne:
    """The per-transaction bookkeeping `_learn_included` replaced, trimmed per batch, with
    an exact bound on the mined hashes. Nonces are read from the tx frame, which holds
    them as Int64: one beyond it (no account can send 2^63 txs) counts as the largest."""

    def __init__(self, family: TxFamily, limit: int) -> None:
        self.family = family
        self.next_nonce: OrderedDict[str, int] = OrderedDict()
        self.included = _Bounded(limit)

    def learn(self, blocks: list[Block]) -> None:
        family = self.family
        for block in blocks:
            for tx in block.transactions:
                family._gone(tx.hash)
                sender = tx.from_address.lower()
                nonce = min(tx.nonce, 2**63 - 1)
                self.next_nonce[sender] = max(self.next_nonce.pop(sender, 0), nonce + 1)
                self.included.put(tx.hash, 0.0)
        while len(self.next_nonce) > families.NONCE_SENDERS:
            self.next_nonce.popitem(last=False)


def _learn(family: TxFamily, blocks: list[Block]) -> None:
    family._learn_included(included_tx_frame(blocks)[0])


def _pools(family: TxFamily) -> tuple[list[object], ...]:
    return list(family.pending_since.items()), list(family.offers.items())


@pytest.mark.parametrize("seed", range(25))
def test_learning_included_txs_in_bulk_equals_one_tx_at_a_time(seed, monkeypatch):
    rng = random.Random(seed)
    monkeypatch.setattr(families, "NONCE_SENDERS", rng.randint(1, 15))
    blocks = _random_blocks(seed)
    bulk, each = (TxFamily(FamilyConfig(), kind="iforest", seed=1) for _ in range(2))
    pool = [tx.hash for b in blocks for tx in b.transactions] + ["0xnever"] * 3
    pending, limit = rng.sample(pool, len(pool) // 3), rng.randint(1, 60)
    reference = _OneByOne(each, limit)
    bulk._included.limit = limit
    for family in (bulk, each):
        for i, tx_hash in enumerate(pending):  # some mined below, some never
            family.pending_since.put(tx_hash, float(i))
            family.offers[tx_hash] = Offer(1, 1, 21_000, float(i), SENDERS[0], i)
    start = 0
    while start < len(blocks):  # batches of 1 to 4 blocks, the nonces read after each
        batch = blocks[start:start + rng.randint(1, 4)]
        start += len(batch)
        _learn(bulk, batch)
        reference.learn(batch)
        assert bulk.next_nonce.items() == list(reference.next_nonce.items())
        assert _pools(bulk) == _pools(each)
        assert all(tx_hash in bulk._included for tx_hash in reference.included)
        assert "0xnever" not in bulk._included
    assert len(bulk.next_nonce) == min(families.NONCE_SENDERS, len(reference.next_nonce))


def test_recent_keys_hold_the_last_limit_keys_and_forget_old_ones():
    rng = random.Random(3)
    keys = families.RecentKeys(limit=50)
    added: list[str] = []
    for step in range(300):
        batch = [f"k{rng.randrange(400)}" for _ in range(rng.choice([1, 3, 20, 70]))]
        if len(batch) == 1:
            keys.add(batch[0])
        else:
            keys.add_many(batch)
        added.extend(batch)
        recent = list(dict.fromkeys(reversed(added)))[:50]  # the last 50 distinct keys
        assert all(k in keys for k in recent), step
        assert len(keys) <= 2 * max(50, 70) + 70
    assert "never" not in keys


@pytest.mark.parametrize("seed", range(10))
def test_recent_keys_added_as_columns_hold_the_last_limit_keys(seed):
    """Columns stay unread until membership is asked; then every one of the last `limit`
    keys added (counted with repeats) is in, whether added as columns or one by one."""
    rng = random.Random(seed)
    limit = rng.choice([1, 7, 50])
    keys = families.RecentKeys(limit=limit)
    added: list[str] = []
    for step in range(200):
        batch = [f"k{rng.randrange(300)}" for _ in range(rng.choice([0, 1, 5, 30, 120]))]
        if rng.random() < 0.7:
            keys.add_column(pl.Series(batch, dtype=pl.Utf8))
        else:
            keys.add_many(batch)
        added.extend(batch)
        # unread columns are bounded: those before the last `limit` keys are dropped
        unread = keys._unread
        assert len(unread) <= 1 or sum(len(c) for c in unread) - len(unread[0]) < limit
        if rng.random() < 0.3:
            assert all(k in keys for k in added[-limit:]), step
            assert "never" not in keys


def test_unread_columns_beyond_the_limit_are_dropped_without_being_read(monkeypatch):
    """A replay of mined blocks never asks: its batches' hashes are never made strings,
    and only the columns that still hold the last `limit` keys are kept."""
    keys = families.RecentKeys(limit=100)
    keys.add_many(["old"])
    read = []
    monkeypatch.setattr(families.RecentKeys, "_add",
                        lambda self, k: read.append(list(k)))
    for i in range(50):
        keys.add_column(pl.Series([f"{i}-{j}" for j in range(40)]))
    assert read == []
    assert [len(c) for c in keys._unread] == [40, 40, 40]  # 80 would miss 20 of the last 100
    assert not keys._current and not keys._previous  # "old" is forgotten
    monkeypatch.undo()
    assert all(f"{i}-{j}" in keys for i in range(47, 50) for j in range(40))
    assert "old" not in keys and "46-39" not in keys


def test_a_sender_forgotten_at_the_bound_starts_again_from_its_next_fold(monkeypatch):
    """Trimmed when folded (when read, or every `fold_every` batches): a sender's old,
    higher nonce does not come back after it was forgotten."""
    monkeypatch.setattr(families, "NONCE_SENDERS", 1)
    rng = random.Random(0)
    a, b = SENDERS[:2]
    blocks = [_block(rng, n, 1, senders=[s], hashes=["0x1"]) for n, s in ((1, a), (2, b), (3, a))]
    blocks = [blk.model_copy(update={"transactions": (blk.transactions[0].model_copy(
        update={"nonce": nonce}),)}) for blk, nonce in zip(blocks, (9, 0, 4), strict=True)]
    family = TxFamily(FamilyConfig(), kind="iforest", seed=1)
    for blk in blocks:
        _learn(family, [blk])
        family.next_nonce.items()  # read after each batch: folded per batch
    assert family.next_nonce.items() == [(a, 5)]
    for batches in ([blocks], [[blk] for blk in blocks]):  # one batch; three, read once
        family = TxFamily(FamilyConfig(), kind="iforest", seed=1)
        for batch in batches:
            _learn(family, batch)
        # a's last tx is the most recent, its highest nonce 9
        assert family.next_nonce.items() == [(a, 10)]
        assert family.next_nonce.of([a, b, "0xunknown"]) == {a: 10}


# -- rules ------------------------------------------------------------------------------


def _sandwich_reference(block: Block) -> list[RuleHit]:
    """sandwich_rule as one pass over every triple (its former body)."""
    txs = sorted(block.transactions, key=lambda t: t.transaction_index)
    out = []
    for front, victim, back in zip(txs, txs[1:], txs[2:], strict=False):
        attacker = front.from_address.lower()
        contract = (victim.to_address or "").lower()
        if (
            contract
            and back.from_address.lower() == attacker
            and victim.from_address.lower() != attacker
            and (front.to_address or "").lower() == contract == (back.to_address or "").lower()
            and front.transaction_index == victim.transaction_index - 1
            and back.transaction_index == victim.transaction_index + 1
        ):
            out.append(RuleHit(
                rule="sandwich_rule", family="tx", severity="warning",
                chain_id=block.chain_id, node=block.node, subject_kind="tx",
                subject=victim.hash, block_number=block.number, score=1.0,
                summary=(f"possible sandwich in block {block.number}: {attacker} traded "
                         f"with {contract} right before and after tx {victim.hash}"),
                details={
                    "attacker": attacker, "victim": victim.hash,
                    "victim_sender": victim.from_address.lower(), "contract": contract,
                    "indices": [front.transaction_index, victim.transaction_index,
                                back.transaction_index],
                    "front_hash": front.hash, "back_hash": back.hash,
                    "block_hash": block.hash,
                },
            ))
    return out


def _burst_reference(block: Block, min_txs: int, min_share: float,
                     min_share_txs: int) -> list[RuleHit]:
    """sender_burst_rule with every sender's hashes gathered (its former body)."""
    counts: dict[str, list[str]] = {}
    for tx in block.transactions:
        counts.setdefault(tx.from_address.lower(), []).append(tx.hash)
    total = len(block.transactions)
    out = []
    for sender, hashes in sorted(counts.items()):
        n = len(hashes)
        share = n / total
        if n < min_txs and not (share >= min_share and n >= min_share_txs):
            continue
        out.append(RuleHit(
            rule="sender_burst_rule", family="tx", severity="warning",
            chain_id=block.chain_id, node=block.node, subject_kind="tx", subject=hashes[0],
            block_number=block.number,
            score=max(count_score(n, min_txs), min(share / (2 * min_share), 1.0)),
            summary=f"{sender} sent {n} of the {total} txs in block {block.number} "
                    f"({share:.0%}): a spam burst",
            details={"sender": sender, "txs": n, "share": share, "hashes": hashes[:10]},
        ))
    return out


@pytest.fixture(scope="module")
def rule_blocks() -> list[Block]:
    """Mainnet-shaped blocks and crowded ones (few senders and contracts, shuffled)."""
    return generate(40, 150, seed=5) + [
        b for s in range(12) for most in (len(SENDERS), 4) for b in _random_blocks(s, 30, most)
    ]


def test_sandwich_rule_equals_a_pass_over_every_triple(rule_blocks):
    found = 0
    for b in rule_blocks:
        hits = sandwich_rule(included_tx_frame([b])[0])
        assert hits == _sandwich_reference(b)
        found += len(hits)
    assert found > 20  # the crowded blocks hold sandwiches: the test compares real hits
    # all blocks in one frame: the same hits, block by block
    everything = included_tx_frame(rule_blocks)[0]
    assert sandwich_rule(everything) == [h for b in rule_blocks for h in _sandwich_reference(b)]


def test_the_block_rules_of_a_batch_come_block_by_block(rule_blocks):
    """Each block's sandwiches, then its bursts: the order of one block at a time."""
    frame = included_tx_frame(rule_blocks)[0]
    expected = [h for b in rule_blocks
                for h in (*_sandwich_reference(b), *_burst_reference(b, 50, 0.3, 20))]
    hits = block_tx_rules(frame)
    assert hits == expected
    assert {h.rule for h in hits} == {"sandwich_rule", "sender_burst_rule"}
    # numbered by the caller as a detector does (`AsOf.block`), an empty block among them
    with_empty = [*rule_blocks[:3], rule_blocks[3].model_copy(update={"transactions": []}),
                  *rule_blocks[4:]]
    frame, counts = included_tx_frame(with_empty)
    assert block_tx_rules(frame, AsOf.of(counts, [0.0] * len(counts)).block) == [
        h for b in with_empty
        for h in (*_sandwich_reference(b), *_burst_reference(b, 50, 0.3, 20))]


def test_sender_burst_rule_equals_counting_every_sender(rule_blocks):
    rng = random.Random(1)
    found = 0
    for b in rule_blocks:
        limits = [(50, 0.3, 20), (rng.randint(0, 30), rng.random(), rng.randint(0, 30))]
        for min_txs, min_share, min_share_txs in limits:
            hits = sender_burst_rule(included_tx_frame([b])[0], min_txs, min_share, min_share_txs)
            assert hits == _burst_reference(b, min_txs, min_share, min_share_txs)
            found += len(hits)
    assert found > 50


# -- tx frame ---------------------------------------------------------------------------


def test_the_tx_frame_holds_each_attribute_as_python_would_convert_it():
    """Wei amounts as float(int) (polars converts them), beyond the chunk size too."""
    blocks = [b for s in range(3, 8) for b in _random_blocks(s, 60)]
    txs = [t for b in blocks for t in b.transactions]
    assert len(txs) > 2 * _CHUNK
    frame = blocks_to_tx_frame(blocks)
    assert frame["hash"].to_list() == [t.hash for t in txs]
    assert frame["tx_index"].to_list() == [t.transaction_index for t in txs]
    assert frame["block_number"].to_list() == [b.number for b in blocks for _ in b.transactions]
    assert frame["from_address"].to_list() == [t.from_address.lower() for t in txs]
    assert frame["to_address"].to_list() == [t.to_address and t.to_address.lower() for t in txs]
    assert frame["method_id"].to_list() == [t.method_id and t.method_id.lower() for t in txs]
    assert frame["nonce"].to_list() == [min(t.nonce, 2**63 - 1) for t in txs]
    for name in ("value", "gas", "gas_price", "max_fee_per_gas", "max_priority_fee_per_gas"):
        expected = [None if getattr(t, name) is None else float(getattr(t, name)) for t in txs]
        assert frame[name].to_list() == expected, name

    pending = [PendingTx(chain_id=1, node="n", event_id=t.hash, observed_at=5.0,
                         first_seen_at=4.0, **t.model_dump(exclude={"transaction_index"}))
               for t in txs[:50]]
    same_columns = ["hash", "from_address", "to_address", "nonce", "value", "gas",
                    "gas_price", "max_fee_per_gas", "max_priority_fee_per_gas", "tx_type",
                    "input_size", "method_id", "is_contract_creation"]
    assert pending_to_tx_frame(pending).select(same_columns).equals(
        frame.head(50).select(same_columns))
    assert blocks_to_tx_frame([]).height == 0


def test_attributes_are_read_without_an_instance_dict_too():
    txs = _random_blocks(7, 40)
    rows = [t for b in txs for t in b.transactions]
    expected = [[getattr(t, name) for t in rows] for name in _INCLUDED_COLUMNS]
    assert _attribute_columns(rows, _INCLUDED_COLUMNS) == expected
    # no __dict__: attribute access (ignore: mypy takes a namedtuple's fields from a literal
    # only, and these are the columns, whatever they are)
    Slotted = namedtuple("Slotted", _INCLUDED_COLUMNS)  # type: ignore[misc]
    slotted = [Slotted(*(getattr(t, n) for n in _INCLUDED_COLUMNS)) for t in rows]
    # (ignore: stand-ins for the transactions, on purpose; the function reads them by name)
    assert _attribute_columns(slotted, _INCLUDED_COLUMNS) == expected  # type: ignore[arg-type]


@pytest.mark.parametrize(("held", "added", "limit"), [(0, 5, 8), (6, 5, 8), (3, 20, 8), (8, 8, 8)])
def test_putting_new_keys_at_once_keeps_what_putting_them_one_by_one_keeps(
    held: int, added: int, limit: int
) -> None:
    """`_Bounded.put_new` (the tx family's blocks seen, a run at a time) ends with the
    same entries in the same order as `put` per key, also past the limit."""
    one_by_one, at_once = _Bounded(limit), _Bounded(limit)
    for i in range(held):
        one_by_one.put(f"old{i}", 1.0)
        at_once.put(f"old{i}", 1.0)
    keys = [f"new{i}" for i in range(added)]
    for key in keys:
        one_by_one.put(key, 0.0)
    at_once.put_new(keys, 0.0)
    assert list(at_once.items()) == list(one_by_one.items())
    assert len(at_once) == min(held + added, limit)
