"""Write a replay's results: findings (JSONL, Parquet, CSV), PNG plots, a self-contained HTML.

I/O adapter over `replay.report_data`. The HTML embeds its images as base64 and has no
script, so it opens anywhere (mail attachment, file share) without a server or network.
Everything written is a function of the findings and the input: no wall-clock times.
"""

from __future__ import annotations

import base64
import html
import io
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, cast

import matplotlib

matplotlib.use("Agg")  # no display: the report is written, not shown

import matplotlib.dates as mdates
import matplotlib.pyplot as plt
import polars as pl

from chainwatch.schema import Finding, encode
from replay.report_data import (
    ReportData,
    bucket_seconds,
    findings_frame,
    findings_per_detector,
    miner_share,
    top_findings,
)
from replay.rows import InvalidRows

PLOTS = ("fork_risk", "tx_scores", "miner_share", "findings_per_detector")
# deterministic PNGs: no software/creation-time metadata
_PNG_META: dict[str, Any] = {"Software": None}


def _dt(seconds: Sequence[float]) -> list[datetime]:
    return [datetime.fromtimestamp(s, UTC) for s in seconds]


def _figure(title: str) -> tuple[Any, Any]:
    fig, ax = plt.subplots(figsize=(11, 4), dpi=100)
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    return fig, ax


def x_limits(start: float, end: float) -> tuple[float, float]:
    """The plots' time axis: the replay's span and a margin (1.5 %, at least a minute)
    on both sides, so that a finding stamped at the very end is drawn whole."""
    margin = max(60.0, (end - start) * 0.015)
    return start - margin, end + margin


def _finish(
    fig: Any, ax: Any, path: Path, *, span: tuple[float, float] | None = None,
    empty: str | None = None,
) -> bytes:
    """Common x axis (the replay's time span, UTC), deterministic PNG bytes, written to path."""
    if span is not None:
        ax.set_xlim(*_dt(x_limits(*span)))
        ax.xaxis.set_major_formatter(mdates.DateFormatter("%m-%d %H:%M", tz=UTC))
        fig.autofmt_xdate()
    if empty:
        ax.text(0.5, 0.5, empty, ha="center", va="center", transform=ax.transAxes, color="0.4")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", metadata=_PNG_META)
    plt.close(fig)
    data = buf.getvalue()
    path.write_bytes(data)
    return data


def _span(data: ReportData, findings: pl.DataFrame) -> tuple[float, float] | None:
    times = [*data.block_time, *(t for t, *_ in data.reorgs), *findings["observed_at"].to_list()]
    return (min(times), max(times)) if times else None


def plot_fork_risk(findings: pl.DataFrame, data: ReportData, path: Path) -> bytes:
    fig, ax = _figure("Fork risk: finding scores, reorgs (dashed) and chain splits (red)")
    fork = findings.filter(pl.col("family") == "fork_risk")
    for detector in sorted(fork["detector"].unique().to_list()):
        part = fork.filter(pl.col("detector") == detector)
        ax.scatter(_dt(part["observed_at"].to_list()), part["score"].to_list(), s=14,
                   label=detector)
    for t, node, depth, head in data.reorgs:
        ax.axvline(_dt([t])[0], color="0.35", linestyle="--", linewidth=0.8)
        ax.annotate(f"reorg {node} depth {depth} @{head}", (_dt([t])[0], 0.97), fontsize=7,
                    rotation=90, va="top", ha="right", xycoords=("data", "axes fraction"))
    splits = fork.filter(pl.col("detector") == "chain_split")
    for t in splits["observed_at"].to_list():
        ax.axvline(_dt([t])[0], color="tab:red", alpha=0.5, linewidth=1.5)
    ax.set_ylim(-0.05, 1.05)
    ax.set_ylabel("score")
    if fork.height:
        ax.legend(loc="lower left", fontsize=8)
    empty = None if fork.height or data.reorgs else "no fork-risk findings and no reorgs"
    return _finish(fig, ax, path, span=_span(data, findings), empty=empty)


def plot_tx_scores(findings: pl.DataFrame, data: ReportData, path: Path) -> bytes:
    fig, ax = _figure("Transaction anomaly scores")
    tx = findings.filter(pl.col("family") == "tx")
    for detector in sorted(tx["detector"].unique().to_list()):
        part = tx.filter(pl.col("detector") == detector)
        ax.scatter(_dt(part["observed_at"].to_list()), part["score"].to_list(), s=8,
                   alpha=0.6, label=detector)
    ax.set_ylabel("score")
    ax.set_ylim(-0.05, 1.05)
    if tx.height:
        ax.legend(loc="lower left", fontsize=8)
    return _finish(fig, ax, path, span=_span(data, findings),
                   empty=None if tx.height else "no transaction findings")


