"""report.html's summary is read by people: per-family model figures as a table, shares
as percentages, recorded times as dates, the labels and warnings in their own sections,
and a line saying what a finding's time means in this replay."""

from __future__ import annotations

import re
from pathlib import Path

from replay.report import stamping_note, write_report, x_limits
from replay.report_data import ReportData, findings_frame
from replay.rows import InvalidRows

SUMMARY = {
    "blocks": 66_667,
    "first_observed_at": 1_700_000_000.5333393,
    "findings_by_detector": {"sandwich_rule": 95, "tx_iforest": 7},
    "invalid_by_reason": {},
    "models": {
        "block": {"fitted_share": 0.001, "flagged": 41, "flagged_share": 0.000615,
                  "scored": 66_666, "trained": True, "version": "block-iforest-n2000"},
        "tx": {"fitted_share": 0.001, "flagged": 0, "flagged_share": 0.0,
               "scored": 0, "trained": False, "version": None},
    },
    "labels": {"families": [], "outcomes": [{"id": "label-one-of-many"}]},
    "warnings": ["the trained block model flagged too much"],
}


def _summary_table(page: str) -> str:
    """From the summary table to the note that follows it."""
    start, end = page.index('<table class="summary">'), page.index('<p class="note">')
    return page[start:end]


def test_the_summary_is_written_for_people(tmp_path: Path) -> None:
    write_report(tmp_path, source="archive", summary=SUMMARY, data=ReportData(),
                 findings=findings_frame([]), invalid=InvalidRows(), scores=None,
                 batching=stamping_note(5_000, per_block=False))
    page = (tmp_path / "report.html").read_text()
    summary = _summary_table(page)

    assert "<td>blocks</td><td>66,667</td>" in summary
    assert "2023-11-14 22:13:20 UTC (1700000000.533)" in summary
    assert "sandwich_rule: 95<br>tx_iforest: 7" in summary
    assert "<td>invalid_by_reason</td><td>none</td>" in summary
    # the models: one row per family, no JSON
    assert ("<tr><td>block</td><td>0.1%</td><td>41</td><td>0.0615%</td><td>66,666</td>"
            "<td>yes</td><td>block-iforest-n2000</td></tr>") in summary
    assert "<tr><td>tx</td><td>0.1%</td><td>0</td><td>0%</td><td>0</td><td>no</td>" \
           "<td>n/a</td></tr>" in summary
    assert "{" not in summary and '"' not in summary.replace('class="summary"', "")
    # labels and warnings have their own sections
    assert "label-one-of-many" not in page
    assert "warnings" not in summary and 'class="warning"' in page
    assert "Batches of up to 5,000 records" in page


def test_the_stamping_note_follows_the_batching() -> None:
    assert "up to 500 records after their cause" in stamping_note(500, per_block=False)
    per_block = stamping_note(500, per_block=True)
    assert "time of the block that raised it" in per_block and "500" not in per_block


def test_each_labels_outcome_is_listed_the_missed_first(tmp_path: Path) -> None:
    family = {"family": "tx", "labels": 3, "detected": 2, "findings": 2, "true_findings": 2,
              "false_findings": 0, "excused": 0, "precision": 1.0, "recall": 2 / 3,
              "f1": 0.8, "latency_blocks_p50": 0, "latency_blocks_max": 1,
              "latency_seconds_p50": 0.5}
    outcomes = [
        {"id": "0xfee", "family": "tx", "kind": "fee_outlier", "first_block": 10,
         "detected_by": ["tx_iforest"], "latency_blocks": 0, "latency_seconds": 0.5},
        {"id": "sandwich-40", "family": "tx", "kind": "sandwich", "first_block": 40,
         "detected_by": [], "latency_blocks": None, "latency_seconds": None},
        {"id": "burst-20", "family": "tx", "kind": "spam_burst", "first_block": 20,
         "detected_by": ["sender_burst_rule", "tx_iforest"], "latency_blocks": 1,
         "latency_seconds": 12.25},
    ]
    write_report(tmp_path, source="archive", summary={"blocks": 50}, data=ReportData(),
                 findings=findings_frame([]), invalid=InvalidRows(),
                 scores={"families": [family], "outcomes": outcomes})
    page = (tmp_path / "report.html").read_text()

    assert "<h3>Labels: 1 of 3 missed</h3>" in page
    rows = re.findall(r'<tr><td class="long">([^<]+)</td><td>tx</td>.*?</tr>', page)
    assert rows == ["sandwich-40", "0xfee", "burst-20"]  # missed first, then by block
    assert ("<td>sender_burst_rule, tx_iforest</td><td>1</td><td>12.25</td>") in page
    assert "<td>missed</td><td>n/a</td><td>n/a</td>" in page


def test_a_long_label_list_is_cut_and_says_so(tmp_path: Path) -> None:
    outcomes = [{"id": f"l{i}", "family": "block", "kind": "stall", "first_block": i,
                 "detected_by": ["block_iforest"] if i % 2 else [], "latency_blocks": 1,
                 "latency_seconds": 12.0} for i in range(250)]
    write_report(tmp_path, source="archive", summary={"blocks": 50}, data=ReportData(),
                 findings=findings_frame([]), invalid=InvalidRows(),
                 scores={"families": [], "outcomes": outcomes})
    page = (tmp_path / "report.html").read_text()
    assert "<h3>Labels: 125 of 250 missed</h3>" in page
    assert "the first 100 of 250 (all in summary.json)" in page
    shown = re.findall(r'<td class="long">(l\d+)</td>', page)
    assert len(shown) == 100 and shown[:2] == ["l0", "l2"]  # all missed, by first block


def test_the_time_axis_leaves_room_at_both_ends() -> None:
    assert x_limits(1_000.0, 1_030.0) == (940.0, 1_090.0)  # a short replay: a minute
    start, end = x_limits(0.0, 86_400.0)  # a day: 1.5 %
    assert (start, end) == (-1_296.0, 87_696.0)
