"""A deterministic, mainnet-shaped block history for benchmarks.

`generate(n, txs_per_block, seed)` returns `n` linked `Block` records (numbers 0..n-1)
whose shape follows post-merge Ethereum mainnet closely enough for throughput work:

- 12 s slots; about 1 % missed slots (24 s) and 0.1 % double misses (36 s);
  `observed_at` = header time + a log-normal propagation delay (median ~0.6 s);
- 30M gas limit, gas used ratio around 0.5 with noise and a little demand elasticity
  (busier when the base fee is low), base fee evolving by the EIP-1559 1/8 rule;
- transactions per block Poisson around `txs_per_block` (150 by default);
- the transaction mix of the mainnet fixture in ../shared/fixtures (blocks 17173049-50):
  ~60 % type 2, ~38 % legacy, ~2 % type 1; ~28 % plain transfers (no input, 21000 gas),
  ~72 % contract calls with real 4-byte selectors (ERC-20 transfer/approve, Uniswap
  routers...) and ABI-sized inputs, ~0.3 % contract creations (2-24 KB of init code);
  values mostly zero on calls, log-normal on transfers; per-sender nonces from a
  Zipf-like sender population (a few bots send a lot);
- builder/miner addresses from a small weighted pool.

`MemoryNode` serves such a list as a `collector.chain.BlockSource` (and enough of
`collector.rpc.NodeRpc` for `BlockCollector`), so the real follower and collector walk it.
"""

from __future__ import annotations

import hashlib
import itertools
import math
import random
import sys
import time
from collections.abc import Iterator, Sequence

from chainwatch.schema import Block, TxSummary

GWEI = 10**9
ETHER = 10**18
GAS_LIMIT = 30_000_000
GENESIS_TIME = 1_700_000_000
INITIAL_BASE_FEE = 20 * GWEI

# (selector, weight, typical ABI words after the selector) - mainnet's most common calls
SELECTORS: tuple[tuple[str, float, int], ...] = (
    ("0xa9059cbb", 18.0, 2),  # ERC-20 transfer(address,uint256)
    ("0x095ea7b3", 9.0, 2),  # approve(address,uint256)
    ("0x3593564c", 9.0, 24),  # Uniswap Universal Router execute(bytes,bytes[],uint256)
    ("0x23b872dd", 3.0, 3),  # transferFrom
    ("0xb6f9de95", 3.0, 7),  # swapExactETHForTokensSupportingFeeOnTransferTokens
    ("0x791ac947", 2.0, 8),  # swapExactTokensForETHSupportingFeeOnTransferTokens
    ("0x7ff36ab5", 2.0, 7),  # swapExactETHForTokens
    ("0x18cbafe5", 1.5, 8),  # swapExactTokensForETH
    ("0x38ed1739", 1.5, 8),  # swapExactTokensForTokens
    ("0x5ae401dc", 1.5, 14),  # multicall(uint256,bytes[])
    ("0xac9650d8", 1.5, 12),  # multicall(bytes[])
    ("0x2e1a7d4d", 1.0, 1),  # WETH withdraw(uint256)
    ("0xd0e30db0", 1.0, 0),  # WETH deposit()
    ("0xa22cb465", 1.0, 2),  # setApprovalForAll
    ("0x1249c58b", 0.5, 0),  # mint()
    ("0x6a761202", 1.0, 20),  # Safe execTransaction
    ("0x0162e2d0", 0.5, 30),  # bridge / aggregator calls (long inputs)
    ("0x12aa3caf", 1.0, 40),  # 1inch swap
)
SELECTOR_NAMES = tuple(s for s, _, _ in SELECTORS)
SELECTOR_WEIGHTS = tuple(w for _, w, _ in SELECTORS)
SELECTOR_WORDS = {s: words for s, _, words in SELECTORS}
LONG_TAIL_SHARE = 0.25  # calls to selectors outside the table (random, stable per contract)

TRANSFER_SHARE = 0.28
CREATION_SHARE = 0.003
TX_TYPES = (2, 0, 1)
TX_TYPE_WEIGHTS = (0.60, 0.38, 0.02)


def _address(rng: random.Random) -> str:
    return f"0x{rng.getrandbits(160):040x}"


def _hash(rng: random.Random) -> str:
    return f"0x{rng.getrandbits(256):064x}"


def _zipf_weights(n: int, s: float) -> list[float]:
    return [1.0 / (i + 1) ** s for i in range(n)]