def plot_miner_share(findings: pl.DataFrame, data: ReportData, path: Path) -> bytes:
    blocks = data.blocks_frame()
    fig, ax = _figure("Miner share of blocks over time (flagged miners marked *)")
    if blocks.is_empty():
        return _finish(fig, ax, path, empty="no blocks")
    observed = blocks["observed_at"]
    span = cast(float, observed.max()) - cast(float, observed.min())
    share = miner_share(blocks, bucket_seconds(span))
    flagged = set(
        findings.filter(pl.col("subject_kind") == "miner")["subject"].str.to_lowercase().to_list()
    )
    buckets = sorted(share["bucket"].unique().to_list())
    times = _dt(buckets)
    miners = sorted(share["miner"].unique().to_list(), key=lambda m: (m == "other", m))
    stacks = []
    labels = []
    for miner in miners:
        part = dict(share.filter(pl.col("miner") == miner).select("bucket", "share").iter_rows())
        stacks.append([part.get(b, 0.0) for b in buckets])
        mark = " *" if miner.lower() in flagged else ""
        labels.append(f"{miner[:10]}…{mark}" if miner != "other" else "other")
    if len(buckets) > 1:
        ax.stackplot(times, stacks, labels=labels, alpha=0.85)
    else:
        bottom = 0.0
        for values, label in zip(stacks, labels, strict=True):
            ax.bar(times, values, bottom=bottom, label=label, width=0.01)
            bottom += values[0]
    ax.set_ylim(0, 1)
    ax.set_ylabel("share of blocks")
    ax.legend(loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize=7)
    return _finish(fig, ax, path, span=_span(data, findings))


def plot_findings_per_detector(findings: pl.DataFrame, data: ReportData, path: Path) -> bytes:
    fig, ax = _figure("Findings per detector over time")
    span = _span(data, findings)
    if findings.is_empty() or span is None:
        return _finish(fig, ax, path, span=span, empty="no findings")
    counts = findings_per_detector(findings, bucket_seconds(span[1] - span[0]))
    for detector in sorted(counts["detector"].unique().to_list()):
        part = counts.filter(pl.col("detector") == detector)
        ax.plot(_dt(part["bucket"].to_list()), part["count"].to_list(), marker="o",
                markersize=3, label=detector)
    ax.set_ylabel("findings per bucket")
    ax.set_ylim(bottom=0)
    ax.legend(loc="upper left", fontsize=8)
    return _finish(fig, ax, path, span=span)


def write_findings(findings: Sequence[Finding], out: Path) -> pl.DataFrame:
    """findings.jsonl (records as on the bus), findings.parquet and findings.csv, in the
    order they were observed (their stamps; ties by event id): not the order the replay
    happened to emit them in, which depends on its batches and runs."""
    findings = sorted(findings, key=lambda f: (f.observed_at, f.event_id))
    with (out / "findings.jsonl").open("wb") as handle:
        for f in findings:
            handle.write(encode(f) + b"\n")
    frame = findings_frame(findings)
    frame.write_parquet(out / "findings.parquet", compression="zstd", statistics=False)
    frame.write_csv(out / "findings.csv")
    return frame


def write_invalid(invalid: InvalidRows, out: Path) -> None:
    frame = pl.DataFrame(invalid.samples, schema={"where": pl.String, "reason": pl.String},
                         orient="row")
    frame.write_csv(out / "invalid_rows.csv")


# columns of hashes and free text: wrapped anywhere, so that a 66-character hash does
# not push the table past the page
_LONG_COLUMNS = ("subject", "summary", "where", "reason", "label")


def _table(frame: pl.DataFrame, columns: Sequence[str]) -> str:
    head = "".join(f"<th>{html.escape(c)}</th>" for c in columns)
    opening = ['<td class="long">' if c in _LONG_COLUMNS else "<td>" for c in columns]
    body = []
    for row in frame.select(columns).iter_rows():
        cells = "".join(
            f"{td}{html.escape(f'{v:.3f}' if isinstance(v, float) else str(v))}</td>"
            for td, v in zip(opening, row, strict=True)
        )
        body.append(f"<tr>{cells}</tr>")
    if not body:
        body.append(f'<tr><td colspan="{len(columns)}">none</td></tr>')
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


