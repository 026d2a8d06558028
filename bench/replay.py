"""Replay throughput and memory: events/s, blocks/s, tx/s through all detectors, peak RSS.

    python -m bench.replay make --txs 10000000 --dir .cache/bench-archive   # synthetic archive
    python -m bench.replay run --dir .cache/bench-archive                     # replay it
    python -m bench.replay decode --dir .cache/bench-archive --limit 10000    # reading alone
    python -m bench.replay detector --blocks 3000                             # detector alone
    python -m bench.replay model                                              # tx model's floor
    python -m bench.replay steps --dir .cache/bench-archive --models M --to 7200  # where it goes

`make` writes a chainwatch archive (the layout of `chainwatch archive`) of mainnet-shaped
blocks from bench/synthetic.py: 10 seeded chunks of 1,000 blocks are generated once and
cycled with new heights, hashes and times (generation costs ~5 ms per block). `run`
replays it exactly as `chainwatch replay DIR` does (archive source -> decode -> the live
Detector -> findings), without writing a report, and prints figures plus VmHWM (peak RSS)
of its own process and the peak PSS of it and its fit-ahead worker together (sampled).
`detector` feeds pre-decoded blocks to the Detector only, to separate decoding from
detection. `decode` and `detector` run under the garbage-collector setting
replay uses (`replay.driver.fewer_collections`; `--default-gc` for CPython's own).
`steps` replays like `run` and reports the wall seconds spent in each step of the
detector (timers around the methods, on the thread that runs them), and how long the
caller waited for the scoring thread. A sampling profiler misattributes time here: while
the scoring threads hold the GIL, the caller's samples land on whatever line it waits at.
Figures go to stdout; nothing fails on a slow machine.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import resource
import sys
import threading
import time
from collections import Counter, defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench.synthetic import generate
from chainwatch.schema import Block, encode

CHUNK_BLOCKS = 1000
DISTINCT_CHUNKS = 10


def _peak_rss_mb() -> float:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _tree_pss_mb() -> float:
    """Proportional set size of this process and its children, added up: what they hold
    in memory together, pages they share (the libraries a fit-ahead worker maps too)
    counted once. (Their RSS figures, added, would count those twice.)"""
    pids = ["self"] + [pid for children in Path("/proc/self/task").glob("*/children")
                       for pid in children.read_text().split()]
    total = 0.0
    for pid in pids:
        try:
            rollup = Path(f"/proc/{pid}/smaps_rollup").read_text()
        except OSError:  # gone meanwhile, or no smaps_rollup (not Linux 4.14+)
            continue
        total += sum(int(line.split()[1]) / 1024 for line in rollup.splitlines()
                     if line.startswith("Pss:"))
    return total


class _PeakSampler:
    """Samples `_tree_pss_mb` on a thread every `every` seconds and keeps the highest."""

    def __init__(self, every: float = 0.25) -> None:
        self.peak = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(every,), daemon=True)

    def _run(self, every: float) -> None:
        while not self._stop.wait(every):
            self.peak = max(self.peak, _tree_pss_mb())

    def __enter__(self) -> _PeakSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.peak = max(self.peak, _tree_pss_mb())
        self._stop.set()
        self._thread.join()


def recycled(
    base: Block, number: int, parent: str, cycle: int, sent: Counter[str], t0: int,
    producers: dict[str, str] | None = None,
) -> Block:
    """A chunk's block replayed as block `number` of cycle `cycle` (0 for the first pass
    through the chunks): new height, hash, parent and times, its producer renamed by
    `producers`. From the second cycle on, its txs get hashes of their own (the cycle in
    the hash's first 4 hex digits) and each sender's nonces go on from where the
    sender's previous cycle ended (`sent`: its txs in the chunk), so no tx repeats an
    earlier one and no nonce goes back."""
    block_hash = f"0x{number:064x}"
    ts = t0 + 12 * number
    update: dict[str, object] = {
        "number": number, "hash": block_hash, "parent_hash": parent, "timestamp": ts,
        "observed_at": ts + (base.observed_at - base.timestamp),
        "event_id": Block.id_for(1, "bench", block_hash),
        "miner": (producers or {}).get(base.miner, base.miner),
    }
    if cycle and base.transactions:
        update["transactions"] = tuple(
            tx.model_copy(update={
                "hash": f"0x{cycle:04x}{tx.hash[6:]}",
                "nonce": tx.nonce + cycle * sent[tx.from_address],
            })
            for tx in base.transactions
        )
    return base.model_copy(update=update)


def producers_by_rank(blocks: list[Block]) -> list[str]:
    """A chunk's producers, the one with most blocks first (ties by address)."""
    counts = Counter(b.miner for b in blocks)
    return sorted(counts, key=lambda miner: (-counts[miner], miner))


def shared_producers(blocks: list[Block], first: list[str]) -> dict[str, str]:
    """Each generated chunk draws its own producers; renamed by rank to the first
    chunk's, the chunks share them (the n-th busiest producer of every chunk is the
    first chunk's n-th), so a switch between chunks is not a turnover of producers."""
    return dict(zip(producers_by_rank(blocks), first, strict=False))


def sent_per_sender(blocks: list[Block]) -> Counter[str]:
    """Each sender's txs in a chunk: how far its nonces move per pass through it."""
    return Counter(tx.from_address for block in blocks for tx in block.transactions or ())


def make(directory: Path, txs: int, txs_per_block: float) -> None:
    from replay.archive import ArchiveWriter, archive_row

    blocks_needed = int(txs / txs_per_block) + 1
    chunks: list[tuple[list[Block], Counter[str], dict[str, str]]] = []
    started = time.monotonic()
    writer = ArchiveWriter(directory)
    parent = "0x" + "00" * 32
    number = 0
    written_txs = 0
    while number < blocks_needed:
        index = (number // CHUNK_BLOCKS) % DISTINCT_CHUNKS
        cycle = number // (CHUNK_BLOCKS * DISTINCT_CHUNKS)
        if index >= len(chunks):
            blocks = generate(CHUNK_BLOCKS, txs_per_block, seed=100 + index)
            first = producers_by_rank(chunks[0][0] if chunks else blocks)
            chunks.append((blocks, sent_per_sender(blocks), shared_producers(blocks, first)))
        bases, sent, producers = chunks[index]
        for base in bases:
            if number >= blocks_needed:
                break
            block = recycled(base, number, parent, cycle, sent, 1_700_000_000, producers)
            writer.add(archive_row("chainwatch.blocks", 0, number, "1:bench", encode(block), 0))
            if len(writer.rows) >= 2000:
                writer.flush()
            parent = block.hash
            number += 1
            written_txs += block.tx_count
        print(f"  made {number}/{blocks_needed} blocks", file=sys.stderr)
    writer.flush()
    took = time.monotonic() - started
    print(f"archive {directory}: {number} blocks, {written_txs} txs in {took:.0f}s")


def run(directory: Path, warmup: int) -> dict[str, object]:
    from chainwatch.settings import load_settings
    from replay.app import ReplayOptions, run_replay

    started = time.monotonic()
    with _PeakSampler() as memory:
        stats = run_replay(load_settings(warmup_blocks=warmup), str(directory),
                           ReplayOptions(out=None, progress=True), echo=lambda line: None)
    wall = time.monotonic() - started
    figures: dict[str, object] = {
        "records": stats.records,
        "blocks": stats.blocks,
        "txs": stats.transactions,
        "findings": stats.findings,
        "wall_s": round(wall, 1),
        "events_per_s": round(stats.records / wall),
        "blocks_per_s": round(stats.blocks / wall),
        "txs_per_s": round(stats.transactions / wall),
        "peak_rss_mb": round(_peak_rss_mb()),
        # with its fit-ahead worker (live models), sampled every 0.25 s
        "peak_pss_with_workers_mb": round(memory.peak),
    }
    return figures


# (module, class or None, function, label) timed by `steps`
STEPS: tuple[tuple[str, str | None, str, str], ...] = (
    ("replay.app", None, "make_detector", "start-up: detector and models"),
    ("replay.archive", None, "_frame_of", "tx frame from the archive's columns"),
    ("detector.engine", "Detector", "process", "Detector.process (all of it)"),
    ("detector.engine", "Detector", "_score", "block model"),
    ("detector.families", "TxFamily", "on_blocks", "tx family (all of it)"),
    ("detector.families", None, "tx_features", "tx features"),
    ("detector.families", None, "block_tx_rules", "tx rules (sandwich, burst)"),
    ("detector.tx_features", "SenderStats", "update", "sender statistics"),
    ("detector.tx_features", "SenderStats", "rate_as_of", "tx features: sender rate"),
    ("detector.tx_features", "SenderStats", "lookup", "tx features: last nonces"),
    ("detector.tx_features", "SelectorStats", "rarity_as_of", "tx features: selector rarity"),
    ("detector.tx_features", "SelectorStats", "update", "selector statistics"),
    ("detector.tx_features", "FeeMarket", "update", "fee market"),
    ("detector.families", "TxFamily", "_learn_included", "mined-tx bookkeeping"),
    ("detector.families", "MinerFamily", "on_blocks", "miner family"),
    ("detector.families", "ForkRisk", "evaluate", "fork risk"),
)


def steps(
    directory: Path, models: Path | None, to_block: int | None, batch: int = 500
) -> dict[str, object]:
    """Where a replay's time goes: wall seconds per detector step (see the docstring)."""
    import functools
    import importlib

    from chainwatch.settings import load_settings
    from replay.app import ReplayOptions
    from replay.positions import parse_position

    spent: defaultdict[str, float] = defaultdict(float)

    def timed(function: Callable[..., Any], label: str) -> Callable[..., Any]:
        @functools.wraps(function)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            started = time.perf_counter()
            try:
                return function(*args, **kwargs)
            finally:
                spent[label] += time.perf_counter() - started
        return wrapper

    for module_name, owner_name, name, label in STEPS:
        owner = importlib.import_module(module_name)
        if owner_name is not None:
            owner = getattr(owner, owner_name)
        setattr(owner, name, timed(getattr(owner, name), label))
    families = importlib.import_module("detector.families")
    start_scoring = families.TxFamily._start_scoring

    def start(self: Any, x: Any) -> Callable[[], Any]:
        return timed(start_scoring(self, x), "waiting for the scoring thread")

    families.TxFamily._start_scoring = start
    from detector import model  # refits start here (detector.fit_ahead.start_fit)

    start_fit = model.start_fit

    def fit(*args: Any, **kwargs: Any) -> Callable[[], Any]:
        return timed(start_fit(*args, **kwargs), "waiting for a refit (fit-ahead)")

    model.start_fit = fit
    app = importlib.import_module("replay.app")  # make_detector is looked up there
    started = time.monotonic()
    stats = app.run_replay(
        load_settings(models=models), str(directory),
        ReplayOptions(out=None, progress=False, batch_records=batch,
                      stop=parse_position(str(to_block), "--to") if to_block is not None
                      else None),
        echo=lambda line: None)
    wall = time.monotonic() - started
    return {"wall_s": round(wall, 2), "replayed_s": round(stats.wall_seconds, 2),
            "blocks": stats.blocks, "txs": stats.transactions, "findings": stats.findings,
            "steps_s": {k: round(v, 2) for k, v in sorted(spent.items(), key=lambda kv: -kv[1])}}


def decode_only(directory: Path, limit: int) -> dict[str, object]:
    """Read and decode the archive without detecting: the source's share of the cost."""
    from replay.archive import ArchiveSource
    from replay.rows import InvalidRows

    started = time.perf_counter()
    blocks = txs = 0
    for record in ArchiveSource(directory, InvalidRows()).records():
        if isinstance(record, Block):
            blocks += 1
            txs += record.tx_count
            if blocks >= limit:
                break
    wall = time.perf_counter() - started
    return {"blocks": blocks, "txs": txs, "wall_s": round(wall, 2),
            "blocks_per_s": round(blocks / wall), "txs_per_s": round(txs / wall),
            "peak_rss_mb": round(_peak_rss_mb())}


def _feed(detector: Any, clock: Any, history: list[Block], batch: int) -> int:
    """Blocks to the detector in batches on their recorded clock, as replay does; findings."""
    findings = 0
    for i in range(0, len(history), batch):
        part = history[i : i + batch]
        clock.now = part[-1].observed_at
        findings += len(detector.process(list(part)))
        findings += len(detector.tick())
    return findings


def detector_only(
    blocks: int, txs_per_block: float, batch: int, models: Path | None = None
) -> dict[str, object]:
    """Pre-decoded blocks through the Detector; with `models`, trained ones (no warm-up
    and no refits, as `chainwatch replay --models`), loaded before the clock starts."""
    from chainwatch.metrics import Metrics
    from detector.engine import Detector, DetectorConfig
    from detector.training import load_models
    from replay.driver import ReplayClock

    history = generate(blocks, txs_per_block, seed=1)
    clock = ReplayClock()
    detector = Detector(DetectorConfig(), Metrics(), clock=clock,
                        pretrained=load_models(models) if models is not None else None,
                        clock_follows_records=True)
    started = time.perf_counter()
    findings = _feed(detector, clock, history, batch)
    wall = time.perf_counter() - started
    txs = sum(b.tx_count for b in history)
    return {"blocks": blocks, "txs": txs, "batch": batch, "wall_s": round(wall, 2),
            "blocks_per_s": round(blocks / wall), "txs_per_s": round(txs / wall),
            "findings": findings}


def model_floor(blocks: int, txs_per_block: float, repeats: int) -> dict[str, object]:
    """The tx model's own cost per 10M txs: scoring each tx once, and the refits.

    Whatever the rest of replay costs, these two are paid at the configured schedule
    (FamilyConfig: refits at growing intervals up to every tx_refit_every txs, on the last
    tx_history, each scoring its training rows once for PyOD's threshold). CPU seconds
    count every thread; the floor divides them by the cores this process may use, as if
    perfectly parallel.
    """
    from chainwatch.metrics import Metrics
    from detector.engine import Detector, DetectorConfig
    from detector.families import FamilyConfig
    from detector.model import fits_within
    from replay.driver import ReplayClock

    clock = ReplayClock()
    detector = Detector(DetectorConfig(), Metrics(), clock=clock)
    _feed(detector, clock, generate(blocks, txs_per_block, seed=1), 500)
    (family,) = detector.tx.values()
    model = family.model
    rows = model._window()
    if not len(rows):  # the first batch only warms the fee market up
        raise SystemExit(f"model: no training rows after {blocks} blocks: give --blocks 800+")
    batch = rows[: min(len(rows), 75_000)]
    config = FamilyConfig()

    def timed(work: Callable[[], object]) -> tuple[float, float]:
        best = (math.inf, math.inf)
        for _ in range(repeats):
            wall, cpu = time.perf_counter(), time.process_time()
            work()
            best = min(best, (time.perf_counter() - wall, time.process_time() - cpu))
        return best

    fit_wall, fit_cpu = timed(lambda: model.detector.fit(rows))
    score_wall, score_cpu = timed(lambda: model.detector.score(batch))
    per_10m = 10_000_000
    refits = fits_within(per_10m, config.tx_warmup, config.tx_refit_every)
    cpu = refits * fit_cpu + per_10m / len(batch) * score_cpu
    cores = len(os.sched_getaffinity(0))
    return {
        "training_rows": len(rows), "features": rows.shape[1],
        "refit_wall_s": round(fit_wall, 3), "refit_cpu_s": round(fit_cpu, 3),
        "score_rows": len(batch), "score_wall_s": round(score_wall, 3),
        "score_cpu_s": round(score_cpu, 3),
        "per_10m_refits": round(refits), "per_10m_refit_cpu_s": round(refits * fit_cpu, 1),
        "per_10m_score_cpu_s": round(per_10m / len(batch) * score_cpu, 1),
        "per_10m_model_cpu_s": round(cpu, 1), "cores": cores,
        "per_10m_model_floor_wall_s": round(cpu / cores, 1),
        "target_wall_s_at_200k_tx_s": 50,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="mode", required=True)
    m = sub.add_parser("make")
    m.add_argument("--dir", type=Path, required=True)
    m.add_argument("--txs", type=int, default=10_000_000)
    m.add_argument("--txs-per-block", type=float, default=150)
    r = sub.add_parser("run")
    r.add_argument("--dir", type=Path, required=True)
    r.add_argument("--warmup", type=int, default=200)
    dec = sub.add_parser("decode")
    dec.add_argument("--dir", type=Path, required=True)
    dec.add_argument("--limit", type=int, default=10_000)
    d = sub.add_parser("detector")
    d.add_argument("--blocks", type=int, default=3000)
    d.add_argument("--txs-per-block", type=float, default=150)
    d.add_argument("--batch", type=int, default=500)
    d.add_argument("--models", type=Path, default=None, help="trained models (no refits)")
    st = sub.add_parser("steps")
    st.add_argument("--dir", type=Path, required=True)
    st.add_argument("--models", type=Path, default=None)
    st.add_argument("--to", type=int, default=None)
    st.add_argument("--batch", type=int, default=500, help="records per batch (replay --batch)")
    mf = sub.add_parser("model")
    mf.add_argument("--blocks", type=int, default=800)
    mf.add_argument("--txs-per-block", type=float, default=150)
    mf.add_argument("--repeats", type=int, default=3)
    for p in (dec, d):
        p.add_argument("--default-gc", action="store_true",
                       help="CPython's collector thresholds instead of replay's")
    args = parser.parse_args()
    machine = {"python": platform.python_version(), "machine": platform.machine()}
    if args.mode == "make":
        make(args.dir, args.txs, args.txs_per_block)
        return
    if args.mode == "run":
        figures = run(args.dir, args.warmup)
    elif args.mode == "steps":
        figures = steps(args.dir, args.models, args.to, args.batch)
    elif args.mode == "model":
        figures = model_floor(args.blocks, args.txs_per_block, args.repeats)
    else:
        from replay.driver import fewer_collections

        gc_setting = contextlib.nullcontext() if args.default_gc else fewer_collections()
        with gc_setting:
            if args.mode == "decode":
                figures = decode_only(args.dir, args.limit)
            else:
                figures = detector_only(args.blocks, args.txs_per_block, args.batch,
                                        args.models)
        figures["gc"] = "default" if args.default_gc else "replay"
    print(json.dumps({"mode": args.mode, **figures, **machine}))


if __name__ == "__main__":
    main()
