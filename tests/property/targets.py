"""Fuzz targets: every decoder and mapper that takes bytes from outside chainwatch.

Each target pairs a hypothesis strategy (garbage, and valid payloads with a few fields
garbled) with a check that runs one input. A check passes when the code under test
returns a good result or raises the project's typed error for that input; any other
exception is a crash. The same targets drive the fast pytest suite (tests/property) and
the long run in bench/fuzz.py, so the figures in docs/reliability.md come from one place.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import json
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hypothesis import strategies as st

# web3 (through py_ecc) raises the recursion limit to 100000 at import: import it before
# hypothesis runs, which would otherwise warn that the limit changed under it.
import collector.rpc  # noqa: F401
from chainwatch.exceptions import ConfigError, InvalidRecord, MalformedRpcPayload
from chainwatch.schema import (
    INT64_MAX,
    Block,
    Finding,
    MempoolSnapshot,
    NodeStatus,
    PeerSnapshot,
    PendingTx,
    Reorg,
    TxLifecycle,
    TxSummary,
    decode,
    encode,
)

# --- values -------------------------------------------------------------------------------

# Every code point, lone surrogates included: JSON can carry "\ud800", and argv can carry
# surrogate-escaped bytes.
ANY_CHAR = st.characters(codec=None, exclude_categories=())
ANY_TEXT = st.text(ANY_CHAR, max_size=40)
HEXISH = st.one_of(
    st.from_regex(r"\A0[xX][0-9a-fA-F_ -]{0,70}\Z"),
    st.from_regex(r"\A0x[0-9a-f]{64}\Z"),
    # almost hex: one odd code point (a lone surrogate, a control char...) inside
    st.tuples(st.from_regex(r"\A0x[0-9a-f]{0,8}\Z"), ANY_CHAR, st.from_regex(r"\A[0-9a-f]{0,4}\Z"))
    .map("".join),
    st.tuples(st.just("0x"), st.characters(categories=["Cs"])).map("".join),
)
BIG_INTS = st.integers(min_value=-(2**300), max_value=2**300)
SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    BIG_INTS,
    st.floats(allow_nan=True, allow_infinity=True),
    ANY_TEXT,
    HEXISH,
    st.binary(max_size=40),
)
JSON_SCALARS = st.one_of(st.none(), st.booleans(), BIG_INTS, st.floats(), ANY_TEXT, HEXISH)
JSON_VALUES = st.recursive(
    JSON_SCALARS,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(ANY_TEXT, inner, max_size=4),
    max_leaves=12,
)
# what a node or web3 may hand over: JSON values plus bytes (web3's HexBytes)
GARBAGE = st.recursive(
    SCALARS,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(ANY_TEXT, inner, max_size=4),
    max_leaves=12,
)


@st.composite
def garbled(draw: st.DrawFn, template: Any, values: st.SearchStrategy[Any] = GARBAGE) -> Any:
    """A deep copy of ``template`` with 1-4 changes: a value replaced, a key dropped or
    added, somewhere in the nesting. Most fields stay valid, so the input gets past the
    first checks and reaches the deeper ones."""
    root = [copy.deepcopy(template)]
    for _ in range(draw(st.integers(1, 4))):
        parent: Any = root
        key: Any = 0
        while True:  # walk down to a random place
            node = parent[key]
            if not isinstance(node, dict | list) or not node or draw(st.integers(0, 2)) == 0:
                break
            parent = node
            key = draw(st.sampled_from(sorted(node, key=repr) if isinstance(node, dict)
                                       else range(len(node))))
        action = draw(st.sampled_from(["replace", "replace", "delete", "add"]))
        if action == "delete" and isinstance(parent, dict):
            del parent[key]
        elif action == "add" and isinstance(parent[key], dict):
            parent[key][draw(ANY_TEXT)] = draw(values)
        else:
            parent[key] = draw(values)
    return root[0]


# --- templates: valid payloads as nodes send them ------------------------------------------

TX_1559 = {
    "blockHash": "0x" + "ab" * 32, "blockNumber": "0x10", "chainId": "0x7a69",
    "from": "0x" + "11" * 20, "to": "0x" + "22" * 20, "gas": "0x5208", "gasPrice": "0x3b9aca00",
    "maxFeePerGas": "0x77359400", "maxPriorityFeePerGas": "0x3b9aca00",
    "hash": "0x" + "cd" * 32, "input": "0xa9059cbb" + "00" * 64, "nonce": "0x7",
    "transactionIndex": "0x0", "type": "0x2", "value": "0xde0b6b3a7640000",
    "v": "0x1", "r": "0x" + "01" * 32, "s": "0x" + "02" * 32, "accessList": [],
}
TX_LEGACY = {
    "from": "0x" + "33" * 20, "to": None, "gas": "0x30d40", "gasPrice": "0x4a817c800",
    "hash": "0x" + "ef" * 32, "input": "0x6080604052", "nonce": "0x0",
    "transactionIndex": "0x1", "type": "0x0", "value": "0x0",
}
BLOCK = {
    "number": "0x10", "hash": "0x" + "ab" * 32, "parentHash": "0x" + "aa" * 32,
    "timestamp": "0x6553f100", "miner": "0x" + "44" * 20, "gasUsed": "0x2f4e0",
    "gasLimit": "0x1c9c380", "baseFeePerGas": "0x7", "size": "0x3e8",
    "transactions": [TX_1559, TX_LEGACY], "uncles": [], "withdrawals": [],
    "extraData": "0x", "difficulty": "0x0", "nonce": "0x0000000000000000",
}
# web3's subscription payload for newPendingTransactions(True): ints and HexBytes
TX_WEB3 = {
    "hash": bytes.fromhex("cd" * 32), "from": "0x" + "11" * 20, "to": "0x" + "22" * 20,
    "nonce": 7, "value": 10**18, "gas": 21000, "maxFeePerGas": 2 * 10**9,
    "maxPriorityFeePerGas": 10**9, "type": 2, "input": bytes.fromhex("a9059cbb" + "00" * 64),
}
TXPOOL_CONTENT = {
    "pending": {"0x" + "11" * 20: {"7": TX_1559}},
    "queued": {"0x" + "33" * 20: {"9": {**TX_LEGACY, "nonce": "0x9"}}},
}
ADMIN_PEERS = [
    {"id": "a" * 64, "enode": "enode://" + "a" * 128 + "@10.0.0.1:30303",
     "name": "Geth/v1.17.10-stable/linux-amd64/go1.26.8",
     "network": {"inbound": False, "localAddress": "10.0.0.2:1", "remoteAddress": "10.0.0.1:2"},
     "protocols": {"eth": {"version": 68}}},
    {"id": "b" * 64, "name": "Nethermind/v1.25.4/linux-x64/dotnet8.0.1",
     "network": {"inbound": True}},
]
NODES_YAML = """\
nodes:
  - name: geth-1
    rpc: http://10.0.0.5:8545/KEY
    ws: ws://10.0.0.5:8546
    expected_block_time: 12
    mempool: true
    peers: false
  - name: anvil.2
    rpc: https://node.example:443
