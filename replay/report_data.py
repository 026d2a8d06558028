"""What the report shows, gathered while replaying. Pure: no I/O, no plotting.

Kept small on purpose so a 10M-transaction replay stays within memory: per block only
(time, height, miner index) in compact arrays, the reorgs, and the findings themselves.
"""

from __future__ import annotations

from array import array
from collections.abc import Iterable
from dataclasses import dataclass, field

import polars as pl

from chainwatch.schema import AnyRecord, Block, Finding, Reorg

FINDING_COLUMNS: dict[str, pl.DataType | type[pl.DataType]] = {
    "observed_at": pl.Float64,
    "chain_id": pl.Int64,
    "node": pl.String,
    "detector": pl.String,
    "family": pl.String,
    "severity": pl.String,
    "score": pl.Float64,
    "threshold": pl.Float64,
    "subject_kind": pl.String,
    "subject": pl.String,
    "block_number": pl.Int64,
    "summary": pl.String,
    "model_version": pl.String,
    "explanation": pl.String,
    "event_id": pl.String,
}


def finding_row(f: Finding) -> dict[str, object]:
    """A finding as a flat row (explanation as `feature=value (z=...)` text)."""
    explanation = "; ".join(
        f"{e.feature}={e.value:.6g} (normal {e.normal:.6g}, z={e.deviation:+.2f})"
        for e in f.explanation
    )
    return {
        "observed_at": f.observed_at,
        "chain_id": f.chain_id,
        "node": f.node,
        "detector": f.detector,
        "family": f.family,
        "severity": f.severity,
        "score": f.score,
        "threshold": f.threshold,
        "subject_kind": f.subject_kind,
        "subject": f.subject,
        "block_number": f.block_number,
        "summary": f.summary,
        "model_version": f.model_version,
        "explanation": explanation,
        "event_id": f.event_id,
    }


def findings_frame(findings: Iterable[Finding]) -> pl.DataFrame:
    return pl.DataFrame([finding_row(f) for f in findings], schema=FINDING_COLUMNS)


@dataclass
class ReportData:
    """Block timeline, miners, reorgs and findings of one replay."""

    block_time: array = field(default_factory=lambda: array("d"))
    block_number: array = field(default_factory=lambda: array("q"))
    block_miner: array = field(default_factory=lambda: array("I"))
    miners: dict[str, int] = field(default_factory=dict)
    reorgs: list[tuple[float, str, int, int]] = field(default_factory=list)  # t, node, depth, head
    findings: list[Finding] = field(default_factory=list)

    def observe(self, records: Iterable[AnyRecord]) -> None:
        for r in records:
            if isinstance(r, Block):
                index = self.miners.setdefault(r.miner, len(self.miners))
                self.block_time.append(r.observed_at)
                self.block_number.append(r.number)
                self.block_miner.append(index)
            elif isinstance(r, Reorg):
                self.reorgs.append((r.observed_at, r.node, r.depth, r.new_head_number))

    def add_findings(self, findings: Iterable[Finding]) -> None:
        self.findings.extend(findings)

    def blocks_frame(self) -> pl.DataFrame:
        names = [""] * len(self.miners)
        for miner, i in self.miners.items():
            names[i] = miner
        return pl.DataFrame(
            {
                "observed_at": list(self.block_time),
                "number": list(self.block_number),
                "miner": [names[i] for i in self.block_miner],
            },
            schema={"observed_at": pl.Float64, "number": pl.Int64, "miner": pl.String},
        )


def bucket_seconds(span: float, target_buckets: int = 60) -> float:
    """A round bucket width giving about `target_buckets` points over the span."""
    for width in (12, 60, 300, 600, 1800, 3600, 3 * 3600, 6 * 3600, 86400, 7 * 86400):
        if span / width <= target_buckets:
            return float(width)
    return 30 * 86400.0


def miner_share(blocks: pl.DataFrame, width: float, top: int = 8) -> pl.DataFrame:
    """Share of blocks per miner per time bucket; miners outside the top `top` are `other`."""
    if blocks.is_empty():
        return pl.DataFrame(schema={"bucket": pl.Float64, "miner": pl.String, "share": pl.Float64})
    leaders = (
        blocks.group_by("miner").len().sort(["len", "miner"], descending=[True, False])
        .head(top)["miner"].to_list()
    )
    return (
        blocks.with_columns(
            bucket=(pl.col("observed_at") // width) * width,
            miner=pl.when(pl.col("miner").is_in(leaders)).then(pl.col("miner"))
            .otherwise(pl.lit("other")),
        )
        .group_by("bucket", "miner").len()
        .with_columns(share=pl.col("len") / pl.col("len").sum().over("bucket"))
        .select("bucket", "miner", "share")
        .sort("bucket", "miner")
    )


def findings_per_detector(findings: pl.DataFrame, width: float) -> pl.DataFrame:
    if findings.is_empty():
        schema = {"bucket": pl.Float64, "detector": pl.String, "count": pl.UInt32}
        return pl.DataFrame(schema=schema)
    return (
        findings.with_columns(bucket=(pl.col("observed_at") // width) * width)
        .group_by("bucket", "detector").len().rename({"len": "count"})
        .sort("bucket", "detector")
    )


def top_findings(findings: pl.DataFrame, family: str, n: int = 20) -> pl.DataFrame:
    """The n highest-scoring findings of a family (ties by block, then subject: stable)."""
    return (
        findings.filter(pl.col("family") == family)
        .sort(["score", "block_number", "subject"], descending=[True, False, False])
        .head(n)
    )