class _Population:
    """Senders, recipients, contracts and builders, with cumulative weights for choices."""

    def __init__(self, rng: random.Random) -> None:
        self.senders = [_address(rng) for _ in range(50_000)]
        self.sender_cum = _cumulative(_zipf_weights(len(self.senders), 0.9))
        self.eoas = [_address(rng) for _ in range(20_000)]
        self.contracts = [_address(rng) for _ in range(5_000)]
        self.contract_cum = _cumulative(_zipf_weights(len(self.contracts), 1.1))
        # a contract's long-tail selector is stable, like a real contract's ABI
        self.contract_selector = {c: f"0x{rng.getrandbits(32):08x}" for c in self.contracts}
        self.builders = [_address(rng) for _ in range(20)]
        self.builder_cum = _cumulative(_zipf_weights(len(self.builders), 1.2))
        self.nonces = {a: rng.randrange(0, 5_000) for a in self.senders}


def _cumulative(weights: Sequence[float]) -> list[float]:
    total = 0.0
    out: list[float] = []
    for w in weights:
        total += w
        out.append(total)
    return out


def next_base_fee(base_fee: int, gas_used: int, gas_limit: int) -> int:
    """EIP-1559: move by up to 1/8 towards the 50 % gas target."""
    target = gas_limit // 2
    if gas_used == target:
        return base_fee
    if gas_used > target:
        delta = max(base_fee * (gas_used - target) // target // 8, 1)
        return base_fee + delta
    delta = base_fee * (target - gas_used) // target // 8
    return max(base_fee - delta, 0)


def _poisson(rng: random.Random, mean: float) -> int:
    """Poisson via the normal approximation (fine for means around 150), never negative."""
    return max(round(rng.gauss(mean, math.sqrt(mean))), 0)


def _tx(rng: random.Random, pop: _Population, index: int, base_fee: int) -> tuple[TxSummary, int]:
    """One transaction and its size on the wire (bytes, for the block's size field)."""
    sender = rng.choices(pop.senders, cum_weights=pop.sender_cum)[0]
    nonce = pop.nonces[sender]
    pop.nonces[sender] = nonce + 1
    kind = rng.random()
    to: str | None
    if kind < CREATION_SHARE:
        to, method_id = None, None
        input_size = rng.randint(2_000, 24_000)
        gas = rng.randint(1_000_000, 5_000_000)
        value = 0
    elif kind < CREATION_SHARE + TRANSFER_SHARE:
        to, method_id, input_size, gas = rng.choice(pop.eoas), None, 0, 21_000
        value = int(ETHER * math.exp(rng.gauss(math.log(0.05), 2.0)))
    else:
        to = rng.choices(pop.contracts, cum_weights=pop.contract_cum)[0]
        if rng.random() < LONG_TAIL_SHARE:
            method_id = pop.contract_selector[to]
            words = rng.randint(0, 16)
        else:
            method_id = rng.choices(SELECTOR_NAMES, weights=SELECTOR_WEIGHTS)[0]
            words = max(SELECTOR_WORDS[method_id] + rng.randint(-1, 4), 0)
        input_size = 4 + 32 * words
        gas = min(max(int(math.exp(rng.gauss(math.log(150_000), 0.8))), 30_000), 3_000_000)
        value = 0 if rng.random() < 0.8 else int(ETHER * math.exp(rng.gauss(math.log(0.1), 1.5)))
    tx_type = rng.choices(TX_TYPES, weights=TX_TYPE_WEIGHTS)[0]
    tip = int(GWEI * math.exp(rng.gauss(math.log(0.5), 1.2)))
    if tx_type == 2:
        max_fee: int | None = 2 * base_fee + tip
        max_tip: int | None = tip
        gas_price = base_fee + tip  # a mined type-2 tx reports its effective price
    else:
        max_fee = max_tip = None
        gas_price = base_fee + tip
    tx = TxSummary(
        hash=_hash(rng),
        transaction_index=index,
        from_address=sender,
        to_address=to,
        value=value,
        gas=gas,
        gas_price=gas_price,
        max_fee_per_gas=max_fee,
        max_priority_fee_per_gas=max_tip,
        nonce=nonce,
        tx_type=tx_type,
        input_size=input_size,
        method_id=method_id,
        is_contract_creation=to is None,
    )
    return tx, 110 + input_size


def generate(
    blocks: int,
    txs_per_block: float = 150,
    seed: int = 1,
    *,
    chain_id: int = 1,
    node: str = "bench",
    progress: bool = False,
) -> list[Block]:
    """`blocks` linked blocks 0..blocks-1; same arguments, same history."""
    return list(stream(blocks, txs_per_block, seed, chain_id=chain_id, node=node,
                       progress=progress))


def stream(
    blocks: int,
    txs_per_block: float = 150,
    seed: int = 1,
    *,
    chain_id: int = 1,
    node: str = "bench",
    progress: bool = False,
) -> Iterator[Block]:
    """`generate` one block at a time: a long history without holding it in memory."""
    rng = random.Random(seed)
    pop = _Population(rng)
    parent_hash = "0x" + "00" * 32
    timestamp = GENESIS_TIME
    base_fee = INITIAL_BASE_FEE
    started = time.monotonic()
    for number in range(blocks):
        if number:
            r = rng.random()
            timestamp += 36 if r < 0.001 else 24 if r < 0.011 else 12
        count = _poisson(rng, txs_per_block)
        txs: list[TxSummary] = []
        size = 600
        for i in range(count):
            tx, tx_size = _tx(rng, pop, i, base_fee)
            txs.append(tx)
            size += tx_size
        # demand elasticity keeps the base fee in a realistic band instead of a random walk
        mean_ratio = 0.5 - 0.08 * math.log(base_fee / INITIAL_BASE_FEE)
        ratio = min(max(rng.gauss(mean_ratio, 0.22), 0.02), 1.0)
        gas_used = int(GAS_LIMIT * ratio)
        block_hash = "0x" + hashlib.sha256(f"{seed}:{number}:{parent_hash}".encode()).hexdigest()
        yield Block(
            chain_id=chain_id,
            node=node,
            event_id=Block.id_for(chain_id, node, block_hash),
            observed_at=timestamp + math.exp(rng.gauss(math.log(0.6), 0.5)),
            number=number,
            hash=block_hash,
            parent_hash=parent_hash,
            timestamp=timestamp,
            miner=rng.choices(pop.builders, cum_weights=pop.builder_cum)[0],
            gas_used=gas_used,
            gas_limit=GAS_LIMIT,
            base_fee_per_gas=base_fee,
            tx_count=len(txs),
            size=size,
            transactions=tuple(txs),
        )
        parent_hash = block_hash
        base_fee = next_base_fee(base_fee, gas_used, GAS_LIMIT)
        if progress and number and number % 2000 == 0:
            rate = number / (time.monotonic() - started)
            print(f"  generated {number}/{blocks} blocks ({rate:.0f} blocks/s)", file=sys.stderr)


class MemoryNode:
    """A node whose whole chain is already known: a BlockSource over a list of blocks.

    Also answers the few `NodeRpc` calls `BlockCollector` makes (`node`, `chain_id`,
    `fetch_chain_id`, `close`), so the real collector can run on it without a network.
    """

    def __init__(self, blocks: Sequence[Block], *, node: str | None = None) -> None:
        if not blocks:
            raise ValueError("MemoryNode needs at least one block")
        self.blocks = list(blocks)
        self.by_hash = {b.hash: b for b in self.blocks}
        self.node = node or self.blocks[0].node
        self.chain_id: int | None = self.blocks[0].chain_id
        self.first = self.blocks[0].number

    async def fetch_chain_id(self) -> int:
        assert self.chain_id is not None
        return self.chain_id

    async def latest_number(self) -> int:
        return self.blocks[-1].number

    async def block_by_number(self, number: int) -> Block | None:
        i = number - self.first
        return self.blocks[i] if 0 <= i < len(self.blocks) else None

    async def block_by_hash(self, block_hash: str) -> Block | None:
        return self.by_hash.get(block_hash)

    async def close(self) -> None:
        return None


def describe(blocks: Sequence[Block]) -> dict[str, float]:
    """A few summary figures, to check the history looks like mainnet."""
    txs = [t for b in blocks for t in b.transactions]
    n_tx = max(len(txs), 1)
    intervals = [b.timestamp - a.timestamp for a, b in itertools.pairwise(blocks)]
    fees = sorted(b.base_fee_per_gas or 0 for b in blocks)
    return {
        "blocks": len(blocks),
        "txs": len(txs),
        "txs_per_block": len(txs) / max(len(blocks), 1),
        "type2_share": sum(t.tx_type == 2 for t in txs) / n_tx,
        "transfer_share": sum(t.input_size == 0 for t in txs) / n_tx,
        "creation_share": sum(t.is_contract_creation for t in txs) / n_tx,
        "mean_gas_used_ratio": sum(b.gas_used / b.gas_limit for b in blocks) / max(len(blocks), 1),
        "mean_interval_s": sum(intervals) / max(len(intervals), 1),
        "base_fee_p50_gwei": fees[len(fees) // 2] / GWEI,
        "base_fee_p01_gwei": fees[len(fees) // 100] / GWEI,
        "base_fee_p99_gwei": fees[len(fees) * 99 // 100] / GWEI,
    }