"""

_COMMON = {"chain_id": 31337, "node": "anvil1", "event_id": "e" * 32, "observed_at": 1.7e9}
RECORDS: list[Any] = [
    Block(**_COMMON, number=16, hash="0xab", parent_hash="0xaa", timestamp=1, miner="0x44",
          gas_used=1, gas_limit=2, tx_count=0),
    Reorg(**_COMMON, old_head_number=11, old_head_hash="0x1", new_head_number=11,
          new_head_hash="0x2", common_ancestor_number=9, common_ancestor_hash="0x9", depth=2,
          dropped_block_hashes=("0x1", "0x0")),
    Finding(**_COMMON, detector="reorg_depth", family="chain", severity="warning", score=0.5,
            threshold=0.4, subject_kind="node", subject="anvil1", block_number=11,
            summary="reorg of depth 2"),
    NodeStatus(**_COMMON, reachable=True, head_number=5, expected_block_time_seconds=12.0),
    PendingTx(**_COMMON, first_seen_at=1.0, hash="0xcd", from_address="0x11", to_address=None,
              nonce=0, value=0, gas=21000, input_size=0, method_id=None,
              is_contract_creation=True),
    MempoolSnapshot(**_COMMON, pending_count=1, tracked_count=1, sender_count=1),
    TxLifecycle(**_COMMON, hash="0xcd", fate="dropped", from_address="0x11", nonce=0),
    PeerSnapshot(**_COMMON, peer_count=2, detailed=True, inbound=1, outbound=1,
                 clients={"Geth": 2}, connected=("ab",)),
]


# --- checks -------------------------------------------------------------------------------


class Crash(AssertionError):
    """The code under test raised something other than its typed error."""


@dataclass
class Target:
    """One fuzz target: a strategy, and a check that raises Crash on a wrong outcome."""

    name: str
    strategy: st.SearchStrategy[Any]
    check: Callable[[Any], None]
    tried: int = 0
    rejected: int = 0  # typed errors: the expected outcome for garbage
    accepted: int = 0
    crashes: list[str] = field(default_factory=list)

    def run(self, value: Any) -> None:
        self.tried += 1
        try:
            self.check(value)
        except _Typed:
            self.rejected += 1
            return
        except (KeyboardInterrupt, SystemExit):
            raise
        except BaseException as exc:  # a Rust panic (polars, pydantic) is a BaseException
            self.crashes.append(f"{type(exc).__name__}: {str(exc)[:200]}")
            raise Crash(f"{self.name}: {type(exc).__name__}: {exc}") from exc
        self.accepted += 1

    def figures(self) -> str:
        return (
            f"{self.name}: {self.tried} inputs tried, {len(self.crashes)} crashes "
            f"({self.rejected} rejected with a typed error, {self.accepted} accepted)"
        )


class _Typed(Exception):
    """Raised by a check when the code under test gave its typed error."""


def _typed(call: Callable[[], Any], *errors: type[Exception]) -> Any:
    try:
        return call()
    except errors as exc:
        message = str(exc)
        if "\n" in message or not message:
            raise Crash(f"typed error without a one-line message: {message!r}") from exc
        raise _Typed from exc


def _publishable(record: Any) -> None:
    """What a mapper returns goes on the bus: it must encode and decode back to itself."""
    assert decode(encode(record)) == record


def check_decode(payload: bytes | str) -> None:
    record = _typed(lambda: decode(payload), InvalidRecord)
    _publishable(record)


def check_map_block(raw: Any) -> None:
    from collector.mappers import map_block

    block = _typed(
        lambda: map_block(raw, chain_id=31337, node="anvil1", observed_at=1.7e9),
        MalformedRpcPayload,
    )
    _publishable(block)


def check_map_transaction(raw: Any) -> None:
    from collector.mappers import map_transaction

    tx = _typed(lambda: map_transaction(raw), MalformedRpcPayload)
    _publishable(Block(**_COMMON, number=1, hash="0x1", parent_hash="0x0", timestamp=1,
                       miner="0x44", gas_used=0, gas_limit=1, tx_count=1, transactions=(tx,)))


def check_map_pending_tx(raw: Any) -> None:
    from collector.mempool import map_pending_tx

    tx = _typed(
        lambda: map_pending_tx(raw, chain_id=31337, node="anvil1", first_seen_at=1.7e9),
        MalformedRpcPayload,
    )
    _publishable(tx)


def check_txpool(raw: Any) -> None:
    """txpool_content and txpool_status on the same answer; rejected when both reject."""
    from collector.mempool import map_pending_tx, parse_txpool_content, parse_txpool_status

    results = []
    for parse in (parse_txpool_content, parse_txpool_status):
        try:
            results.append(_typed(functools.partial(parse, raw), MalformedRpcPayload))
        except _Typed:
            results.append(None)
    content, counts = results
    if counts is not None:  # what goes into a MempoolSnapshot
        assert all(isinstance(c, int) and 0 <= c <= INT64_MAX for c in counts)
    for tx in [*content[0], *content[1]] if content is not None else []:
        with contextlib.suppress(_Typed):  # each tx is its own skip, as in the collector
            _publishable(_typed(
                functools.partial(map_pending_tx, tx, chain_id=1, node="n", first_seen_at=1.0),
                MalformedRpcPayload,
            ))
    if content is None and counts is None:
        raise _Typed


def check_peers(raw: tuple[Any, Any]) -> None:
    from collector.peers import PeerTracker, parse_client

    count, admin_peers = raw
    tracker = PeerTracker(chain_id=1, node="n")
    snapshot = _typed(lambda: tracker.observe(count, admin_peers, 1.7e9), MalformedRpcPayload)
    _publishable(snapshot)
    if isinstance(admin_peers, list):
        for peer in admin_peers:
            parse_client(peer.get("name") if isinstance(peer, dict) else peer)


def check_nodes_file(content: bytes) -> None:
    """--nodes FILE: ConfigError, or nodes whose URLs pass (or fail) the URL check."""
    from chainwatch.nodes import load_nodes
    from collector.rpc import check_url

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "nodes.yaml"
        path.write_bytes(content)
        nodes = _typed(lambda: load_nodes(path), ConfigError)
    for node in nodes:
        _typed_or_ok(functools.partial(
            check_url, node.rpc.get_secret_value(), ("http", "https"), "RPC"))
        if node.ws is not None:
            _typed_or_ok(functools.partial(
                check_url, node.ws.get_secret_value(), ("ws", "wss"), "WS"))


def check_url_parsing(url: str) -> None:
    """--rpc/--ws and nodes-file URLs: ConfigError or accepted; never the secret in errors."""
    from collector.rpc import check_url

    try:
        _typed(lambda: check_url(url, ("http", "https"), "RPC URL"), ConfigError)
    except _Typed as typed:
        message = str(typed.__cause__)
        if SECRET in url and SECRET in message:
            raise Crash(f"the URL's secret is in the error: {message!r}") from None
        raise


SECRET = "SECRET-TOKEN-123"
URL_INPUTS = st.one_of(
    ANY_TEXT,
    st.tuples(
        st.sampled_from(["http", "https", "ws", "ftp", "", "HTTP", "http:"]),
        st.sampled_from(["", "user:" + SECRET + "@"]),
        st.one_of(st.sampled_from(["127.0.0.1", "[::1]", "node.example", "", "[::1", "a b"]),
                  ANY_TEXT),
        st.one_of(st.sampled_from(["", ":8545", ":0", ":99999", ":-1", ":x"]), ANY_TEXT),
        st.sampled_from(["", "/" + SECRET, "/v3/" + SECRET + "/", "?apikey=" + SECRET,
                         "#" + SECRET]),
        ANY_TEXT,
    ).map(lambda p: f"{p[0]}://{p[1]}{p[2]}{p[3]}{p[4]}{p[5]}"),
)

# Settings fields whose value the CLI validates before it connects to anything. rpc, ws
# and nodes would make `run` connect: their parsing is fuzzed by the URL and nodes targets.
CLI_ENV_FIELDS = [
    "expected_block_time", "node", "poll_interval", "rpc_timeout", "start_block", "window",
    "max_reorg_depth", "state_dir", "mempool", "mempool_poll_interval", "mempool_drop_grace",
    "peers", "peer_interval", "kafka", "kafka_security_protocol", "kafka_sasl_mechanism",
    "kafka_sasl_username", "kafka_sasl_password", "kafka_partitions", "topic_prefix", "group",
    "models", "model_kind", "warmup_blocks", "refit_every_blocks", "contamination",
    "reorg_warning_depth", "lag_start_blocks", "stall_factor", "alertmanager",
    "alertmanager_severity", "alertmanager_ttl", "metrics_host", "metrics_port", "log_level",
    "log_json",
]
CLI_FLAGS = [
    "--node", "--expected-block-time", "--kafka", "--metrics-port", "--metrics-host",
    "--state-dir", "--topic-prefix", "--start-block", "--poll-interval", "--warmup-blocks",
    "--alertmanager-severity", "--model", "--duration", "--log-level", "--no-such-flag",
]
# os.environ takes neither NUL nor lone surrogates; argv can hold surrogate escapes
ENV_TEXT = st.text(st.characters(codec="utf-8", exclude_characters="\x00"), max_size=30)
CLI_VALUES = st.one_of(
    ENV_TEXT,
    st.sampled_from(["-1", "0", "1e309", "nan", "inf", "-inf", "1_000", "0x10", "true", "",
                     " ", "99999999999999999999999", "DEBUG", "info", "SASL_SSL"]),
)
CLI_INPUTS = st.one_of(
    st.tuples(st.just("env"), st.sampled_from(CLI_ENV_FIELDS), CLI_VALUES),
    st.tuples(st.just("flag"), st.sampled_from(CLI_FLAGS),
              st.one_of(CLI_VALUES, st.text(ANY_CHAR, max_size=20))),
)


def run_cli(args: list[str], env: dict[str, str]) -> tuple[int, str, str]:
    """`chainwatch ARGS` in this process (CliRunner's isolation around cli.main)."""
    import logging
    import sys

    from typer.testing import CliRunner

    from chainwatch.cli import main

    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    argv = sys.argv
    code: int | str | None = 0
    with CliRunner().isolation(env=env) as (out, err, _):
        sys.argv = ["chainwatch", *args]
        try:
            main()
        except SystemExit as exc:
            code = exc.code
        finally:
            sys.argv = argv
            root.handlers[:], root.level = handlers, level
            sys.stdout.flush()
            sys.stderr.flush()
        stdout, stderr = out.getvalue().decode(), err.getvalue().decode()
    return code if isinstance(code, int) else 1, stdout, stderr


def check_cli(case: tuple[str, str, str]) -> None:
    """A bad flag or environment value: exit code != 0 and one `chainwatch: error:` line.

    `run` without a node never connects anywhere, so a value that is valid ends in the
    one-line "no node to follow" error instead: the same contract.
    """
    how, name, value = case
    with tempfile.TemporaryDirectory() as tmp:
        args, env = ["run", "--state-dir", tmp, "--metrics-host", "127.0.0.1"], {}
        if how == "env":
            env = {f"CHAINWATCH_{name.upper()}": value}
            if name in ("state_dir", "metrics_host"):
                args = ["run"]
        else:
            args = ["run", name, value]
        code, _, stderr = run_cli(args, env)
    lines = stderr.splitlines()
    if code == 0 or len(lines) != 1 or not lines[0].startswith("chainwatch: error: ") or (
        "Traceback" in stderr
    ):
        raise Crash(f"exit {code}, stderr {stderr[-600:]!r}")
    raise _Typed


def _typed_or_ok(call: Callable[[], Any]) -> None:
    with contextlib.suppress(_Typed):
        _typed(call, ConfigError)


# --- replay inputs: files an analyst hands to `chainwatch replay` ---------------------------

ETL_BLOCKS = (
    "number,hash,parent_hash,timestamp,miner,gas_used,gas_limit,transaction_count,"
    "base_fee_per_gas\n"
    + "".join(f"{n},0x{n:064x},0x{n - 1:064x},{1700000000 + 12 * n},0x{'44' * 20},"
              f"21000,30000000,1,7\n" for n in range(1, 4))
)
ETL_TXS = (
    "hash,block_number,block_hash,transaction_index,from_address,to_address,value,gas,"
    "gas_price,nonce,input,transaction_type,max_fee_per_gas,max_priority_fee_per_gas\n"
    + "".join(f"0x{1000 + n:064x},{n},0x{n:064x},0,0x{'11' * 20},0x{'22' * 20},"
              f"{10**18 * n},21000,20,{n},0xa9059cbb{'00' * 8},2,30,2\n" for n in range(1, 4))
)
LABELS_JSONL = (
    '{"family": "fork_risk", "kind": "reorg", "node": "geth-1", "first_block": 100}\n'
    f'{{"family": "tx", "tx_hashes": ["0x{"cd" * 32}"]}}\n'
)


def _mutated(original: bytes, at: int, insert: bytes, drop: int) -> bytes:
    """`original` with `drop` bytes at `at` replaced by `insert` (at is clamped)."""
    at = min(at, len(original))
    return original[:at] + insert + original[at + drop:]


def check_table_source(case: tuple[str, str, bytes]) -> None:
    """An ethereum-etl export (blocks + transactions, CSV or Parquet) with one file
    damaged: ReplayError, or records that can go on the bus (bad rows are reported)."""
    from replay.exceptions import ReplayError
    from replay.rows import Defaults, InvalidRows
    from replay.sources import TableSource, find_tables

    damaged, suffix, content = case
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        for name, text in (("blocks", ETL_BLOCKS), ("transactions", ETL_TXS)):
            path = root / f"{name}{suffix}"
            if name == damaged:
                path.write_bytes(content)
            elif suffix == ".csv":
                path.write_text(text)
            else:
                _parquet_of(text, path)

        def read() -> list[Any]:
            source = TableSource(find_tables(root), InvalidRows(), Defaults())
            return list(source.records())

        for record in _typed(read, ReplayError):
            _publishable(record)


def _parquet_of(csv_text: str, path: Path) -> None:
    import io

    import polars as pl

    pl.read_csv(io.StringIO(csv_text), infer_schema=False).write_parquet(path)


@functools.cache
def _parquet_bytes(csv_text: str) -> bytes:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "t.parquet"
        _parquet_of(csv_text, path)
        return path.read_bytes()


@functools.cache
def _archive_file() -> tuple[str, bytes]:
    """One valid archive file (blocks of two nodes, with transactions): its path under
    the archive root and its bytes. Made once."""
    from bench.synthetic import generate
    from replay.archive import ArchiveWriter, archive_row

    with tempfile.TemporaryDirectory() as tmp:
        writer = ArchiveWriter(Path(tmp))
        for i, block in enumerate(generate(6, 3, seed=5)):
            writer.add(archive_row("cw.blocks", 0, i, "1:n", encode(block), 0))
        writer.flush()
        path = next(Path(tmp).glob("chain_id=*/day=*/*.parquet"))
        return str(path.relative_to(tmp)), path.read_bytes()


def check_archive_source(content: bytes) -> None:
    """An archive whose one file is damaged: ReplayError (no readable file at all), or
    the rows that can be read, reported damage counted as invalid."""
    from replay.archive import ArchiveSource
    from replay.exceptions import ReplayError
    from replay.rows import InvalidRows

    where, _ = _archive_file()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / where
        path.parent.mkdir(parents=True)
        path.write_bytes(content)
        for record in _typed(lambda: list(ArchiveSource(Path(tmp), InvalidRows()).records()),
                             ReplayError):
            _publishable(record)


def check_jsonl_source(content: bytes) -> None:
    """A JSONL file of records: bad lines reported and skipped, the rest publishable."""
    from replay.rows import InvalidRows
    from replay.sources import JsonlSource

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "history.jsonl"
        path.write_bytes(content)
        invalid = InvalidRows()
        records = list(JsonlSource(path, invalid).records())
    for record in records:
        _publishable(record)
    lines = [line for line in content.split(b"\n") if line.strip()]
    if len(records) + invalid.count != len(lines):  # nothing dropped without a report
        raise Crash(f"{len(lines)} lines, {len(records)} records, {invalid.count} reported")


def check_labels_file(content: bytes) -> None:
    """--labels FILE: each bad line reported with on_error; without it, LabelError."""
    from chainwatch.labels import LabelError, read_labels

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "labels.jsonl"
        path.write_bytes(content)
        skipped: list[tuple[str, str]] = []
        kept = read_labels(path, on_error=lambda where, why: skipped.append((where, why)))
        for where, why in skipped:
            if "\n" in why or not why:
                raise Crash(f"a skipped label line without a one-line reason: {where} {why!r}")
        whole = _typed(lambda: read_labels(path), LabelError)
        assert whole == kept and not skipped


@functools.cache
def _history_blocks() -> list[Any]:
    """30 linked blocks of one node, 3 txs each: what the garbled records arrive after."""
    from bench.synthetic import generate

    return generate(30, 3, seed=11)


def check_detector(payloads: list[bytes]) -> None:
    """Records that pass `decode` (the schema's checks), however odd their values, after a
    short normal history: the detector takes every one without a record failing or a
    batch step raising (either would be a bug its guards only contain)."""
    from chainwatch.metrics import Metrics
    from detector.engine import Detector, DetectorConfig

    records = []
    for payload in payloads:
        with contextlib.suppress(InvalidRecord):
            records.append(decode(payload))
    history = _history_blocks()
    now = [history[-1].observed_at]
    detector = Detector(DetectorConfig(warmup_blocks=10), Metrics(), clock=lambda: now[0])
    detector.process(list(history))
    for record in records:
        now[0] = max(now[0], record.observed_at) if record.observed_at == record.observed_at \
            else now[0]
        detector.process([record])
        if detector.failed or detector.step_errors:
            raise Crash(f"{type(record).__name__} made the detector fail: "
                        f"{[why for _, why in detector.failed] + detector.step_errors}")
    if not records:
        raise _Typed


# --- strategies ---------------------------------------------------------------------------

_RECORD_DICTS = [json.loads(encode(r)) for r in RECORDS]

DECODE_INPUTS = st.one_of(
    st.binary(max_size=200),
    ANY_TEXT,
    st.sampled_from(_RECORD_DICTS).flatmap(lambda d: garbled(d, JSON_VALUES)).map(
        lambda d: json.dumps(d).encode()  # ensure_ascii: lone surrogates as \\ud800 escapes
    ),
    st.sampled_from(_RECORD_DICTS).flatmap(lambda d: garbled(d, JSON_VALUES)).map(
        lambda d: json.dumps(d, ensure_ascii=False).encode("utf-8", "surrogatepass")
    ),
    JSON_VALUES.map(lambda v: json.dumps(v).encode()),
)
BLOCK_INPUTS = st.one_of(GARBAGE, garbled(BLOCK))
TX_INPUTS = st.one_of(GARBAGE, garbled(TX_1559), garbled(TX_LEGACY))
PENDING_INPUTS = st.one_of(GARBAGE, garbled(TX_1559), garbled(TX_LEGACY), garbled(TX_WEB3))
TXPOOL_INPUTS = st.one_of(
    GARBAGE, garbled(TXPOOL_CONTENT), garbled({"pending": "0x1", "queued": "0x0"})
)
PEER_INPUTS = st.tuples(
    st.one_of(st.just("0x2"), GARBAGE),
    st.one_of(st.none(), GARBAGE, garbled(ADMIN_PEERS)),
)
NODES_INPUTS = st.one_of(
    st.binary(max_size=300),
    st.text(ANY_CHAR, max_size=200).map(lambda t: t.encode("utf-8", "surrogatepass")),
    garbled({"nodes": [{"name": "geth-1", "rpc": "http://10.0.0.5:8545/KEY",
                        "ws": "ws://10.0.0.5:8546", "expected_block_time": 12}]},
            JSON_VALUES).map(lambda d: json.dumps(d).encode()),  # JSON is YAML
    st.tuples(st.integers(0, len(NODES_YAML)), st.binary(max_size=12)).map(
        lambda cut: (NODES_YAML[: cut[0]].encode() + cut[1] + NODES_YAML[cut[0]:].encode())
    ),
)


_BYTES_IN = st.binary(min_size=0, max_size=12)
TABLE_INPUTS = st.one_of(
    st.tuples(st.sampled_from(["blocks", "transactions"]), st.just(".csv"),
              st.tuples(st.sampled_from([ETL_BLOCKS, ETL_TXS]), st.integers(0, 700), _BYTES_IN,
                        st.integers(0, 40))
              .map(lambda m: _mutated(m[0].encode(), m[1], m[2], m[3]))),
    st.tuples(st.sampled_from(["blocks", "transactions"]), st.just(".csv"),
              st.text(ANY_CHAR, max_size=300).map(
                  lambda t: t.encode("utf-8", "surrogatepass"))),
    st.tuples(st.sampled_from(["blocks", "transactions"]), st.just(".parquet"),
              st.tuples(st.sampled_from([ETL_BLOCKS, ETL_TXS]), st.integers(0, 3000),
                        _BYTES_IN, st.integers(0, 40))
              .map(lambda m: _mutated(_parquet_bytes(m[0]), m[1], m[2], m[3]))),
)
ARCHIVE_INPUTS = st.one_of(
    st.tuples(st.integers(0, 40_000), _BYTES_IN, st.integers(0, 64)).map(
        lambda m: _mutated(_archive_file()[1], m[0], m[1], m[2])),
    st.integers(0, 40_000).map(lambda cut: _archive_file()[1][:cut]),
    st.binary(max_size=200),
)
JSONL_INPUTS = st.one_of(
    st.binary(max_size=300),
    st.lists(DECODE_INPUTS.map(lambda v: v if isinstance(v, bytes)
                               else v.encode("utf-8", "surrogatepass")), max_size=4)
    .map(b"\n".join),
    st.tuples(st.integers(0, 2000), _BYTES_IN, st.integers(0, 20)).map(
        lambda m: _mutated(b"\n".join(encode(r) for r in RECORDS), m[0], m[1], m[2])),
)
LABEL_INPUTS = st.one_of(
    st.binary(max_size=200),
    st.text(ANY_CHAR, max_size=200).map(lambda t: t.encode("utf-8", "surrogatepass")),
    st.tuples(st.integers(0, len(LABELS_JSONL)), _BYTES_IN, st.integers(0, 10)).map(
        lambda m: _mutated(LABELS_JSONL.encode(), m[0], m[1], m[2])),
    garbled({"family": "tx", "kind": "sandwich", "first_block": 3, "last_block": 4,
             "tx_hashes": ["0x" + "cd" * 32], "node": "n", "chain_id": 1}, JSON_VALUES)
    .map(lambda d: json.dumps(d).encode()),
)


_DETECTOR_TEMPLATES = [*_RECORD_DICTS, json.loads(encode(
    Block(**{**_COMMON, "event_id": "f" * 32}, number=31, hash="0x" + "ab" * 32,
          parent_hash="0x" + "aa" * 32, timestamp=1_700_000_400, miner="0x" + "44" * 20,
          gas_used=63_000, gas_limit=30_000_000, base_fee_per_gas=7, tx_count=2,
          transactions=tuple(TxSummary(
              hash=f"0x{i:064x}", transaction_index=i, from_address="0x" + "11" * 20,
              to_address="0x" + "22" * 20, value=10**18, gas=21_000, gas_price=None,
              max_fee_per_gas=30, max_priority_fee_per_gas=2, nonce=i, tx_type=2,
              input_size=68, method_id="0xa9059cbb", is_contract_creation=False)
              for i in range(2)))))]
ODD_INTS = st.one_of(
    st.integers(-(2**70), 2**70),
    st.sampled_from([0, 1, -1, 2**31, 2**53 + 1, 2**63 - 1, 2**63, 2**64, 2**256 - 1]),
)
ODD_FLOATS = st.one_of(
    st.floats(allow_nan=False, allow_infinity=False),
    st.sampled_from([0.0, -0.0, 1e-300, 1e18, 4e9, -1.0]),
)


@st.composite
def odd_values(draw: st.DrawFn, template: Any) -> Any:
    """A deep copy of ``template`` with 1-4 values replaced by others of the same JSON
    type (huge, zero, negative numbers; odd strings): most still pass the schema."""
    root = [copy.deepcopy(template)]
    for _ in range(draw(st.integers(1, 4))):
        parent: Any = root
        key: Any = 0
        while isinstance(parent[key], dict | list) and parent[key]:
            parent = parent[key]
            key = draw(st.sampled_from(sorted(parent, key=repr) if isinstance(parent, dict)
                                       else range(len(parent))))
        old = parent[key]
        if isinstance(old, bool):
            parent[key] = draw(st.booleans())
        elif isinstance(old, int):
            parent[key] = draw(ODD_INTS)
        elif isinstance(old, float):
            parent[key] = draw(ODD_FLOATS)
        elif isinstance(old, str):
            parent[key] = draw(st.one_of(HEXISH, ANY_TEXT, st.just(old + old)))
        elif old is None:
            parent[key] = draw(st.one_of(st.none(), ODD_INTS))
    return root[0]


DETECTOR_INPUTS = st.lists(
    st.sampled_from(_DETECTOR_TEMPLATES).flatmap(odd_values).map(
        lambda d: json.dumps(d).encode()),
    min_size=1, max_size=4,
)


def all_targets() -> list[Target]:
    """Fresh targets (counters at zero), in a stable order."""
    return [
        Target("schema.decode", DECODE_INPUTS, check_decode),
        Target("mappers.map_block", BLOCK_INPUTS, check_map_block),
        Target("mappers.map_transaction", TX_INPUTS, check_map_transaction),
        Target("mempool.map_pending_tx", PENDING_INPUTS, check_map_pending_tx),
        Target("mempool.txpool_content/status", TXPOOL_INPUTS, check_txpool),
        Target("peers.PeerTracker.observe", PEER_INPUTS, check_peers),
        Target("nodes.load_nodes", NODES_INPUTS, check_nodes_file),
        Target("rpc.check_url", URL_INPUTS, check_url_parsing),
        Target("cli flags and CHAINWATCH_* env", CLI_INPUTS, check_cli),
        Target("replay: ethereum-etl tables", TABLE_INPUTS, check_table_source),
        Target("replay: archive file", ARCHIVE_INPUTS, check_archive_source),
        Target("replay: JSONL records", JSONL_INPUTS, check_jsonl_source),
        Target("replay --labels", LABEL_INPUTS, check_labels_file),
        Target("detector: decoded records", DETECTOR_INPUTS, check_detector),
    ]
