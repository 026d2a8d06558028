"""The metric label sets chainwatch pre-initialises match what the code emits."""

from __future__ import annotations

import re
from pathlib import Path

from chainwatch.metrics import DETECTORS

ROOT = Path(__file__).resolve().parents[2]


def test_every_rule_the_detector_has_is_a_known_detector_label():
    """A rule missing from DETECTORS has no zero-initialised findings series, so the
    first finding is invisible to increase() and its alert never fires."""
    source = "".join(p.read_text() for p in (ROOT / "detector").glob("*.py"))
    rules = set(re.findall(r'rule="([a-z_]+)"', source))
    assert rules and rules <= set(DETECTORS), rules - set(DETECTORS)