# shown in their own sections of the report, not in the summary table
_OWN_SECTIONS = ("labels", "warnings")


def _plain(key: str, value: Any) -> str:
    """One summary value as text: thousands separated, shares as percentages, recorded
    times as UTC dates (with the unix seconds of summary.json)."""
    if value is None:
        return "n/a"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        if key.endswith("_share"):
            return f"{value * 100:.3g}%"
        if key.endswith("_observed_at"):
            when = datetime.fromtimestamp(value, tz=UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
            return f"{when} ({value:.3f})"
        return f"{value:.6g}"
    return str(value)


def _summary_cell(key: str, value: Any) -> str:
    """A summary value as HTML: a table for per-family records (`models`), one line per
    entry for counts by name, plain text otherwise."""
    if isinstance(value, dict) and value and all(isinstance(v, dict) for v in value.values()):
        columns = ["", *dict.fromkeys(k for v in value.values() for k in v)]
        rows = [[str(name), *(_plain(c, row.get(c)) for c in columns[1:])]
                for name, row in value.items()]
        return _table(pl.DataFrame(rows, schema=dict.fromkeys(columns, pl.String),
                                   orient="row"), columns)
    if isinstance(value, dict):
        lines = [f"{html.escape(str(k))}: {html.escape(_plain(str(k), v))}"
                 for k, v in value.items()]
        return "<br>".join(lines) or "none"
    return html.escape(_plain(key, value))


def _summary_table(summary: dict[str, Any]) -> str:
    rows = "".join(
        f"<tr><td>{html.escape(str(k))}</td><td>{_summary_cell(str(k), v)}</td></tr>"
        for k, v in summary.items() if k not in _OWN_SECTIONS
    )
    return f'<table class="summary">{rows}</table>'


SHOWN_LABELS = 100


def _label_outcomes(outcomes: list[dict[str, Any]]) -> list[str]:
    """Each label's outcome, the missed ones first (at most SHOWN_LABELS; all of them
    are in summary.json)."""
    if not outcomes:
        return []
    ordered = sorted(outcomes, key=lambda o: (bool(o["detected_by"]), o["first_block"],
                                              str(o["id"])))
    missed = sum(1 for o in outcomes if not o["detected_by"])
    rows = pl.DataFrame(
        [{"label": str(o["id"]), "family": o["family"], "kind": o["kind"],
          "first_block": o["first_block"],
          "detected_by": ", ".join(o["detected_by"]) or "missed",
          "latency_blocks": _plain("", o["latency_blocks"]),
          "latency_seconds": _plain("", o["latency_seconds"])}
         for o in ordered[:SHOWN_LABELS]],
        schema={"label": pl.String, "family": pl.String, "kind": pl.String,
                "first_block": pl.Int64, "detected_by": pl.String,
                "latency_blocks": pl.String, "latency_seconds": pl.String},
    )
    shown = (f": the first {SHOWN_LABELS} of {len(outcomes):,} (all in summary.json)"
             if len(outcomes) > SHOWN_LABELS else "")
    return [f"<h3>Labels: {missed} of {len(outcomes)} missed</h3>",
            f'<p class="note">Missed labels first, then by first block{shown}.</p>',
            _table(rows, rows.columns)]


def _img(name: str, png: bytes, alt: str) -> str:
    data = base64.b64encode(png).decode()
    src = f"data:image/png;base64,{data}"
    return f'<figure id="{name}"><img alt="{html.escape(alt)}" src="{src}"></figure>'


_CSS = """
body{font-family:system-ui,sans-serif;margin:2em auto;max-width:1200px;color:#222}
h1{font-size:1.6em}h2{font-size:1.2em;margin-top:2em;border-bottom:1px solid #ddd}
table{border-collapse:collapse;font-size:.85em;margin:.5em 0}
td,th{border:1px solid #ddd;padding:3px 6px;text-align:left;vertical-align:top}
td.long{overflow-wrap:anywhere}
th{background:#f4f4f4}img{max-width:100%}code{background:#f4f4f4;padding:0 3px}
.summary>tbody>tr>td:first-child{font-weight:600}
.note{color:#555;font-size:.9em}
.warning{background:#fff4e5;border-left:4px solid #e08a00;padding:.5em .8em}
"""


def stamping_note(batch_records: int, per_block: bool) -> str:
    """What a finding's time means in this replay (docs/replay-format.md)."""
    if per_block:
        return ("Times are recorded times (observed_at). One batch per block: each "
                "finding is stamped with the time of the block that raised it.")
    return (f"Times are recorded times (observed_at). Batches of up to {batch_records:,} "
            "records: findings about a block, its transactions or a reorg are stamped with "
            "the time that record came in, and the miner window rules are evaluated at "
            "every block; fork-risk score, node state, chain split, censorship and pending-"
            f"transaction findings with the last time of their batch, up to "
            f"{batch_records:,} records after their cause (--per-block stamps each at its "
            "block).")


def write_report(
    out: Path,
    *,
    source: str,
    summary: dict[str, Any],
    data: ReportData,
    findings: pl.DataFrame,
    invalid: InvalidRows,
    scores: dict[str, Any] | None,
    top_n: int = 20,
    batching: str = "",
) -> Path:
    """The PNG plots and report.html (plots embedded), from what the replay gathered.

    `batching`: how findings were stamped (see `stamping_note`), shown under the summary.
    """
    pngs = {
        "fork_risk": plot_fork_risk(findings, data, out / "fork_risk.png"),
        "tx_scores": plot_tx_scores(findings, data, out / "tx_scores.png"),
        "miner_share": plot_miner_share(findings, data, out / "miner_share.png"),
        "findings_per_detector": plot_findings_per_detector(
            findings, data, out / "findings_per_detector.png"
        ),
    }
    cols = ["score", "detector", "block_number", "node", "subject", "summary"]
    flagged = (
        findings.filter(pl.col("subject_kind") == "miner")
        .group_by("subject").agg(pl.len().alias("findings"), pl.col("score").max().alias("max"))
        .sort(["findings", "subject"], descending=[True, False])
    )
    parts = [
        "<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\">",
        "<title>chainwatch replay report</title>",
        f"<style>{_CSS}</style></head><body>",
        "<h1>chainwatch replay report</h1>",
        f"<p>Source: <code>{html.escape(source)}</code></p>",
        *(f'<p class="warning">Warning: {html.escape(w)}</p>'
          for w in summary.get("warnings", [])),
        "<h2>Summary</h2>", _summary_table(summary),
        *([f'<p class="note">{html.escape(batching)}</p>'] if batching else []),
        "<h2>Fork risk</h2>", _img("fork_risk", pngs["fork_risk"], "fork-risk timeline"),
        "<h2>Transaction anomalies</h2>",
        _img("tx_scores", pngs["tx_scores"], "transaction anomaly scores"),
        f"<h3>Top {top_n} transaction findings</h3>",
        _table(top_findings(findings, "tx", top_n), cols),
        "<h2>Miners</h2>", _img("miner_share", pngs["miner_share"], "miner share over time"),
        "<h3>Flagged miners</h3>", _table(flagged, ["subject", "findings", "max"]),
        "<h2>Findings per detector</h2>",
        _img("findings_per_detector", pngs["findings_per_detector"], "findings per detector"),
        f"<h3>Top {top_n} block findings</h3>",
        _table(top_findings(findings, "block", top_n), cols),
    ]
    if scores is not None:
        def shown(value: Any, form: str) -> str:
            return "n/a" if value is None else format(value, form)

        score_rows = pl.DataFrame(
            [
                {
                    "family": s["family"],
                    "labels": s["labels"],
                    "detected": s["detected"],
                    "findings": s["findings"],
                    "true": s["true_findings"],
                    "false": s["false_findings"],
                    "excused": s["excused"],
                    "precision": shown(s["precision"], ".3f"),
                    "recall": shown(s["recall"], ".3f"),
                    "latency_blocks_p50": shown(s["latency_blocks_p50"], "g"),
                    "latency_seconds_p50": shown(s["latency_seconds_p50"], ".1f"),
                }
                for s in scores["families"]
            ]
        ) if scores["families"] else pl.DataFrame({"family": []})
        parts += ["<h2>Against the labels</h2>",
                  "<p>Matching and scoring as <code>chainwatch evaluate</code> "
                  "(docs/replay-format.md, Labels).</p>",
                  _table(score_rows, score_rows.columns),
                  *_label_outcomes(scores.get("outcomes", []))]
    inv = pl.DataFrame(invalid.samples[:50], schema={"where": pl.String, "reason": pl.String},
                       orient="row")
    parts += [
        f"<h2>Invalid rows ({invalid.count} skipped"
        + (f"; {invalid.files} unreadable archive files" if invalid.files else "") + ")</h2>",
        _table(inv, ["where", "reason"]),
        "</body></html>",
    ]
    path = out / "report.html"
    path.write_text("\n".join(parts), encoding="utf-8")
    return path
